"""ChatService: a turn end to end, bad input, stop, abandoned streams, chat controls, ownership and
durability (every change is in the store when the call returns). Every test runs on each registered
backend: a tiny transformers model and the model-free canned generator."""

import pytest
from PIL import Image

from chatbot.config import Config
from chatbot.conversation.owners import resolve_owner
from chatbot.conversation.service import ChatService, IncomingMessage
from chatbot.conversation.store import ConversationNotFound, ConversationStore
from chatbot.errors import UserFacingError
from chatbot.generation.base import GenerationSettings, ReplyGenerator, load_generator
from chatbot.perception.encoder import MultimodalEncoder
from chatbot.state import Role
from tests.support import canned  # also registers the `canned` backend

ANA, BEN = "key:ana", "key:ben"
LONG = GenerationSettings(max_new_tokens=400, temperature=0)


@pytest.fixture(scope="module", params=["transformers", "canned"])
def generator(request, tiny_causal_dir):
    """Chosen through the registry, as app.py chooses."""
    gen = load_generator(Config(text_backend=request.param, text_model=str(tiny_causal_dir), quantize="none"))
    assert isinstance(gen, ReplyGenerator)
    if request.param == "transformers":
        gen.model.generation_config.suppress_tokens = gen.tokenizer.all_special_ids  # replies run to the limit
    return gen


@pytest.fixture
def store(tmp_path):
    return ConversationStore(tmp_path / "data")


@pytest.fixture
def service(generator, store):
    encoder = MultimodalEncoder(store.media_dir)  # no recogniser, no analyzers: text only
    return ChatService(encoder, generator, store, GenerationSettings(max_new_tokens=24, temperature=0))


def said(service, owner, conv, text, **kwargs):
    return list(service.respond(owner, conv, text, **kwargs))


def test_a_turn_adds_the_user_turn_then_streams_the_reply(service, store):
    conv = service.new_conversation()
    updates = said(service, ANA, conv, "hello what is the name of my cat")
    assert updates[0] == ""  # the user's turn is in the state before the reply starts
    assert all(b.startswith(a) for a, b in zip(updates[1:], updates[2:]))  # the reply only grows
    assert [t.role for t in conv.turns] == [Role.USER, Role.ASSISTANT]
    assert conv.turns[1].text == updates[-1].strip() and not conv.turns[1].interrupted
    assert conv.title == "hello what is the name of my cat"
    assert store.load(ANA, conv.id) == conv  # durable the moment the reply finished


def test_the_user_turn_is_stored_before_the_reply_starts(service, store):
    conv = service.new_conversation()
    stream = service.respond(ANA, conv, "hello cat")
    assert next(stream) == ""
    stored = store.load(ANA, conv.id)
    assert [t.text for t in stored.turns] == ["hello cat"]
    stream.close()


def test_owners_never_see_each_others_conversations(service):
    a = service.new_conversation()
    said(service, ANA, a, "about my cat")
    assert service.conversation(ANA, a.id) == a
    assert service.conversation(BEN, a.id).id != a.id  # someone else's id opens a fresh conversation
    with pytest.raises(ConversationNotFound):
        service.open(BEN, a.id)
    with pytest.raises(ConversationNotFound):
        service.rename(BEN, a.id, "mine now")
    assert not service.delete(BEN, a.id)
    assert [c.id for c in service.conversations(ANA)] == [a.id] and service.conversations(BEN) == []
    with pytest.raises(ConversationNotFound):
        service.export_json(BEN, a.id)


def test_owner_keys_are_hashed_and_must_be_long():
    assert resolve_owner(user="ana", key="k" * 20) == "user:ana"
    owner = resolve_owner(key="a-long-enough-secret-key")
    assert owner.startswith("key:") and "secret" not in owner
    assert resolve_owner(session_hash="abc") == "session:abc"
    with pytest.raises(UserFacingError):
        resolve_owner(key="short")


@pytest.mark.parametrize("name, content, expected", [
    ("missing.png", None, "couldn't find"),
    ("empty.wav", b"", "empty"),
    ("voice.wav", b"RIFF" + bytes(4) + b"WAVE" + bytes(56), "Voice messages are turned off"),
    ("page.png", b"<html><script>alert(1)</script>", "not an image, recording or PDF"),
])
def test_bad_input_becomes_a_notice_and_keeps_the_conversation(service, store, tmp_path, name, content, expected):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    conv = service.new_conversation()
    said(service, ANA, conv, "hello")
    before = list(conv.turns)
    said(service, ANA, conv, "look at this", files=[str(tmp_path / name)])
    assert conv.turns[:2] == before
    user_notice, reply_notice = conv.turns[2:]
    assert user_notice.notice and reply_notice.notice and expected in reply_notice.text
    assert "look at this" in user_notice.text
    assert len(conv.render(len, 10_000)) == 3  # notices never reach the model
    assert store.load(ANA, conv.id) == conv


def test_empty_message_is_explained(service):
    conv = service.new_conversation()
    said(service, ANA, conv, "   ")
    assert conv.turns[-1].notice and "Type a message" in conv.turns[-1].text


def test_stop_keeps_the_partial_reply_marked_interrupted(service, store):
    conv = service.new_conversation()
    for reply in service.respond(ANA, conv, "tell me about the weather", settings=LONG):
        if reply:
            assert not service.stop(BEN, conv.id)  # only the owner can stop it
            assert service.stop(ANA, conv.id)
    last = conv.turns[-1]
    assert last.role is Role.ASSISTANT and last.interrupted
    assert not service.stop(ANA, conv.id)  # nothing left running
    assert store.load(ANA, conv.id).turns[-1].interrupted


def test_a_closed_stream_still_records_the_partial_reply(service, store):
    conv = service.new_conversation()
    stream = service.respond(ANA, conv, "tell me about the weather", settings=LONG)
    next(stream)
    next(stream)
    stream.close()  # the browser went away mid-reply
    assert conv.turns[-1].role is Role.ASSISTANT and conv.turns[-1].interrupted
    said(service, ANA, conv, "and tomorrow?")  # the conversation goes on
    assert conv.turns[-1].role is Role.ASSISTANT and not conv.turns[-1].interrupted
    assert store.load(ANA, conv.id) == conv


def test_regenerate_replaces_only_the_last_reply(service, store):
    conv = service.new_conversation()
    said(service, ANA, conv, "hello cat")
    said(service, ANA, conv, "tell me about the dog")
    first_two = conv.turns[:3]
    old_reply = conv.turns[3]
    updates = list(service.regenerate(ANA, conv))
    assert updates[0] == "" and conv.turns[:3] == first_two
    assert len(conv.turns) == 4 and conv.turns[3].id != old_reply.id and conv.turns[3].role is Role.ASSISTANT
    assert store.load(ANA, conv.id) == conv


def test_undo_removes_the_last_exchange_and_an_emptied_conversation_is_dropped(service, store):
    conv = service.new_conversation()
    said(service, ANA, conv, "hello cat")
    said(service, ANA, conv, "tell me about the dog")
    assert service.undo(ANA, conv)
    assert [t.text for t in conv.turns if t.role is Role.USER] == ["hello cat"]
    assert store.load(ANA, conv.id) == conv
    assert service.undo(ANA, conv) and conv.turns == []
    assert service.conversations(ANA) == []
    assert not service.undo(ANA, conv)


def test_edit_changes_a_past_message_and_continues_from_there(service, store):
    conv = service.new_conversation()
    said(service, ANA, conv, "hello cat")
    said(service, ANA, conv, "tell me about the dog")
    said(service, ANA, conv, "and the weather")
    first = conv.turns[0]
    updates = list(service.edit(ANA, conv, conv.turns[2].id, "tell me about the photo"))
    assert updates[0] == ""
    assert [t.text for t in conv.turns if t.role is Role.USER] == ["hello cat", "tell me about the photo"]
    assert conv.turns[0] == first and len(conv.turns) == 4 and conv.turns[3].text == updates[-1].strip()
    assert store.load(ANA, conv.id) == conv
    with pytest.raises(UserFacingError):
        list(service.edit(ANA, conv, conv.turns[3].id, "the model never said this"))


def test_clear_empties_and_forgets_the_conversation(service):
    conv = service.new_conversation()
    said(service, ANA, conv, "hello cat")
    service.clear(ANA, conv)
    assert conv.turns == [] and service.conversations(ANA) == []
    said(service, ANA, conv, "a fresh start")
    assert [c.title for c in service.conversations(ANA)] == ["a fresh start"]


def test_a_reply_finishing_after_its_question_was_undone_is_not_kept(service, store):
    conv = service.new_conversation()
    stream = service.respond(ANA, conv, "hello cat", settings=LONG)
    next(stream)
    next(stream)
    service.undo(ANA, service.conversation(ANA, conv.id))  # e.g. from a second tab
    list(stream)
    assert service.conversations(ANA) == []


def test_rename_and_delete(service):
    conv = service.new_conversation()
    said(service, ANA, conv, "hello cat")
    service.rename(ANA, conv.id, "  My   cat  ")
    assert service.open(ANA, conv.id).title == "My cat"
    with pytest.raises(UserFacingError):
        service.rename(ANA, conv.id, "   ")
    assert service.delete(ANA, conv.id) and service.conversations(ANA) == []


def test_a_reply_cut_off_by_a_crash_is_marked_interrupted_at_the_next_start(service, generator, store):
    conv = service.new_conversation()
    said(service, ANA, conv, "hello cat")
    stream = service.respond(ANA, conv, "and the dog", settings=LONG)
    next(stream)  # the question is stored; the process "dies" before the reply is
    restarted = ChatService(service.encoder, generator, ConversationStore(store.data_dir))
    stored = restarted.open(ANA, conv.id)
    assert [t.role for t in stored.turns] == [Role.USER, Role.ASSISTANT] * 2
    assert stored.turns[-1].interrupted and stored.turns[-1].text == ""
    assert stored.turns[-2].text == "and the dog"
    list(restarted.regenerate(ANA, stored))
    assert not restarted.open(ANA, conv.id).turns[-1].interrupted


SHORT = GenerationSettings(max_new_tokens=4, temperature=0)


def test_a_reply_cut_at_the_token_limit_is_marked_and_can_be_continued(service, store):
    conv = service.new_conversation()
    said(service, ANA, conv, "tell me about the weather today", settings=SHORT)
    cut = conv.turns[-1]
    assert cut.cut and not cut.interrupted and store.load(ANA, conv.id).turns[-1].cut
    first = cut.text
    updates = list(service.continue_reply(ANA, conv, settings=SHORT))
    assert updates[0] == first and all(u.startswith(first) for u in updates)
    assert len(conv.turns) == 2 and conv.turns[-1].id == cut.id  # the same reply, longer
    assert len(conv.turns[-1].text) > len(updates[0]) and conv.turns[-1].text == updates[-1].strip()
    assert store.load(ANA, conv.id) == conv
    said(service, ANA, conv, "and tomorrow?")
    with pytest.raises(UserFacingError, match="no unfinished reply"):
        list(service.continue_reply(ANA, service.new_conversation()))


def test_a_stopped_reply_can_be_continued_and_is_not_marked_cut(service, store):
    conv = service.new_conversation()
    for reply in service.respond(ANA, conv, "tell me about the weather", settings=LONG):
        if reply:
            service.stop(ANA, conv.id)
    assert conv.turns[-1].interrupted and not conv.turns[-1].cut
    list(service.continue_reply(ANA, conv, settings=SHORT))
    assert conv.turns[-1].cut and not conv.turns[-1].interrupted
    assert store.load(ANA, conv.id) == conv


def test_a_continued_reply_is_not_kept_if_the_conversation_moved_on(service, store):
    conv = service.new_conversation()
    said(service, ANA, conv, "hello cat", settings=SHORT)
    stream = service.continue_reply(ANA, conv, settings=SHORT)
    next(stream)
    service.undo(ANA, service.conversation(ANA, conv.id))  # e.g. from a second tab
    list(stream)
    assert service.conversations(ANA) == []


def test_a_reply_that_ends_by_itself_is_not_cut(store):
    service = ChatService(MultimodalEncoder(store.media_dir), canned.CannedGenerator(), store, LONG)
    conv = service.new_conversation()
    said(service, ANA, conv, "hello cat")
    assert conv.turns[-1].text == "thanks for your message about hello cat" and not conv.turns[-1].cut
    with pytest.raises(UserFacingError):
        list(service.continue_reply(ANA, conv))
# -- stateless clients (the OpenAI protocol sends the whole history every time) ------------------
def test_a_resent_history_continues_one_stored_conversation_without_encoding_again(service, store, tmp_path):
    photo = tmp_path / "p.png"
    Image.new("RGB", (40, 30), "red").save(photo)
    calls = []
    describe = service.encoder._describe_image
    service.encoder._describe_image = lambda path, **kw: calls.append(path) or describe(path, **kw)
    first = [IncomingMessage(Role.USER, "hello cat photo", (photo,))]
    answer = service.answer(ANA, first)
    reply = list(answer.replies)[-1].strip()
    assert answer.prompt_tokens > 0 and calls == [photo]
    service.encoder._cache.clear()  # another process: only the store remembers what the photo showed
    again = first + [IncomingMessage(Role.ASSISTANT, reply), IncomingMessage(Role.USER, "and the dog")]
    follow = service.answer(ANA, again)
    list(follow.replies)
    assert follow.conversation.id == answer.conversation.id and len(calls) == 1
    assert [t.text for t in store.load(ANA, answer.conversation.id).turns][2] == "and the dog"
    # An edited history is a branch: a new conversation, the old one untouched.
    edited = first + [IncomingMessage(Role.ASSISTANT, "something else"), IncomingMessage(Role.USER, "x")]
    branch = service.answer(ANA, edited)
    list(branch.replies)
    assert branch.conversation.id != answer.conversation.id and len(store.load(ANA, answer.conversation.id).turns) == 4
    with pytest.raises(UserFacingError):
        service.answer(ANA, again[:2])  # must end with the user's message


def test_a_stop_string_ends_the_reply_before_it_and_is_never_shown(service):
    full = list(service.answer(ANA, [IncomingMessage(Role.USER, "hello what is the name")]).replies)[-1].strip()
    stop = full.split()[len(full.split()) // 2]  # a word in the middle of the (deterministic) reply
    answer = service.answer(BEN, [IncomingMessage(Role.USER, "hello what is the name")],
                            GenerationSettings(max_new_tokens=24, temperature=0, stop=(stop,)))
    updates = list(answer.replies)
    assert updates[-1] == full[:full.index(stop)] and all(stop not in u for u in updates)
    assert not answer.conversation.turns[-1].interrupted
