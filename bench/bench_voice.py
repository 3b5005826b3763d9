"""Spoken replies: intelligibility (TTS -> bundled Whisper -> word error rate) and speed of each voice.

    python -m bench.bench_voice [--voices hibari piper-joe] [--repeats 3]

For each reply below: its speakable text is synthesised, written as a WAV file, read back by
the app's own audio loader and transcribed by the bundled Whisper base; WER compares the
transcript with the speakable text (lower case, punctuation dropped). Real-time factor (RTF) =
synthesis seconds / seconds of speech, median of N interleaved runs (lower is faster).
Voice-to-voice latency of call mode, stage by stage: `python -m bench.bench_call`.
Prints a table and writes bench/results/bench_voice.json.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Typical short chat replies, with the markdown a small model writes. No digits: a spoken "eight"
# transcribed as "8" is not an error of the voice.
REPLIES = [
    "The capital of France is **Paris**. It is famous for the Eiffel Tower and its museums.",
    "Sure! Here is a short weekend plan:\n\n- Saturday: hike the ridge trail in the morning.\n"
    "- Sunday: relax by the lake and have a picnic.",
    "A list comprehension builds a new list from an existing one in a single line:\n\n"
    "```python\nsquares = [x * x for x in range(10)]\n```\n\nIt is shorter than a loop and easy to read.",
    "Elephants drink water with their trunks, while giraffes have to spread their front legs to reach the river.",
    "I cannot see the photo itself, but the text in it says the shop opens at noon on weekdays.",
    "Good morning! I hope you slept well. Would you like some ideas for breakfast?",
]


def normalise(text: str) -> list[str]:
    return re.sub(r"[^\w\s']", " ", text.lower().replace("-", " ")).split()


def word_error_rate(reference: str, hypothesis: str) -> float:
    """(substitutions + deletions + insertions) / words of the reference, by edit distance over words."""
    ref, hyp = normalise(reference), normalise(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        previous, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (r != h))
    return row[-1] / max(1, len(ref))


@dataclass
class VoiceResult:
    voice: str
    licence: str
    wer: float  # all replies together: total errors / total reference words
    worst_reply_wer: float
    rtf_median: float
    load_seconds: float


LICENCES = {"hibari": "Apache-2.0 (code and voice)", "piper-joe": "piper-tts GPL-3.0; voice CC0 (package MIT)"}


def round_trip(voice, recognizer, replies=REPLIES, repeats: int = 1) -> tuple[list[dict], float]:
    """Per reply: reference, transcript, WER; and the median RTF over `repeats` syntheses of each."""
    from chatbot.perception.audio import load_audio
    from chatbot.voice.speakable import speakable
    from chatbot.voice.tts import write_wav

    rows, rtfs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for k, reply in enumerate(replies):
            text = speakable(reply)
            for _ in range(repeats):
                start = time.perf_counter()
                samples = voice.synthesize(text)
                rtfs.append((time.perf_counter() - start) / (samples.size / voice.sample_rate))
            path = write_wav(Path(tmp) / f"reply-{k}.wav", samples, voice.sample_rate)
            heard = recognizer.transcribe(load_audio(path)).text
            rows.append({"reference": text, "transcript": heard, "wer": word_error_rate(text, heard),
                         "words": len(normalise(text))})
    return rows, statistics.median(rtfs)


def main(argv: list[str] | None = None) -> None:
    from chatbot.perception.speech import load_recognizer
    from chatbot.voice.tts import load_voice

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--voices", nargs="+", default=["hibari", "piper-joe"])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    recognizer = load_recognizer("whisper-base", "en")
    results = []
    for name in args.voices:
        start = time.perf_counter()
        try:
            voice = load_voice(name)
        except Exception as error:  # noqa: BLE001 - an optional voice that is not installed is skipped
            print(f"{name}: skipped ({error})")
            continue
        loaded = time.perf_counter() - start
        rows, rtf = round_trip(voice, recognizer, repeats=args.repeats)
        errors = sum(r["wer"] * r["words"] for r in rows)
        results.append(VoiceResult(name, LICENCES[name], errors / sum(r["words"] for r in rows),
                                   max(r["wer"] for r in rows), rtf, loaded))
        for r in rows:
            if r["wer"]:
                print(f"  {name} WER {r['wer']:.0%}: {r['transcript']!r}")
    print("\n| voice | licence | WER (Whisper base) | worst reply | TTS RTF (median) | load s |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for r in results:
        print(f"| {r.voice} | {r.licence} | {r.wer:.1%} | {r.worst_reply_wer:.1%} | {r.rtf_median:.3f} | "
              f"{r.load_seconds:.2f} |")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_voice.json").write_text(json.dumps([asdict(r) for r in results], indent=1))


if __name__ == "__main__":
    main()
