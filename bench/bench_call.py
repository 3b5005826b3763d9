"""Voice-to-voice latency of call mode with the default models: end of the user's speech -> first reply audio.

    python -m bench.bench_call [--runs 3]

Drives `VoicePeer` (what the page's microphone stream calls) with a committed question,
fed in 0.25 s chunks at real-time pace like a browser streams it, followed by silence. The clock
starts when the chunk holding the last voiced sample is handed over and stops when the first
sentence of the reply exists as audio. What the page adds on top is at most one poll (0.3 s)
plus network. The pieces: the VAD's end-of-utterance wait (0.6 s), Whisper base, the reply
model's first sentence, and its synthesis. Loads the real bundled models: one such process at a time.
Prints a table and writes bench/results/bench_call.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import wave
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = ["capital_of_france.wav", "elephant_giraffe.wav"]
CHUNK = 4000  # 0.25 s at 16 kHz


def read(name: str) -> np.ndarray:
    with wave.open(str(ROOT / "tests" / "data" / name)) as f:
        return np.frombuffer(f.readframes(f.getnframes()), "<i2").copy()


def one_call(peer, speaker, audio: np.ndarray) -> float:
    voiced = np.nonzero(np.abs(audio) > 300)[0]
    speech_end_chunk = int(voiced[-1]) // CHUNK
    stream = np.concatenate([audio, np.zeros(16_000 * 6, audio.dtype)])
    peer.start_call("bench", None, "en")
    ended = None
    next_time = time.monotonic()
    for k in range(0, len(stream), CHUNK):
        next_time += CHUNK / 16_000
        time.sleep(max(0.0, next_time - time.monotonic()))
        peer.hear(16_000, stream[k:k + CHUNK])
        if k // CHUNK == speech_end_chunk:
            ended = time.monotonic()
        spoken = speaker.current(peer.conversation_id) if peer.conversation_id else None
        if spoken and spoken.clips:
            break
    while True:
        spoken = speaker.current(peer.conversation_id) if peer.conversation_id else None
        if spoken and spoken.clips:
            first = time.monotonic()
            break
        if peer._worker is not None and not peer._worker.is_alive() and not (spoken and spoken.clips):
            raise RuntimeError("the call produced no spoken reply")
        time.sleep(0.01)
    peer._worker.join()
    peer.end_call()
    return first - ended


def main(argv: list[str] | None = None) -> None:
    import app
    from chatbot.config import parse_args
    from chatbot.voice.call import VoicePeer

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as data:
        config = parse_args(["--data-dir", data, "--temperature", "0", "--max-new-tokens", "64"])
        app.configure_environment(config)
        service = app.build_service(config)
        peer = VoicePeer(service, service.listener, service.encoder.recognizer)
        one_call(peer, service.listener, read(QUESTIONS[0]))  # warm-up: first-call costs are not per turn
        rows = {q: [one_call(peer, service.listener, read(q)) for _ in range(args.runs)] for q in QUESTIONS}
    print("\n| question | voice-to-voice s (median) | runs |")
    print("| --- | ---: | --- |")
    for q, values in rows.items():
        print(f"| {q} | {statistics.median(values):.2f} | {', '.join(f'{v:.2f}' for v in values)} |")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_call.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
