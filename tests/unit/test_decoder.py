"""The reply decoder on tiny random models: backend chosen from config, streaming, stop, settings."""

import shutil
import threading

import pytest
import torch

from chatbot.errors import UserFacingError
from chatbot.generation.transformers_backend import (
    PREFILL_CHUNK,
    CausalChatGenerator,
    GenerationSettings,
    Seq2SeqGenerator,
    load_generator,
)
from chatbot.state import Message

MESSAGES = [Message("system", "You are helpful."), Message("user", "hello what is the name of my cat"),
            Message("assistant", "the cat"), Message("user", "tell me about the weather today")]
GREEDY = GenerationSettings(max_new_tokens=40, temperature=0)


def never_ending(generator):
    """Random weights may emit end-of-sequence at once; forbid it so only `stop` or the limit ends a reply."""
    generator.model.generation_config.suppress_tokens = generator.tokenizer.all_special_ids
    return generator


@pytest.fixture(scope="module")
def t5(tiny_t5_dir, tmp_path_factory):
    # A name that suggests the other architecture: the backend must come from the config.
    misleading = tmp_path_factory.mktemp("m") / "my-chat-llama"
    shutil.copytree(tiny_t5_dir, misleading)
    return never_ending(load_generator(str(misleading)))


@pytest.fixture(scope="module")
def causal(tiny_causal_dir, tmp_path_factory):
    misleading = tmp_path_factory.mktemp("m") / "flan-t5-small"
    shutil.copytree(tiny_causal_dir, misleading)
    return never_ending(load_generator(str(misleading)))


@pytest.fixture(params=["t5", "causal"])
def generator(request):
    return request.getfixturevalue(request.param)


def test_backend_is_chosen_from_the_config_not_the_name(t5, causal):
    assert isinstance(t5, Seq2SeqGenerator)
    assert isinstance(causal, CausalChatGenerator)


def test_seq2seq_prompt_is_the_dialogue_as_text(t5):
    ids = t5.encode_prompt(MESSAGES)["input_ids"][0]
    text = t5.tokenizer.decode(ids, skip_special_tokens=True)
    assert "User: tell me about the weather today" in text and text.rstrip().endswith("Assistant:")


def test_causal_prompt_uses_the_chat_template(causal):
    text = causal.tokenizer.decode(causal.encode_prompt(MESSAGES)["input_ids"][0])
    assert text.count("<|im_start|>") == 5 and text.endswith("<|im_start|>assistant\n")


class StepCounter:
    """Counts decoding steps (forward passes of the model) during a block."""

    def __init__(self, generator):
        self.model, self.steps = generator.model, 0

    def __enter__(self):
        self.handle = self.model.register_forward_hook(lambda *args: setattr(self, "steps", self.steps + 1))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_stream_yields_text_until_the_token_limit(generator):
    with StepCounter(generator) as counter:
        pieces = list(generator.stream(MESSAGES, GREEDY))
    assert pieces and all(isinstance(p, str) and p for p in pieces)
    # Causal models read a long prompt in chunks before `generate` reads the last one.
    length = generator.encode_prompt(MESSAGES)["input_ids"].shape[1]
    chunks = -(-max(0, length - PREFILL_CHUNK) // PREFILL_CHUNK) if isinstance(generator, CausalChatGenerator) else 0
    assert counter.steps == chunks + GREEDY.max_new_tokens


def test_greedy_is_deterministic(generator):
    assert "".join(generator.stream(MESSAGES, GREEDY)) == "".join(generator.stream(MESSAGES, GREEDY))


def test_stop_ends_generation_promptly(generator):
    stop = threading.Event()
    with StepCounter(generator) as counter:
        for _ in generator.stream(MESSAGES, GenerationSettings(max_new_tokens=400, temperature=0), stop):
            stop.set()
            at_stop = counter.steps
    assert counter.steps - at_stop <= 2 and counter.steps < 400


def test_stop_is_per_request(generator):
    """Stopping one request must not stop another."""
    other_stop, mine = threading.Event(), threading.Event()
    other_stop.set()
    assert list(generator.stream(MESSAGES, GREEDY, other_stop)) == []
    with StepCounter(generator) as counter:
        list(generator.stream(MESSAGES, GREEDY, mine))
    assert counter.steps == GREEDY.max_new_tokens


def test_abandoning_the_stream_stops_generating(generator):
    stream = generator.stream(MESSAGES, GenerationSettings(max_new_tokens=400, temperature=0))
    with StepCounter(generator) as counter:
        next(stream)
        at_close = counter.steps
        stream.close()  # e.g. the browser tab closed
    assert counter.steps - at_close <= 2 and not generator._lock.locked()


def test_settings_map_to_generate_arguments():
    sampled = GenerationSettings(max_new_tokens=12, temperature=0.5, top_p=0.8, repetition_penalty=1.3)
    assert sampled.generate_kwargs() == dict(max_new_tokens=12, do_sample=True, temperature=0.5, top_p=0.8,
                                             repetition_penalty=1.3)
    assert GenerationSettings(temperature=0).generate_kwargs()["do_sample"] is False


def test_sampling_settings_work(generator):
    text = "".join(generator.stream(MESSAGES, GenerationSettings(max_new_tokens=10, temperature=0.9, top_p=0.5)))
    assert isinstance(text, str)


def test_prompt_budget_leaves_room_for_the_reply(causal):
    assert causal.prompt_budget(GenerationSettings(max_new_tokens=100)) == causal.context_tokens - 100


@pytest.mark.parametrize("spec", ["/no/such/model/dir", "nobody/no-such-model-xyz"])
def test_unloadable_model_gives_a_clear_error(spec):
    with pytest.raises(UserFacingError, match="Could not load the text model"):
        load_generator(spec)


def test_the_streamer_hands_on_each_token_at_once_but_never_half_a_character(causal):
    from chatbot.generation.transformers_backend import _TokenStreamer

    tokenizer = causal.tokenizer
    text = "the cat sat\nwhere? ünïcode 👋 ok"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    streamer = _TokenStreamer(tokenizer, skip_special_tokens=True)  # no prompt to skip here
    pieces = []
    for i, token in enumerate(ids):
        streamer.put(torch.tensor([[token]]))
        so_far = tokenizer.decode(ids[: i + 1])
        if not so_far.endswith("\ufffd"):
            # Everything decoded so far is out, not held back until a space (transformers' own streamer).
            while not streamer.text_queue.empty():
                pieces.append(streamer.text_queue.get())
            assert "".join(pieces) == so_far
    streamer.end()
    assert len(pieces) > len(text.split())  # word pieces, not whole words
    assert not any("\ufffd" in piece for piece in pieces)
    # A reply cut inside a character (the token limit, Stop) ends without its half.
    half = next(i for i in range(len(ids)) if tokenizer.decode(ids[: i + 1]).endswith("\ufffd"))
    streamer = _TokenStreamer(tokenizer, skip_special_tokens=True)
    for token in ids[: half + 1]:
        streamer.put(torch.tensor([[token]]))
    streamer.end()
    assert "".join(streamer) == tokenizer.decode(ids[:half])
