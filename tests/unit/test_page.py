"""The page's handlers called as Gradio calls them (no server), over a real service on each backend:
the tiny transformers model and the canned generator (whose replies stream many readable pieces)."""

import json
import threading
import time
from pathlib import Path

import gradio as gr
import pytest

from chatbot.config import Config
from chatbot.conversation.owners import ChatSession
from chatbot.conversation.service import ChatService
from chatbot.conversation.store import ConversationStore
from chatbot.generation.base import GenerationSettings, LoadingGenerator, load_generator
from chatbot.perception.encoder import MultimodalEncoder
from chatbot.state import Attachment, AttachmentKind, Conversation, Observation, ObservationKind, Role, Turn
from chatbot.web.page import FINISHED, MIC_ICON, ChatPage, chat_messages, paced
from tests.support import canned  # also registers the `canned` backend

API = {"chat", "continue", "stop", "retry", "undo", "edit", "clear", "new_chat", "conversations", "open", "rename", "delete",
       "export", "import", "use_key", "search"}
TAB = gr.Request(username=None, session_hash="tab-1")
OTHER_TAB = gr.Request(username=None, session_hash="tab-2")


@pytest.fixture(scope="module", params=["transformers", "canned"])
def generator(request, tiny_causal_dir):
    gen = load_generator(Config(text_backend=request.param, text_model=str(tiny_causal_dir), quantize="none"))
    if request.param == "transformers":
        gen.model.generation_config.suppress_tokens = gen.tokenizer.all_special_ids  # replies run to the limit
    return gen


def make_page(generator, tmp_path):
    store = ConversationStore(tmp_path / "data")
    service = ChatService(MultimodalEncoder(store.media_dir), generator, store,
                          GenerationSettings(max_new_tokens=12, temperature=0))
    return ChatPage(service, "s" * 32)


@pytest.fixture
def page(generator, tmp_path):
    return make_page(generator, tmp_path)


def send(page, session, text, request=TAB):
    """One turn through the `/chat` handler; every update it streamed, and the session it ends in."""
    updates = list(page.respond({"text": text, "files": []}, session, request))
    return [u[0] for u in updates], updates[-1][2]


def words(message: dict) -> str:
    content = message["content"]
    return content if isinstance(content, str) else " ".join(p for p in content if isinstance(p, str))


def test_every_api_endpoint_is_named():
    class Idle:  # build() only needs these two from a service
        def end_session(self, session): ...
        def conversations(self, owner): return []

    demo = ChatPage(Idle(), "s" * 32).build()
    assert API <= {f.api_name for f in demo.fns.values()}
    # The page says in words what it waits for; Gradio's own timer overlay ("0.3s", in a grey too
    # faint to read, flagged by axe as it opened) is shown by no event.
    shown = [f.name for f in demo.fns.values() if f.fn is not None and f.show_progress != "hidden"]
    assert not shown, shown


def test_opening_the_page_leaves_the_status_line_to_a_message_sent_meanwhile():
    class Idle:  # build() only needs these two from a service
        def end_session(self, session): ...
        def conversations(self, owner): return []

    demo = ChatPage(Idle(), "s" * 32).build()
    status = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "reply-status")
    on_load = [f for f in demo.fns.values() if f.name in ("on_load", "after_load")]
    assert len(on_load) == 2 and all(status not in f.outputs for f in on_load)  # "Thinking…" was blanked in CI


def test_a_turn_streams_copies_then_ends_with_what_is_stored(tmp_path):
    page = make_page(canned.CannedGenerator(), tmp_path)
    chats, session = send(page, ChatSession(), "hello what is the name of my cat")
    assert [m["role"] for m in chats[0]] == ["user"]  # the question shows before the reply starts
    assert len(chats) > 3 and all(len(c) == 2 for c in chats[1:])
    replies = [words(c[1]) for c in chats[1:]]
    assert all(b.startswith(a) for a, b in zip(replies, replies[1:]))  # the reply only grows
    assert chats[1] is not chats[2] and chats[1][0] is chats[2][0]  # one copy of the history, new lists
    assert words(chats[1][1]) != words(chats[-1][1])  # an early update is not changed by later tokens
    stored = page.service.open(session.owner, session.conversation_id)
    assert chats[-1] == chat_messages(stored)


def test_a_streamed_reply_is_paced_but_shows_its_first_words_and_its_end_at_once():
    now = [0.0]

    def replies():  # (seconds after the last, value): stored turn, first words, tokens 30 ms apart
        for wait, value in [(0, ""), (0.4, "A"), (0.03, "A b"), (0.03, "A b c"), (0.03, "A b c d"),
                            (0.03, "A b c d e"), (0.5, "A b c d e f"), (0.03, "A b c d e f g")]:
            now[0] += wait
            yield value

    shown = list(paced(replies(), every=0.1, clock=lambda: now[0]))
    assert shown == ["", "A", "A b c d e", "A b c d e f", "A b c d e f g"]


def test_the_page_sends_a_fast_reply_in_a_few_updates(tmp_path):
    store = ConversationStore(tmp_path / "data")
    service = ChatService(MultimodalEncoder(store.media_dir), canned.CannedGenerator(), store,
                          GenerationSettings(max_new_tokens=12, temperature=0))
    page = ChatPage(service, "s" * 32, update_every=60)  # longer than the reply: only its first words and its end
    chats, _ = send(page, ChatSession(), "hello what is the name of my cat")
    replies = [words(c[1]) for c in chats[1:]]
    assert len(replies) == 3 and len(replies[0].split()) == 1 and replies[2].startswith(replies[1]), replies


def test_the_box_is_locked_while_replying_and_freed_at_the_end(page):
    updates = list(page.respond({"text": "hello cat", "files": []}, ChatSession(), TAB))
    assert all(u[1].interactive is False for u in updates[:-1])
    assert updates[-1][1].interactive is True


def test_retry_edit_undo_clear(page):
    _, session = send(page, ChatSession(), "hello cat")
    _, session = send(page, session, "tell me about the dog")
    chat = list(page.regenerate(session, TAB))[-1][0]
    assert [m["role"] for m in chat] == ["user", "assistant"] * 2
    chat = list(page.edit(2, "tell me about the weather", session, TAB))[-1][0]
    assert words(chat[2]) == "tell me about the weather" and len(chat) == 4
    with pytest.raises(gr.Error, match="no such message"):
        list(page.edit(9, "nope", session, TAB))
    chat, session = page.undo(session, TAB)
    assert [words(m) for m in chat if m["role"] == "user"] == ["hello cat"]
    chat, box, session = page.clear(session, TAB)
    assert chat == [] and page.list_conversations(session, TAB) == []


def test_conversations_open_rename_delete_and_stay_private(page):
    _, first = send(page, ChatSession(), "hello cat")
    chat, _, fresh = page.new_chat(first, TAB)
    assert chat == [] and fresh.conversation_id is None
    _, second = send(page, fresh, "about the weather")
    assert [c["title"] for c in page.list_conversations(second, TAB)] == ["about the weather", "hello cat"]
    chat, opened = page.open_conversation(first.conversation_id, second, TAB)
    assert words(chat[0]) == "hello cat" and opened.conversation_id == first.conversation_id
    page.rename("My cat", opened, TAB)
    radio, title = page.sidebar(opened, TAB)
    assert title.value == "My cat" and radio.value == first.conversation_id
    with pytest.raises(gr.Error, match="does not exist"):
        page.open_conversation(first.conversation_id, ChatSession(), OTHER_TAB)
    assert page.list_conversations(ChatSession(), OTHER_TAB) == []
    with pytest.raises(gr.Error, match="nothing to delete"):
        page.ask_delete(ChatSession(), TAB)
    question, text = page.ask_delete(opened, TAB)
    assert question.visible and "My cat" in text.value and len(page.list_conversations(opened, TAB)) == 2
    chat, _, after = page.delete(opened, TAB)
    assert chat == [] and after.conversation_id is None
    assert [c["title"] for c in page.list_conversations(after, TAB)] == ["about the weather"]


def test_export_then_import_under_another_key(page):
    with pytest.raises(gr.Error, match="empty"):
        page.export(ChatSession(), TAB)
    _, session = send(page, ChatSession(), "hello cat")
    path = page.export(session, TAB)
    assert Path(path).name == f"hello-cat-{time.strftime('%Y-%m-%d')}.json"
    assert json.loads(open(path, encoding="utf-8").read())["conversation"]["title"] == "hello cat"
    other, listed = page.use_key("another-long-owner-key", OTHER_TAB)
    assert listed == []
    chat, imported = page.import_conversation(path, other, OTHER_TAB)
    assert words(chat[0]) == "hello cat" and imported.owner == other.owner
    with pytest.raises(gr.Error, match="Choose"):
        page.import_conversation(None, other, OTHER_TAB)


def test_load_gives_a_browser_a_key_and_keeps_a_good_one(page):
    session, key, chat = page.on_load(None, None, TAB)
    assert len(key) >= 16 and session.owner.startswith("key:") and chat == [] and session.conversation_id is None
    again, same_key, _ = page.on_load(key, None, TAB)
    assert same_key == key and again.owner == session.owner


def test_a_reload_reopens_the_conversation_in_use(page):
    key = "a-browser-key-0123456789"
    owner, _ = page.use_key(key, TAB)
    _, first = send(page, owner, "hello cat")
    _, second = send(page, page.new_chat(first, TAB)[2], "tell me about the weather")
    _, opened = page.open_conversation(first.conversation_id, second, TAB)
    *_, last = page.after_change(opened, "", TAB)  # what the browser keeps for the next load
    assert last == first.conversation_id
    session, _, chat = page.on_load(key, last, TAB)
    assert session.conversation_id == first.conversation_id and words(chat[0]) == "hello cat"
    # Nothing kept (or a conversation that is gone, or someone else's): the most recently changed one.
    _, stranger = send(page, ChatSession(), "a stranger's chat", OTHER_TAB)
    for kept in (None, "no-such-id", stranger.conversation_id):
        session, _, chat = page.on_load(key, kept, TAB)
        assert session.conversation_id == second.conversation_id and words(chat[0]) == "tell me about the weather"
    session, _, chat = page.on_load("another-browser-key-0123", first.conversation_id, TAB)
    assert session.conversation_id is None and chat == []  # another owner's id opens nothing


def test_search_and_dates_in_the_side_panel(page):
    _, first = send(page, ChatSession(), "hello cat")
    _, second = send(page, page.new_chat(first, TAB)[2], "tell me about the weather")
    radio, _ = page.sidebar(second, TAB)
    assert [label for label, _ in radio.choices] == ["tell me about the weather · Today", "hello cat · Today"]
    radio, _ = page.sidebar(second, TAB, "CAT")
    assert radio.choices == [("hello cat · Today", first.conversation_id)] and radio.value is None
    assert page.conversation_list(first, TAB, '"cat* -(').choices == radio.choices  # syntax is not an error
    assert page.conversation_list(first, TAB, "zebra").choices == []
    assert [c["id"] for c in page.search_conversations("weather", second, TAB)] == [second.conversation_id]
    assert page.search_conversations("weather", ChatSession(), OTHER_TAB) == []  # only the owner's own
    radio, *_ = page.after_change(second, "cat", TAB)  # a refresh keeps the search
    assert [cid for _, cid in radio.choices] == [first.conversation_id]


def test_a_new_chat_leaves_the_title_box_to_the_person(page):
    _, first = send(page, ChatSession(), "hello cat")
    assert page.sidebar(first, TAB)[1].value == "hello cat"
    fresh = page.new_chat(first, TAB)[2]
    assert page.sidebar(fresh, TAB)[1] is gr.skip() or isinstance(page.sidebar(fresh, TAB)[1], type(gr.skip()))


def test_a_sent_message_shows_at_once_with_what_it_waits_for(page):
    with pytest.raises(gr.Error, match="Type a message"):
        page.accept({"text": "  ", "files": []}, ChatSession(), TAB)  # no empty conversations
    assert page.list_conversations(ChatSession(), TAB) == []
    chat, box, pending, status, _ = page.accept({"text": "hello cat", "files": []}, ChatSession(), TAB)
    assert chat == [{"role": "user", "content": ["hello cat"]}] and box.interactive is False and box.stop_btn
    assert pending.message["text"] == "hello cat" and "Thinking…" in status.value
    stream = page.respond({"text": "tell me about the weather", "files": []}, ChatSession(), OTHER_TAB)
    next(stream)
    next(stream)  # another user's reply is being written
    assert "Waiting for 1 other reply to finish…" in page.accept({"text": "hi", "files": []}, ChatSession(), TAB)[3].value
    stream.close()


def test_a_waiting_message_is_answered_in_the_conversation_it_was_sent_in(page):
    _, first = send(page, ChatSession(), "hello cat")
    accepted = page.accept({"text": "what is my cat called", "files": []}, first, TAB)[2]
    page.new_chat(first, TAB)  # the person moves on while the message waits for the model
    updates = list(page.respond_accepted(accepted, TAB))
    assert updates[-1][2].conversation_id == first.conversation_id
    assert len(page.service.open(first.owner, first.conversation_id).turns) == 4
    assert len(page.list_conversations(first, TAB)) == 1


def test_a_recording_that_must_load_the_speech_model_says_so(generator, tmp_path):
    from chatbot.perception.speech import OnDemandRecognizer

    page = make_page(generator, tmp_path)
    page.service.encoder.recognizer = OnDemandRecognizer("whisper-tiny.en")  # not loaded until a recording comes
    recording = str(Path(__file__).resolve().parents[1] / "data" / "capital_of_france.wav")
    status = page.accept({"text": "", "files": [recording]}, ChatSession(), TAB)[3].value
    assert "Loading the speech model first" in status
    assert "Thinking…" in page.accept({"text": "hi", "files": []}, ChatSession(), OTHER_TAB)[3].value


def slow_to_load(generator, loaded: threading.Event) -> LoadingGenerator:
    """`generator` behind a load that ends only once `loaded` is set, loading in a thread as the app does."""
    slow = LoadingGenerator(lambda: loaded.wait(30) and generator)
    threading.Thread(target=slow.load, daemon=True).start()
    return slow


def test_a_message_sent_while_the_text_model_loads_waits_and_is_answered(generator, tmp_path):
    loaded = threading.Event()
    page = make_page(slow_to_load(generator, loaded), tmp_path)
    status = page.accept({"text": "hello cat", "files": []}, ChatSession(), TAB)[3].value
    assert "Loading the text model first" in status
    stream = page.respond({"text": "hello cat", "files": []}, ChatSession(), TAB)
    shown, _, session = next(stream)  # the message is in and stored; its reply waits for the model
    assert words(shown[-1]) == "hello cat" and not page.service.generator.ready
    assert [t.role for t in page.service.open(session.owner, session.conversation_id).turns] == [Role.USER]
    threading.Timer(0.2, loaded.set).start()
    *_, (chat, _, session) = stream
    assert [m["role"] for m in chat] == ["user", "assistant"] and words(chat[-1]).strip()
    turns = page.service.open(session.owner, session.conversation_id).turns
    assert [t.role for t in turns] == [Role.USER, Role.ASSISTANT] and not turns[1].notice
    assert "Thinking…" in page.accept({"text": "hi", "files": []}, session, TAB)[3].value


def test_a_text_model_that_fails_to_load_answers_with_why_and_keeps_the_message(tmp_path):
    def broken():
        raise OSError("model.safetensors is truncated")

    failing = LoadingGenerator(broken)
    page = make_page(failing, tmp_path)
    threading.Thread(target=failing.load).start()
    chats, session = send(page, ChatSession(), "hello cat")
    turns = page.service.open(session.owner, session.conversation_id).turns
    assert turns[0].text == "hello cat" and turns[-1].notice and "could not be loaded" in turns[-1].text
    assert "model.safetensors is truncated" in words(chats[-1][-1])


def test_a_cut_reply_offers_continue_until_continued(page):
    page.service.settings = GenerationSettings(max_new_tokens=4, temperature=0)
    chats, session = send(page, ChatSession(), "tell me about the weather today")
    assert "cut short" in words(chats[-1][-1])
    _, _, status, continue_btn, _, _, last, box = page.after_reply(session, "", TAB)
    assert continue_btn.visible and FINISHED in status.value and box.interactive and last == session.conversation_id
    before = words(chats[-1][-1]).split("\n")[0]
    updates = list(page.continue_reply(session, TAB))
    assert all(len(u[0]) == 2 for u in updates)  # the reply grows in place; no new message
    assert words(updates[-1][0][1]).startswith(before)
    with pytest.raises(gr.Error, match="no unfinished reply"):
        list(page.continue_reply(ChatSession(), TAB))


def test_a_new_chat_can_be_named_before_its_first_message(page):
    session = page.rename("  Weekend   plans ", ChatSession(), TAB)
    assert page.list_conversations(session, TAB) == []  # still no empty conversation
    assert page.sidebar(session, TAB)[1].value == "Weekend plans"
    _, session = send(page, session, "hello cat")
    assert [c["title"] for c in page.list_conversations(session, TAB)] == ["Weekend plans"]
    with pytest.raises(gr.Error, match="needs a title"):
        page.rename("   ", ChatSession(), TAB)


def test_a_user_error_is_one_log_line_and_no_traceback(page, caplog):
    with caplog.at_level("INFO", logger="chatbot.web.page"), pytest.raises(gr.Error) as raised:
        page.accept({"text": "", "files": []}, ChatSession(), TAB)
    assert not raised.value.print_exception
    assert [r.getMessage() for r in caplog.records] == ["accept: Type a message, attach a photo or record your voice first."]


def test_recordings_and_refused_files_are_marked_with_icons_not_emoji(tmp_path):
    conv = Conversation()
    wav = tmp_path / "voice.wav"
    wav.write_bytes(b"RIFF")
    conv.add_user_turn(Turn(role=Role.USER, attachments=[Attachment(AttachmentKind.AUDIO, str(wav), "0" * 64, "voice.wav")],
                            observations=[Observation(ObservationKind.TRANSCRIPT, "hello there", "0" * 64, "whisper")]))
    conv.add_assistant_turn("Hi!")
    conv.turns += [Turn(role=Role.USER, text="📎 broken.jpg\n📎 other.png", notice=True),
                   Turn(role=Role.ASSISTANT, text="That file is not a photo.", notice=True)]
    shown = json.dumps(chat_messages(conv), ensure_ascii=False)
    assert "🎤" not in shown and "📎" not in shown
    assert f"{MIC_ICON} *hello there*" in shown.replace('\\"', '"')
    assert shown.count("chat-icon-file") == 2
