"""Voice-to-voice latency of call mode with the default models: end of the user's speech -> first reply audio.

    python -m bench.bench_call [--runs 3]

Drives `VoicePeer` the way the page does (`receive`: microphone packets every 0.2 s at real-time
pace): each run is a call of the two committed questions, each followed by silence, the order
alternating from run to run; a call's first turn detects the spoken language, later turns keep it.
The clock starts when the packet holding the last voiced sample is handed over and stops when the
first clip of the reply exists as audio. Each run is broken down by stage, timed at the real components' own calls:
  vad      end of speech -> the VAD declares the utterance over (its end-of-utterance silence)
  whisper  transcription of the utterance (Whisper base)
  turn     the user turn encoded and stored, the prompt rendered
  prompt   the reply model reads the prompt and writes its first token
  sentence the rest of the first clause/sentence is written
  tts      the first clause/sentence synthesised
What the page adds on top is at most one poll (0.3 s, on average half) plus a localhost fetch.
Loads the real bundled models: one such process at a time. Prints a table (medians) and writes
bench/results/bench_call.json.
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
PACKET = 3200  # 0.2 s at 16 kHz, as the page's microphone timer sends
STAGES = ["vad", "whisper", "turn", "prompt", "sentence", "tts"]
FIRST, LATER = "first (language detected)", "later (language kept)"


def read(name: str) -> np.ndarray:
    with wave.open(str(ROOT / "tests" / "data" / name)) as f:
        return np.frombuffer(f.readframes(f.getnframes()), "<i2").copy()


class Timeline:
    """Wraps the components' calls (on these instances only) to note when each stage ends."""

    def __init__(self, peer, service) -> None:
        self.marks: dict[str, float] = {}
        mark = self.mark
        start_turn, transcribe = peer._start_turn, service.encoder.recognizer.transcribe
        stream, synthesize = service.generator.stream, service.listener.voice.synthesize

        def timed_start_turn(utterance):
            mark("vad")
            return start_turn(utterance)

        def timed_transcribe(*a, **k):
            out = transcribe(*a, **k)
            mark("whisper")
            return out

        def timed_stream(*a, **k):
            mark("turn")
            pieces = stream(*a, **k)
            first = True
            try:
                while True:
                    piece = next(pieces)
                    if first:
                        mark("prompt")
                        first = False
                    yield piece
            except StopIteration as end:
                return end.value
            finally:
                pieces.close()

        def timed_synthesize(*a, **k):
            mark("sentence")
            out = synthesize(*a, **k)
            mark("tts")
            return out

        peer._start_turn, service.encoder.recognizer.transcribe = timed_start_turn, timed_transcribe
        service.generator.stream, service.listener.voice.synthesize = timed_stream, timed_synthesize

    def mark(self, stage: str) -> None:
        self.marks.setdefault(stage, time.monotonic())  # the first time only: the first sentence counts

    def stages(self, ended: float) -> dict[str, float]:
        times = [ended] + [self.marks[s] for s in STAGES]
        return {s: times[i + 1] - times[i] for i, s in enumerate(STAGES)} | {"total": times[-1] - ended}


def one_turn(peer, service, timeline: Timeline, audio: np.ndarray, name: str) -> dict[str, float]:
    """One question and its spoken reply, in the call going on (`name` is a new microphone stream)."""
    voiced = np.nonzero(np.abs(audio) > 300)[0]
    speech_end_packet = int(voiced[-1]) // PACKET
    stream = np.concatenate([audio, np.zeros(16_000 * 6, audio.dtype)])
    timeline.marks.clear()
    ended = None
    next_time = time.monotonic()
    for k in range(0, len(stream), PACKET):
        next_time += PACKET / 16_000
        time.sleep(max(0.0, next_time - time.monotonic()))
        peer.receive(name, k, 16_000, stream[k:k + PACKET])
        if k // PACKET == speech_end_packet:
            ended = time.monotonic()
        if "tts" in timeline.marks:
            break
    while "tts" not in timeline.marks:
        if peer._worker is not None and not peer._worker.is_alive():
            raise RuntimeError("the call produced no spoken reply")
        time.sleep(0.01)
    peer._worker.join()
    return timeline.stages(ended)


def one_call(peer, service, timeline: Timeline, questions: list[str], run: int) -> list[dict[str, float]]:
    """A call of one turn per question: the first detects the spoken language, later ones keep it."""
    peer.start_call("bench", None, "en")
    try:
        return [one_turn(peer, service, timeline, read(q), f"{q}-{run}") for q in questions]
    finally:
        peer.end_call()


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
        app.load_models(service)  # the app loads them once its page is served
        peer = VoicePeer(service, service.listener, service.encoder.recognizer)
        timeline = Timeline(peer, service)
        one_call(peer, service, timeline, QUESTIONS[:1], -1)  # first-call costs are not per turn
        rows: dict[str, list[dict[str, float]]] = {FIRST: [], LATER: []}
        for run in range(args.runs):  # which question comes first alternates, so both are in both rows
            first, later = one_call(peer, service, timeline, QUESTIONS[::1 if run % 2 == 0 else -1], run)
            rows[FIRST].append(first)
            rows[LATER].append(later)
    print("\n| turn of the call | " + " | ".join(STAGES) + " | voice-to-voice s (median) | runs (total) |")
    print("| --- | " + " | ".join("---:" for _ in STAGES) + " | ---: | --- |")
    for q, runs in rows.items():
        medians = [statistics.median(r[s] for r in runs) for s in STAGES + ["total"]]
        print(f"| {q} | " + " | ".join(f"{m:.2f}" for m in medians) + " | "
              + ", ".join(f"{r['total']:.2f}" for r in runs) + " |")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_call.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
