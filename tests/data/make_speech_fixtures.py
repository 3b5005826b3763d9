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


# Call-mode microphones: seconds of silence and sentences, in order (numbers are pauses).
CALLS = {
    # VAD unit tests: two questions with a pause shorter than a reply.
    "call_two_questions.wav": [1.0, "What is the capital of France?", 2.5, "And how many people live there?", 8.0],
    # Browser call test: each pause leaves room for the whole spoken reply; then silence only.
    "call_browser.wav": [1.0, "What is the capital of France?", 25.0, "And how many people live there?", 35.0],
    # Browser barge-in test: a question with a long answer, and the interruption, said when the test
    # hears the bot speak. (The bundled 0.5B coder model refuses to tell stories; it explains recipes.)
    "call_bread.wav": [0.5, "Explain how bread is made, in ten detailed steps.", 0.5],
    "call_stop.wav": [0.3, "Stop. What is the capital of Italy?", 0.5],
}


def make_call(parts: list, out: Path) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        pieces = []
        for k, part in enumerate(parts):
            piece = Path(tmp) / f"{k}.wav"
            if isinstance(part, str):
                synthesize(part, piece)
            else:
                subprocess.run(["sox", "-n", "-r", "16000", "-c", "1", "-b", "16", str(piece), "trim", "0",
                                str(part)], check=True)
            pieces.append(str(piece))
        subprocess.run(["sox", "-D", *pieces, str(out)], check=True)
    return out


def make_noise(out: Path) -> Path:
    """Room hiss with a short loud burst (a cough or a knock): no words, so no turn."""
    subprocess.run(["sox", "-D", "-n", "-r", "16000", "-c", "1", "-b", "16", str(out), "synth", "3", "pinknoise",
                    "vol", "0.02", ":", "synth", "0.15", "whitenoise", "vol", "0.5", ":", "synth", "2", "pinknoise",
                    "vol", "0.02"], check=True)
    return out


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
    for name, parts in CALLS.items():
        path = make_call(parts, HERE / name)
        print(f"{path.name}: {path.stat().st_size / 1024:.0f} KB")
    print(make_noise(HERE / "noise_and_cough.wav").name)
