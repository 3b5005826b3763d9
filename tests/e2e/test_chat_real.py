"""The real bundled chat model holds a multi-turn conversation (no tiny stand-ins here)."""

import pytest

from chatbot.config import Config
from chatbot.conversation.service import ChatService
from chatbot.conversation.store import ConversationStore
from chatbot.generation.transformers_backend import GenerationSettings, load_generator
from chatbot.perception.encoder import MultimodalEncoder


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    defaults = Config()
    generator = load_generator(defaults.text_model, quantization=defaults.quantize)
    store = ConversationStore(tmp_path_factory.mktemp("data"))
    encoder = MultimodalEncoder(store.media_dir)
    return ChatService(encoder, generator, store, GenerationSettings(max_new_tokens=48, temperature=0))


def test_a_fact_from_the_first_turn_is_used_two_turns_later(service):
    conv = service.new_conversation()
    replies = [list(service.respond("key:ana", conv, text))[-1] for text in (
        "Hi! My name is Ana and I live in Lisbon.",
        "What is 12 plus 30?",
        "Remind me, what is my name?",
    )]
    assert "Ana" in replies[2]
    assert len(conv.turns) == 6 and not any(t.interrupted for t in conv.turns)
