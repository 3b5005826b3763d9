"""Hostile input that must cost little and end in a friendly message: sample-rate bombs, caps, huge turns."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import wave
from pathlib import Path

import numpy as np
import pytest

from chatbot.errors import UserFacingError
from chatbot.perception.audio import load_audio

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
    script = textwrap.dedent("""
        import json, resource, sys
        from chatbot.errors import UserFacingError
        from chatbot.perception.audio import load_audio

        def peak_mb():
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

        load_audio(sys.argv[1])  # warm up: imports, FFmpeg, torch's allocator
        base = peak_mb()
        growth = {}
        for path in sys.argv[2:]:
            try:
                load_audio(path)
            except UserFacingError:
                pass
            growth[path] = peak_mb() - base
        print(json.dumps(growth))
    """)
    out = subprocess.run([sys.executable, "-c", script, str(SPEECH), *map(str, files)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, check=True).stdout
    return json.loads(out.splitlines()[-1])


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
