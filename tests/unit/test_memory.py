"""The tracked dialogue state and the relevance-ranked recall of condensed-out messages."""

import pytest

from chatbot.conversation.relevance import MiniLMRelevance
from chatbot.conversation.service import ChatService
from chatbot.conversation.store import ConversationStore
from chatbot.generation.transformers_backend import GenerationSettings, load_generator
from chatbot.memory import Said, TrackedState, WordOverlap, facts_in
from chatbot.perception.encoder import MultimodalEncoder
from chatbot.state import Attachment, AttachmentKind, Conversation, Observation, Role, Turn
from tests.unit.test_state import photo_turn, words

FILLER = ["How do I clean a cast iron pan?", "Suggest a quick vegetarian dinner.", "How can I fall asleep faster?",
          "Recommend a board game for a family evening.", "What is a good stretch after a long day?",
          "How do I keep basil alive on a windowsill?", "Give me a two-line poem about autumn."]


def test_facts_stated_in_passing_are_kept_addressed_to_the_user():
    facts = facts_in("Hi! My name is Ana, I work as a nurse and I'm busy. My daughter's name is Matilda and she is "
                     "seven; what should she eat before her play? Can you help me?", 0)
    assert [f.text for f in facts] == ["Your name is Ana, you work as a nurse and you're busy.",
                                       "Your daughter's name is Matilda and she is seven."]
    assert facts_in("What is my name?", 1) == []  # a question tells nothing
    assert facts_in("Tell me a tip about my cat.", 1) == []  # nor does a request
    assert facts_in("Paris is big.", 1) == []  # nothing about the user
    assert facts_in("Here is a photo I took.", 1) == []  # handing over an attachment (tracked as one)


def test_a_newer_statement_about_the_same_thing_replaces_the_older():
    state = TrackedState()
    state.update(0, "My name is Ana. My dog is called Biscuit.")
    state.update(2, "Sorry, my name is actually Anna.")
    assert [f.text for f in state.facts] == ["Your dog is called Biscuit.", "Sorry, your name is actually Anna."]


def test_the_state_is_derived_from_the_turns_so_a_stored_conversation_has_it():
    conv = Conversation()
    conv.add_user_turn(Turn(role=Role.USER, text="My daughter's name is Matilda and she is seven."))
    conv.add_assistant_turn("Lovely!")
    conv.add_user_turn(photo_turn("Look at this sign.", "aa", "HARBOR ROAD Lisbon 12 km"))
    again = Conversation.from_json(conv.to_json())
    assert again.tracked() == conv.tracked()
    assert [i.label for i in again.tracked().items] == ["Photo 1"]
    assert "HARBOR ROAD" in again.tracked().items[0].note


def long_chat(first: Turn, n: int = 20) -> Conversation:
    conv = Conversation()
    conv.add_user_turn(first)
    conv.add_assistant_turn("Noted, thank you for telling me.")
    for i in range(n):
        conv.add_user_turn(Turn(role=Role.USER, text=FILLER[i % len(FILLER)]))
        conv.add_assistant_turn("Here is a short answer with a few words of advice for you. " * 2)
    return conv


def test_the_state_is_rendered_in_the_newest_message_and_the_history_before_it_stays_the_same():
    conv = long_chat(Turn(role=Role.USER, text="My daughter's name is Matilda and she is seven."), n=2)
    conv.add_user_turn(Turn(role=Role.USER, text="What is my daughter's name?"))
    first = conv.render(words, 2000)
    assert first[-1].content.startswith("[Notes for you")
    assert "Your daughter's name is Matilda and she is seven." in first[-1].content
    assert first[-1].content.endswith("What is my daughter's name?")
    assert all("Your daughter" not in m.content for m in first[:-1])
    conv.add_assistant_turn("Matilda.")
    conv.add_user_turn(Turn(role=Role.USER, text="And how old is she?"))
    second = conv.render(words, 2000)
    # Everything up to the previous question is unchanged: the decoder reuses its cache for it.
    assert second[:len(first) - 1] == first[:-1]


def test_photo_notes_stay_retrievable_by_label_and_by_content():
    conv = Conversation()
    conv.add_user_turn(photo_turn("", "aa", "HARBOR ROAD Lisbon 12 km " + "small print " * 40))
    conv.add_user_turn(photo_turn("", "bb", "OPEN 9 to 5 " + "opening hours " * 40))
    conv.add_user_turn(Turn(role=Role.USER, attachments=[Attachment(kind=AttachmentKind.AUDIO, path="/m/cc.wav",
                                                                    sha256="cc")]))
    conv.add_assistant_turn("Noted.")
    for i in range(60):  # the attachments' messages are condensed out of the history
        conv.add_user_turn(Turn(role=Role.USER, text=FILLER[i % len(FILLER)]))
        conv.add_assistant_turn("Here is a short answer with a few words of advice for you. " * 2)
    for query, full in [("What did the sign to Lisbon say?", "aa"), ("What was in my second photo?", "bb"),
                        ("What does Photo 1 say?", "aa")]:
        asked = Conversation.from_dict(conv.to_dict())
        asked.add_user_turn(Turn(role=Role.USER, text=query))
        messages = asked.render(words, 2000)
        assert "HARBOR" not in "".join(m.content for m in messages[1:-1])
        note = messages[-1].content
        lines = {line.split(":", 1)[0]: line.rstrip("]") for line in note.splitlines() if line.startswith("- Photo")}
        assert not lines[f"- Photo {1 if full == 'aa' else 2} ({'first' if full == 'aa' else 'second'} photo)"] \
            .endswith("…")  # the one asked about is in full
        assert len(lines) == 1  # the other one is left out of the block
    # Named only by its kind: every photo, in full; the recording, not a photo, is left out.
    asked = Conversation.from_dict(conv.to_dict())
    asked.add_user_turn(Turn(role=Role.USER, text="What did my photo show?"))
    note = asked.render(words, 2000)[-1].content
    assert "- Photo 1" in note and "- Photo 2" in note and "Recording 1" not in note and "…" not in note
    asked.turns[-1].text = "Tell me a joke."  # unrelated to every attachment: none in the block
    assert asked.render(words, 2000)[-1].content == "Tell me a joke."


def test_an_attachment_whose_message_is_still_in_the_prompt_is_not_repeated_in_the_block():
    """Its notes right before the question made the 0.5B model echo the question: "Which road was on the sign I
    showed you?" got "The road was on the sign I showed you." (bench.quality); from the history alone it read it."""
    conv = long_chat(photo_turn("Look at this sign I saw today.", "aa", "HARBOR ROAD / Lisbon 12 km"), n=10)
    conv.add_user_turn(Turn(role=Role.USER, text="Which road was on the sign I showed you?"))
    messages = conv.render(words, 4000)
    assert "HARBOR ROAD" in messages[1].content  # the photo's own message, in the history
    assert messages[-1].content == "Which road was on the sign I showed you?"
    # Named by its label it is repeated: which of several is meant, the small model could not tell from the history
    # ("What was the code word in Document 1?" got "Internal memo.").
    conv.turns[-1].text = "What did Photo 1 say?"
    assert "HARBOR ROAD" in conv.render(words, 4000)[-1].content


@pytest.mark.parametrize("relevance", [WordOverlap(), "minilm"])
def test_the_facts_are_in_the_block_only_when_the_message_relates_to_them(relevance):
    """Shown beside every message, the 0.5B model copied facts into unrelated answers ("Here's a warm-up before
    running: Matilda should eat breakfast before her bike ride") and later answered from those copies."""
    if relevance == "minilm":
        relevance = MiniLMRelevance()
    state = TrackedState()
    state.update(0, "My daughter's name is Matilda and she is seven. I hate coffee but I love green tea.")
    facts = ["- Your daughter's name is Matilda and she is seven.", "- You hate coffee but you love green tea."]
    for related in ["Which drink do I love?", "How old is my daughter?"]:
        # All of them (they tell things apart: "Biscuit" alone once became "Your dog is called Matilda").
        assert all(f in state.render(related, [], words, 500, relevance) for f in facts)
    for unrelated in ["Recommend a warm-up before running.", "How do I fix a squeaky door?",
                      "Write a long story about a dragon who learns to cook."]:
        assert state.render(unrelated, [], words, 500, relevance) == ""


def test_a_recording_is_tracked_with_what_was_said():
    audio = Attachment(kind=AttachmentKind.AUDIO, path="/media/cc.wav", sha256="cc")
    turn = Turn(role=Role.USER, attachments=[audio], observations=[
        Observation(kind="transcript", text="The elephant and the giraffe drink from the river.", attachment="cc")])
    conv = Conversation()
    conv.add_user_turn(turn)
    item = conv.tracked().items[0]
    assert item.label == "Recording 1" and "giraffe" in item.note and "first recording" in item.names


@pytest.mark.parametrize("relevance", [WordOverlap(), "minilm"])
def test_condensed_out_messages_are_recalled_by_relevance_not_recency(relevance):
    if relevance == "minilm":
        relevance = MiniLMRelevance()
    conv = long_chat(Turn(role=Role.USER, text="Can you suggest a gift for Matilda, my daughter who loves horses?"))
    conv.add_user_turn(Turn(role=Role.USER, text="Which gift ideas did we discuss for my daughter?"))
    messages = conv.render(words, 300, relevance)
    assert "Matilda" not in "".join(m.content for m in messages[1:-1])  # the first turn was condensed out
    note = messages[-1].content
    recalled = note[note.index("Earlier messages related"):].splitlines()[1:]
    assert "Matilda" in recalled[0]  # the oldest message, recalled first because it is the relevant one


TOPICS = ["my cat Miso", "hiking in the Alps", "baking sourdough", "my trip to Lisbon"]


def topic_chat(n: int, topics: list[str] = TOPICS) -> Conversation:
    """bench.bench_app's chat: the same request about a few topics in turn."""
    conv = Conversation()
    for i in range(n):
        conv.add_user_turn(Turn(role=Role.USER, text=f"Turn {i + 1}: tell me one short tip about "
                                                     f"{topics[i % len(topics)]}, in two sentences."))
        conv.add_assistant_turn("Here is a short answer with a few words of advice for you. " * 2)
    return conv


@pytest.mark.parametrize("relevance", [WordOverlap(), "minilm"])
def test_a_condensed_out_message_the_prompt_still_repeats_is_not_recalled(relevance):
    """bench.bench_app's turn 40 (the Lisbon request again) recalled turns 8 and 16, the same request, while turn 36
    was still in the history: 96-166 prompt tokens read a turn instead of ~30, for nothing the prompt did not say."""
    if relevance == "minilm":
        relevance = MiniLMRelevance()
    conv = topic_chat(39)
    conv.add_user_turn(Turn(role=Role.USER, text="Turn 40: tell me one short tip about my trip to Lisbon, in two "
                                                 "sentences."))
    messages = conv.render(words, 1000, relevance)
    history = "".join(m.content for m in messages[1:-1])
    assert "Turn 8:" not in history and "Turn 36:" in history  # condensed out; its repeat is still there
    assert messages[-1].content.startswith("Turn 40:")  # nothing recalled


@pytest.mark.parametrize("relevance", [WordOverlap(), "minilm"])
def test_condensed_out_messages_that_repeat_each_other_are_recalled_once(relevance):
    if relevance == "minilm":
        relevance = MiniLMRelevance()
    conv = topic_chat(8)  # Lisbon in turns 4 and 8 only
    for i in range(30):
        conv.add_user_turn(Turn(role=Role.USER, text=FILLER[i % len(FILLER)]))
        conv.add_assistant_turn("Here is a short answer with a few words of advice for you. " * 2)
    conv.add_user_turn(Turn(role=Role.USER, text="What did I ask you about my trip to Lisbon?"))
    messages = conv.render(words, 600, relevance)
    assert "Lisbon" not in "".join(m.content for m in messages[1:-1])
    note = messages[-1].content
    recalled = note[note.index("Earlier messages related"):].splitlines()[1:]
    assert sum("Lisbon" in line for line in recalled if line.startswith("- The user said")) == 1, recalled


@pytest.mark.parametrize("relevance", [WordOverlap(), "minilm"])
def test_a_question_still_in_the_prompt_does_not_hide_the_condensed_out_answer(relevance):
    """The question scores high against the statement it asks about (MiniLM 0.69, word overlap 0.67), but below the
    cut-off for a repeat: the window asks it, only the condensed-out message says it."""
    if relevance == "minilm":
        relevance = MiniLMRelevance()
    note = TrackedState().render("Tell me my daughter's name again.", [Said("My daughter's name is Matilda.", 0)],
                                 words, 500, relevance, window=[Said("What is my daughter's name?", 30)])
    assert "Matilda" in note


def test_unrelated_condensed_out_messages_are_not_recalled():
    state = TrackedState()
    note = state.render("What time is it in Tokyo?", [Said(t, i) for i, t in enumerate(FILLER)], words, 500,
                        MiniLMRelevance())
    assert note == ""


def test_the_service_answers_from_the_tracked_state_with_a_tiny_model(tiny_causal_dir, tmp_path):
    generator = load_generator(str(tiny_causal_dir), max_context=1200)
    store = ConversationStore(tmp_path / "data")
    service = ChatService(MultimodalEncoder(store.media_dir), generator, store, GenerationSettings(8, temperature=0),
                          system_prompt="You are helpful.", relevance=WordOverlap())
    conv = service.new_conversation()
    list(service.respond("key:ana", conv, "My daughter's name is Matilda and she is seven."))
    for text in FILLER * 5:
        list(service.respond("key:ana", conv, text))
    conv.add_user_turn(Turn(role=Role.USER, text="What is my daughter's name?"))
    prompt = service.prompt(conv)
    assert sum(generator.count_tokens(m.content) for m in prompt) <= generator.prompt_budget(service.settings)
    assert "Matilda" not in "".join(m.content for m in prompt[:-1])  # condensed out of the history...
    assert "Your daughter's name is Matilda and she is seven." in prompt[-1].content  # ...but tracked
