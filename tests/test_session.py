"""ChatService: a turn end to end on a tiny model, bad input, stop, and abandoned streams."""

import pytest

from chatbot.decoder import GenerationSettings, load_generator
from chatbot.encoder import MultimodalEncoder
from chatbot.session import ChatService
from chatbot.state import Role


@pytest.fixture(scope="module")
def generator(tiny_causal_dir):
    gen = load_generator(str(tiny_causal_dir))
    gen.model.generation_config.suppress_tokens = gen.tokenizer.all_special_ids  # replies run to the limit
    return gen


@pytest.fixture
def service(generator, tmp_path):
    encoder = MultimodalEncoder(tmp_path / "media")  # no recogniser, no analyzers: text only
    return ChatService(encoder, generator, GenerationSettings(max_new_tokens=24, temperature=0))


def test_a_turn_adds_the_user_turn_then_streams_the_reply(service):
    conv = service.new_conversation()
    updates = list(service.respond(conv, "hello what is the name of my cat"))
    assert updates[0] == ""  # the user's turn is in the state before the reply starts
    assert all(b.startswith(a) for a, b in zip(updates[1:], updates[2:]))  # the reply only grows
    assert [t.role for t in conv.turns] == [Role.USER, Role.ASSISTANT]
    assert conv.turns[1].text == updates[-1].strip() and not conv.turns[1].interrupted
    assert conv.title == "hello what is the name of my cat"


def test_conversations_are_kept_apart_by_id(service):
    a, b = service.new_conversation(), service.new_conversation()
    list(service.respond(a, "about my cat"))
    assert service.conversation(a.id) is a and service.conversation(b.id) is b and not b.turns
    assert service.conversation("unknown-id").id not in (a.id, b.id)
    service.forget(a.id)
    assert service.conversation(a.id) is not a


@pytest.mark.parametrize("name, content, expected", [
    ("missing.png", None, "couldn't find"),
    ("empty.wav", b"", "empty"),
    ("voice.wav", b"RIFF" + bytes(64), "Voice messages are turned off"),
])
def test_bad_input_becomes_a_notice_and_keeps_the_conversation(service, tmp_path, name, content, expected):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    conv = service.new_conversation()
    list(service.respond(conv, "hello"))
    before = list(conv.turns)
    list(service.respond(conv, "look at this", [str(tmp_path / name)]))
    assert conv.turns[:2] == before
    user_notice, reply_notice = conv.turns[2:]
    assert user_notice.notice and reply_notice.notice and expected in reply_notice.text
    assert "look at this" in user_notice.text
    assert len(conv.render(len, 10_000)) == 3  # notices never reach the model


def test_empty_message_is_explained(service):
    conv = service.new_conversation()
    list(service.respond(conv, "   "))
    assert conv.turns[-1].notice and "Type a message" in conv.turns[-1].text


def test_stop_keeps_the_partial_reply_marked_interrupted(service):
    conv = service.new_conversation()
    settings = GenerationSettings(max_new_tokens=400, temperature=0)
    for reply in service.respond(conv, "tell me about the weather", settings=settings):
        if reply:
            assert service.stop(conv.id)
    last = conv.turns[-1]
    assert last.role is Role.ASSISTANT and last.interrupted
    assert not service.stop(conv.id)  # nothing left running


def test_a_closed_stream_still_records_the_partial_reply(service):
    conv = service.new_conversation()
    stream = service.respond(conv, "tell me about the weather", settings=GenerationSettings(max_new_tokens=400))
    next(stream)
    next(stream)
    stream.close()  # the browser went away mid-reply
    assert conv.turns[-1].role is Role.ASSISTANT and conv.turns[-1].interrupted
    list(service.respond(conv, "and tomorrow?"))  # the conversation goes on
    assert conv.turns[-1].role is Role.ASSISTANT and not conv.turns[-1].interrupted
