"""The dialogue state: turns, attachment numbering, rendering within a budget, JSON."""

from chatbot.state import (
    DEFAULT_SYSTEM_PROMPT,
    Attachment,
    AttachmentKind,
    Conversation,
    Observation,
    Role,
    Turn,
)


def words(text: str) -> int:
    """A stand-in tokenizer: one token per word."""
    return len(text.split())


def photo_turn(text: str, sha: str, ocr: str) -> Turn:
    photo = Attachment(kind=AttachmentKind.IMAGE, path=f"/media/{sha}.png", sha256=sha, name=f"{sha}.png")
    return Turn(role=Role.USER, text=text, attachments=[photo],
                observations=[Observation(kind="ocr", text=f'the text in it says "{ocr}"', attachment=sha, source="ocr")])


def chat(n_exchanges: int, first: Turn | None = None) -> Conversation:
    conv = Conversation()
    if first:
        conv.add_user_turn(first)
        conv.add_assistant_turn("Noted.")
    for i in range(n_exchanges):
        conv.add_user_turn(Turn(role=Role.USER, text=f"message number {i} " + "filler " * 20))
        conv.add_assistant_turn(f"reply number {i} " + "words " * 20)
    return conv


def test_turns_keep_roles_order_and_number_attachments_per_kind():
    conv = Conversation()
    conv.add_user_turn(photo_turn("look", "a" * 64, "STOP"))
    conv.add_assistant_turn("A stop sign.")
    voice = Attachment(kind="audio", path="/m/v.wav", sha256="c" * 64, name="audio.wav")
    conv.add_user_turn(Turn(role="user", attachments=[voice, Attachment(kind="image", path="/m/b.png", sha256="b" * 64)]))
    labels = [a.label for a in conv.attachments()]
    assert labels == ["Photo 1", "Recording 1", "Photo 2"]
    assert [t.role for t in conv.turns] == [Role.USER, Role.ASSISTANT, Role.USER]
    assert conv.title == "look"


def test_render_puts_system_prompt_first_and_attachment_notes_in_the_turn():
    conv = Conversation()
    conv.add_user_turn(photo_turn("What does the sign say?", "a" * 64, "MAIN STREET"))
    messages = conv.render(words, budget=10_000)
    assert messages[0].role == "system" and messages[0].content == DEFAULT_SYSTEM_PROMPT
    assert messages[1].role == "user"
    assert "[Photo 1 (the user's first photo). What the image models found in it: " in messages[1].content
    assert "MAIN STREET" in messages[1].content
    assert messages[1].content.endswith("What does the sign say?")


def test_a_photos_file_name_never_reaches_the_model():
    # A photo named coffee.jpg made the model "see" coffee whatever the pixels showed.
    photo = Attachment(kind=AttachmentKind.IMAGE, path="/m/x.jpg", sha256="e" * 64, name="coffee.jpg")
    turn = Turn(role=Role.USER, text="What is this?", attachments=[photo], observations=[
        Observation(kind="labels", text="what it shows: probably a cat (91%)", attachment="e" * 64)])
    conv = Conversation()
    conv.add_user_turn(turn)
    content = conv.render(words, 10_000)[-1].content
    assert "coffee" not in content and "probably a cat (91%)" in content


def test_a_photo_with_nothing_recognised_says_the_models_cannot_tell():
    photo = Attachment(kind=AttachmentKind.IMAGE, path="/m/n.png", sha256="f" * 64, name="IMG_0001.png")
    turn = Turn(role=Role.USER, attachments=[photo], observations=[
        Observation(kind="facts", text="640×480 landscape photo, mostly green", attachment="f" * 64)])
    conv = Conversation()
    conv.add_user_turn(turn)
    assert conv.render(words, 10_000)[-1].content == \
        "[Photo 1 (the user's first photo). The image models could not tell what it shows]"


def test_voice_turn_renders_transcript_as_the_users_words():
    clip = Attachment(kind="audio", path="/m/v.wav", sha256="d" * 64, name="audio.wav")
    turn = Turn(role="user", attachments=[clip], observations=[
        Observation(kind="transcript", text="What is the capital of France?", attachment="d" * 64)])
    conv = Conversation()
    conv.add_user_turn(turn)
    content = conv.render(words, 10_000)[-1].content
    assert content == "[Recording 1: a voice message]\nWhat is the capital of France?"


def test_render_fits_budget_and_keeps_system_prompt_and_current_turn():
    conv = chat(30)
    conv.add_user_turn(Turn(role="user", text="the current question"))
    budget = 400
    messages = conv.render(words, budget)
    total = sum(words(m.content) + 6 for m in messages)
    assert total <= budget
    assert messages[0].content.startswith(DEFAULT_SYSTEM_PROMPT)
    assert messages[-1].content == "the current question"
    assert messages[1].role == "user"  # the window starts on a question, not a dangling reply
    assert len(messages) < 61


def test_dropped_turns_are_condensed_and_attachment_facts_survive():
    conv = chat(30, first=photo_turn("Here is my photo", "e" * 64, "OPEN 9 TO 5"))
    messages = conv.render(words, budget=500)
    system = messages[0].content
    assert "Earlier in this conversation (condensed)" in system
    assert "OPEN 9 TO 5" in system and "Photo 1" in system
    assert all("Here is my photo" != m.content for m in messages[1:])


def test_newest_words_of_dropped_turns_are_kept_first():
    conv = chat(30)
    system = conv.render(words, budget=500)[0].content
    kept = [n for n in range(30) if f"message number {n} " in system]
    assert kept, "some of the dropped user words should be condensed into the note"
    assert kept == list(range(kept[0], kept[-1] + 1)) and kept[-1] < 29


def test_current_turn_longer_than_the_budget_keeps_its_start_and_end():
    conv = chat(3)
    conv.add_user_turn(Turn(role="user", text="Please summarise: " + "word " * 3000 + "What is it about?"))
    messages = conv.render(words, budget=400)
    assert sum(words(m.content) + 6 for m in messages) <= 400  # 6: the per-message overhead render counts
    newest = messages[-1].content
    assert "Please summarise: word" in newest and newest.endswith("What is it about?")
    assert "characters left out" in newest and words(newest) > 50  # what the note and system prompt leave


def test_notice_turns_are_shown_but_never_rendered():
    conv = chat(1)
    conv.turns.append(Turn(role="user", text="📎 broken.jpg", notice=True))
    conv.turns.append(Turn(role="assistant", text="That file is not an image.", notice=True))
    assert all("broken.jpg" not in m.content and "not an image" not in m.content
               for m in conv.render(words, 10_000))


def test_json_round_trip_is_lossless():
    conv = chat(2, first=photo_turn("sign", "f" * 64, "EXIT"))
    conv.add_assistant_turn("partial answ", interrupted=True)
    again = Conversation.from_json(conv.to_json())
    assert again == conv
    assert again.to_json() == conv.to_json()
    assert isinstance(again.turns[0].attachments[0].kind, AttachmentKind)
    assert again.turns[-1].interrupted


def test_rendered_prefix_stays_stable_for_many_turns_so_caches_can_be_reused():
    conv, budget, renders = Conversation(), 600, []
    for i in range(60):
        conv.add_user_turn(Turn(role="user", text=f"question {i} " + "filler " * 15))
        renders.append(conv.render(words, budget))
        conv.add_assistant_turn(f"answer {i} " + "words " * 15)
    assert all(sum(words(m.content) + 6 for m in r) <= budget for r in renders)
    # A render "extends" the previous one when the previous messages (minus the current question) are its prefix.
    extends = [now[:len(before) - 1] == before[:-1] for before, now in zip(renders, renders[1:])]
    assert sum(extends) >= 0.75 * len(extends)
    assert not all(extends)  # the window did move: the budget was exceeded


def test_the_moved_window_can_be_read_ahead_in_the_turns_before_it_moves():
    conv, budget = Conversation(), 600
    previous, ahead, moves = None, [], 0
    for i in range(60):
        conv.add_user_turn(Turn(role="user", text=f"question {i} " + "filler " * 15))
        now = conv.render(words, budget)
        if previous is not None and now[:len(previous) - 1] != previous[:-1]:  # the window moved
            moves += 1
            # Read ahead after the last reply, the new prompt's start was already known (and could be in a cache).
            assert ahead[-1] is not None and now[:len(ahead[-1])] == ahead[-1]
        previous = now
        conv.add_assistant_turn(f"answer {i} " + "words " * 15)
        ahead.append(conv.render_ahead(words, budget))
    assert moves >= 2
    # Only when a move is a few turns away: most turns cost no extra reading.
    assert ahead[:5] == [None] * 5
    assert sum(a is None for a in ahead) >= len(ahead) / 3
