"""Hostile input that must cost little and end in a friendly message: sample-rate bombs, caps, huge turns."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest

from chatbot.errors import UserFacingError
from chatbot.perception.audio import load_audio
from tests.support import peak_memory

ROOT = Path(__file__).resolve().parents[2]
SPEECH = ROOT / "tests" / "data" / "capital_of_france.wav"


def rate_bomb(path: Path, rate: int, frames: int = 8000) -> Path:
    """A 16 KB WAV of noise whose header declares `rate` samples per second."""
    noise = np.random.default_rng(rate).uniform(-0.5, 0.5, frames)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((noise * 32767).astype("<i2").tobytes())
    return path


def peak_rss_growth_mb(files: list[Path]) -> dict[str, float]:
    """Decode each file in a fresh process; how far its peak RSS rose above a normal recording's."""
    return peak_memory.peak_rss_growth_mb("from chatbot.perception.audio import load_audio as load", SPEECH, files)


def test_declared_sample_rate_does_not_blow_up_memory(tmp_path):
    # Rates with no common factor with 16 kHz made torchaudio build 2-6 GB filter banks.
    bombs = [rate_bomb(tmp_path / f"bomb-{rate}.wav", rate) for rate in (8009, 48001, 96001)]
    growth = peak_rss_growth_mb(bombs)
    assert all(mb < 300 for mb in growth.values()), growth


@pytest.mark.parametrize("rate", [1, 3999, 192_001, 1_000_000])
def test_absurd_sample_rates_are_refused_with_a_reason(tmp_path, rate):
    with pytest.raises(UserFacingError, match="samples per second"):
        load_audio(rate_bomb(tmp_path / "odd.wav", rate))


@pytest.mark.parametrize("rate", [8000, 8009, 22050, 44100, 96001])
def test_unusual_but_real_rates_still_decode(tmp_path, rate):
    clip = load_audio(rate_bomb(tmp_path / "noise.wav", rate, frames=rate))  # one second
    assert clip.sample_rate == 16000
    assert abs(clip.duration - 1.0) < 0.01


# -- caps: refused before any work, with the reason, and nothing earlier lost ------------------
@pytest.fixture
def service(tiny_causal_dir, tmp_path):
    from chatbot.conversation.service import ChatService
    from chatbot.conversation.store import ConversationStore
    from chatbot.generation.transformers_backend import GenerationSettings, load_generator
    from chatbot.perception.encoder import Limits, MultimodalEncoder

    store = ConversationStore(tmp_path / "data")
    encoder = MultimodalEncoder(store.media_dir, limits=Limits(max_message_chars=1000, max_files=3))
    return ChatService(encoder, load_generator(str(tiny_causal_dir)), store, GenerationSettings(4, temperature=0))


def refusal(service, conv, text: str, files: list[str]) -> str:
    list(service.respond("key:ana", conv, text, files))
    assert conv.turns[-1].notice
    return conv.turns[-1].text


def test_too_many_files_are_refused_before_any_is_opened(service):
    conv = service.new_conversation()
    list(service.respond("key:ana", conv, "hello there"))
    before = list(conv.turns)
    missing = [f"/nonexistent/photo-{i}.png" for i in range(200)]  # opening any would give another message
    assert "at most 3" in refusal(service, conv, "look", missing)
    stored = service.open("key:ana", conv.id)
    assert stored.turns[: len(before)] == before  # the earlier exchange is untouched
    shown = stored.turns[-2].text
    assert shown.count("📎") == 6 and "195 more" in shown  # the refused message is kept short


def test_too_long_a_message_is_refused_and_not_stored_whole(service):
    conv = service.new_conversation()
    assert "at most 1,000" in refusal(service, conv, "x" * 2_000_000, [])
    assert len(service.open("key:ana", conv.id).turns[0].text) < 600


def test_stop_is_honoured_while_a_long_prompt_is_read(tiny_causal_dir):
    """The reply model reads a long prompt in chunks and checks for a stop between them."""
    import threading

    from chatbot.generation import transformers_backend as decoder
    from chatbot.state import Message

    generator = decoder.load_generator(str(tiny_causal_dir), max_context=100_000)
    messages = [Message("system", "You are helpful."), Message("user", "tell me about the weather " * 400)]
    length = generator.encode_prompt(messages)["input_ids"].shape[1]
    assert length > 20 * decoder.PREFILL_CHUNK
    stop, read = threading.Event(), []

    def stop_after_first_chunk(module, args, kwargs):
        read.append(kwargs["input_ids"].shape[1])
        stop.set()  # the user presses Stop while the prompt is being read

    handle = generator.model.register_forward_pre_hook(stop_after_first_chunk, with_kwargs=True)
    try:
        reply = "".join(generator.stream(messages, decoder.GenerationSettings(8, temperature=0), stop))
    finally:
        handle.remove()
    assert reply == "" and sum(read) <= decoder.PREFILL_CHUNK, read  # not the whole prompt
    # What was read is kept: asking again reads only the rest.
    read.clear()
    handle = generator.model.register_forward_pre_hook(
        lambda module, args, kwargs: read.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    try:
        "".join(generator.stream(messages, decoder.GenerationSettings(2, temperature=0)))
    finally:
        handle.remove()
    assert sum(read) - 1 == length - decoder.PREFILL_CHUNK  # the rest of the prompt, then one step
