"""ReplySpeaker: sentences spoken while the reply streams, one recording kept with the reply, other languages silent."""

import wave

import pytest

from chatbot.conversation.store import ConversationStore
from chatbot.voice.speaker import ReplySpeaker, TextLanguage
from chatbot.voice.tts import load_voice


@pytest.fixture(scope="module")
def voice():
    return load_voice()


@pytest.fixture(scope="module")
def language():
    return TextLanguage()


def _stream(speaker, conv_id, reply, step=4):
    for end in range(step, len(reply) + step, step):
        speaker.heard("ana", conv_id, reply[:end])
        yield end


def test_first_sentence_is_spoken_before_the_reply_ends(tmp_path, voice, language):
    speaker = ReplySpeaker(voice, ConversationStore(tmp_path), language)
    speaker.set_speaking("ana", True)
    reply = "Paris is the capital of France. It is known for the **Eiffel Tower** and for its museums."
    first_clip_at = next(end for end in _stream(speaker, "c1", reply) if speaker.current("c1").clips)
    assert first_clip_at < len(reply) * 0.6
    attachments = speaker.finished("ana", "c1", reply, interrupted=False)
    spoken = speaker.current("c1")
    assert [c.text for c in spoken.clips] == ["Paris is the capital of France.",
                                              "It is known for the Eiffel Tower and for its museums."]
    (attachment,) = attachments
    with wave.open(attachment.path) as f:  # the whole reply, stored in the media folder
        assert f.getnframes() / f.getframerate() == pytest.approx(sum(c.seconds for c in spoken.clips), abs=0.01)
    assert attachment.path.startswith(str(tmp_path))


def test_speaker_off_or_cancelled_says_nothing_more(tmp_path, voice, language):
    speaker = ReplySpeaker(voice, ConversationStore(tmp_path), language)
    reply = "Paris is the capital of France. It is known for the Eiffel Tower."
    list(_stream(speaker, "off", reply))  # "ana" has not turned the speaker on
    assert speaker.finished("ana", "off", reply, interrupted=False) == [] and speaker.current("off") is None
    speaker.set_speaking("ana", True)
    speaker.heard("ana", "c2", "Paris is the capital of France. It is")
    speaker.cancel("c2")
    speaker.heard("ana", "c2", reply)
    (attachment,) = speaker.finished("ana", "c2", reply, interrupted=True)  # what was said is kept
    assert [c.text for c in speaker.current("c2").clips] == ["Paris is the capital of France."]


def test_a_reply_in_a_language_without_a_voice_is_not_spoken(tmp_path, voice, language):
    speaker = ReplySpeaker(voice, ConversationStore(tmp_path), language)
    speaker.set_speaking("ana", True)
    reply = "La capitale de la France est Paris. Elle est connue pour la tour Eiffel et ses musées."
    list(_stream(speaker, "fr", reply))
    assert speaker.finished("ana", "fr", reply, interrupted=False) == []
    assert speaker.current("fr").silent_reason == "Not spoken: there is no voice for French here."


class _EnglishOnly(TextLanguage):
    """The tiny test model writes random tokens; treat them as English so they are spoken."""

    def __init__(self) -> None:
        pass

    def __call__(self, text: str) -> str:
        return "en"


def test_the_spoken_reply_is_kept_with_the_reply_and_never_sent_to_the_model(tmp_path, voice, tiny_causal_dir):
    from chatbot.conversation.service import ChatService
    from chatbot.generation.transformers_backend import GenerationSettings, load_generator
    from chatbot.perception.encoder import MultimodalEncoder
    from chatbot.state import AttachmentKind, Role

    store = ConversationStore(tmp_path / "data")
    speaker = ReplySpeaker(voice, store, _EnglishOnly())
    speaker.set_speaking("ana", True)
    service = ChatService(MultimodalEncoder(store.media_dir), load_generator(str(tiny_causal_dir)), store,
                          GenerationSettings(max_new_tokens=40, temperature=0), listener=speaker)
    conv = service.new_conversation()
    replies = list(service.respond("ana", conv, "Hello there. Tell me something."))
    reply = conv.turns[-1]
    assert reply.role is Role.ASSISTANT and reply.text == replies[-1].strip()
    (spoken,) = reply.attachments
    assert spoken.kind is AttachmentKind.AUDIO and spoken.label == "Spoken reply 1"
    stored = store.load("ana", conv.id).turns[-1]
    assert stored.attachments[0].sha256 == spoken.sha256  # stored, so it plays after a reload and is exported
    assert spoken.sha256 in service.export_json("ana", conv.id)
    messages = conv.render(lambda s: len(s.split()), 10_000)
    assert all("Spoken reply" not in m.content and spoken.path not in m.content for m in messages)
