"""Bounded fuzzing of audio and image decoding on mutated real files: whatever the bytes, the
decoders answer with a `UserFacingError` or a result, never another exception or a memory blow-up."""

from __future__ import annotations

import io
import resource
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatbot.errors import UserFacingError
from chatbot.perception.audio import load_audio
from chatbot.perception.images import load_image

ROOT = Path(__file__).resolve().parents[2]
SPEECH = (ROOT / "tests" / "data" / "capital_of_france.wav").read_bytes()
PHOTO = (ROOT / "assets" / "examples" / "sign.png").read_bytes()
MAX_GROWTH_MB = 300


def _jpeg() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.frombytes("RGB", (64, 48), bytes(range(256)) * 36).save(out, "JPEG", exif=b"Exif\0\0" + b"\0" * 20)
    return out.getvalue()


SEEDS = {"wav": SPEECH[:16_000], "png": PHOTO, "jpg": _jpeg()}


@st.composite
def mutated(draw, seed: bytes) -> bytes:
    """The seed with a few bytes overwritten (headers most often), cut short, or with a slice repeated."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 8))):
        limit = draw(st.sampled_from([64, len(data)]))  # headers hold the sizes and rates worth attacking
        at = draw(st.integers(0, min(limit, len(data)) - 1))
        data[at:at + 4] = draw(st.binary(min_size=1, max_size=4))
    if seed[:4] == b"RIFF" and draw(st.booleans()):
        # The declared sample rate (fmt chunk, offset 24) is what a memory bomb sets.
        data[24:28] = draw(st.integers(1, 10**6)).to_bytes(4, "little")
    if draw(st.booleans()):
        data = data[: draw(st.integers(1, len(data)))]
    return bytes(data)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _decodes_safely(load, data: bytes, suffix: str) -> None:
    with tempfile.NamedTemporaryFile(suffix=suffix) as f:
        f.write(data)
        f.flush()
        before = _peak_mb()
        try:
            load(f.name)
        except UserFacingError:
            pass
        assert _peak_mb() - before < MAX_GROWTH_MB


FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ
@given(mutated(SEEDS["wav"]))
def test_mutated_recordings_decode_or_are_refused(data):
    _decodes_safely(load_audio, data, ".wav")


@pytest.mark.parametrize("kind", ["png", "jpg"])
def test_mutated_images_decode_or_are_refused(kind):
    @FUZZ
    @given(mutated(SEEDS[kind]))
    def check(data):
        _decodes_safely(load_image, data, f".{kind}")

    check()
