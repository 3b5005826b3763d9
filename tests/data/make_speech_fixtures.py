"""Regenerate the speech fixtures in this folder (needs Debian `espeak-ng` and `sox`).

    python tests/data/make_speech_fixtures.py

Each fixture is synthetic English speech, 16 kHz mono 16-bit PCM WAV, small
enough to commit. Other formats are encoded from these inside the tests.
`synthesize` also makes the long varied speech for bench/bench_speech.py.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

# File name -> sentence. The tests look for distinctive words of each sentence
# in the transcript, so change both together.
FIXTURES = {
    "capital_of_france.wav": "What is the capital of France?",
    "elephant_giraffe.wav": "The elephant and the giraffe drink water from the river.",
}


def synthesize(text: str, out: Path) -> Path:
    """Speak `text` into `out` as 16 kHz mono 16-bit WAV."""
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.wav"
        # The British voice, a little slower than espeak's default, is the one both bundled Whisper
        # models read reliably at any level (the US voice's "France" often comes out as "friends").
        subprocess.run(["espeak-ng", "-v", "en", "-s", "140", "-w", str(raw), text], check=True)
        # -D: no dither, so regenerating gives byte-identical files.
        subprocess.run(["sox", "-D", str(raw), "-r", "16000", "-c", "1", "-b", "16", "-e", "signed-integer",
                        str(out)], check=True)
    return out


if __name__ == "__main__":
    for name, text in FIXTURES.items():
        path = synthesize(text, HERE / name)
        print(f"{path.name}: {path.stat().st_size / 1024:.0f} KB  {text!r}")
