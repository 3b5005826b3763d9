"""Real-time factor of speech recognition: our pipeline vs faster-whisper called directly.

    python bench/bench_speech.py [--model whisper-base] [--repeats 3]

"ours" is `FasterWhisperRecognizer.transcribe(load_audio(path))`, so it includes decoding,
resampling, trimming and normalising the file. "direct" is `WhisperModel.transcribe` on the
same model with the same settings, fed the WAV samples read with the standard library.
RTF = wall-clock seconds / seconds of audio (lower is faster; < 1 is faster than real time),
from the best of N interleaved runs.
Prints a table and writes bench/results/bench_speech.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import wave
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from chatbot.perception.audio import SAMPLE_RATE, load_audio  # noqa: E402
from chatbot.perception.speech import FasterWhisperRecognizer, load_recognizer  # noqa: E402

DATA = ROOT / "tests" / "data"
sys.path.insert(0, str(DATA))
from make_speech_fixtures import synthesize  # noqa: E402

SHORT = DATA / "elephant_giraffe.wav"  # ~3.7 s
# About a minute of varied speech. Repeating the short fixtures instead would make each 30 s
# window so repetitive that Whisper's compression-ratio check re-decodes it at every temperature.
LONG_TEXT = (
    "Last summer my sister and I took the night train from Paris to Vienna. "
    "We shared a tiny cabin with two narrow beds and a window that would not close properly. "
    "At midnight the conductor knocked on the door to check our tickets and passports. "
    "In the morning we ate warm bread with apricot jam while the mountains rolled past. "
    "Vienna was cold and bright, and the streets smelled of roasted chestnuts. "
    "We visited a museum full of old clocks, then listened to a string quartet in a small church. "
    "On the last evening it started snowing, so we bought thick wool gloves at the market. "
    "Our neighbour promised to water the tomatoes, but a storm flattened half of the garden anyway. "
    "When we came home the cat ignored us for two whole days, which seemed only fair. "
    "Next year we would like to travel further east, perhaps all the way to Budapest or Krakow."
)


@dataclass
class Row:
    clip: str
    audio_seconds: float
    load_audio_seconds: float  # the decode/clean-up part of "ours"
    ours_seconds: float
    direct_seconds: float
    ours_rtf: float
    direct_rtf: float
    overhead: float  # ours / direct
    same_text: bool
    runs: dict[str, list[float]]  # every timing, seconds


def read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path)) as w:
        return np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float32) / 32768


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def bench(recognizer: FasterWhisperRecognizer, name: str, path: Path, repeats: int) -> Row:
    samples = read_wav(path)
    settings = asdict(recognizer.settings)

    def ours() -> str:
        return recognizer.transcribe(load_audio(path)).text

    def direct() -> str:
        segments, _ = recognizer.model.transcribe(samples, language=recognizer.language, **settings)
        return " ".join(s.text.strip() for s in segments).strip()

    ours(), direct()  # warm-up: first calls allocate buffers and load the VAD model
    times: dict[str, list[float]] = {"load_audio": [], "ours": [], "direct": []}
    for _ in range(repeats):  # interleaved so background load hits all sides alike
        times["load_audio"].append(timed(lambda: load_audio(path))[0])
        t, ours_text = timed(ours)
        times["ours"].append(t)
        t, direct_text = timed(direct)
        times["direct"].append(t)
    seconds = len(samples) / SAMPLE_RATE
    # Best of N: other processes on a shared machine only ever add time, so the minimum is the
    # steadiest estimate of the work itself (all runs are kept in the JSON).
    prep, o, d = (min(times[k]) for k in ("load_audio", "ours", "direct"))
    return Row(clip=name, audio_seconds=round(seconds, 2), load_audio_seconds=round(prep, 3),
               ours_seconds=round(o, 3), direct_seconds=round(d, 3), ours_rtf=round(o / seconds, 3),
               direct_rtf=round(d / seconds, 3), overhead=round(o / d, 3), same_text=ours_text == direct_text,
               runs={k: [round(t, 3) for t in v] for k, v in times.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="whisper-base", help="bundled key or CTranslate2 folder")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    recognizer = load_recognizer(args.model)
    load_seconds = time.perf_counter() - start
    if not isinstance(recognizer, FasterWhisperRecognizer):
        parser.error("this benchmark compares against faster-whisper; give a CTranslate2 model")

    with tempfile.TemporaryDirectory() as tmp:
        long = synthesize(LONG_TEXT, Path(tmp) / "long.wav")
        rows = [bench(recognizer, "short", SHORT, args.repeats), bench(recognizer, "long", long, args.repeats)]
    load_average = [round(load_before, 1), round(os.getloadavg()[0], 1)]
    cpus = len(os.sched_getaffinity(0))

    print(f"model {args.model} (int8, {cpus} CPUs, {asdict(recognizer.settings)}), loaded in {load_seconds:.1f} s; "
          f"best of {args.repeats} runs; load average before/after {load_average} (other work skews timings)\n")
    columns = ("clip", "audio s", "load_audio s", "ours s", "direct s", "ours RTF", "direct RTF", "overhead",
               "same text")
    print(" | ".join(columns))
    for r in rows:
        print(" | ".join([r.clip, f"{r.audio_seconds:.1f}", f"{r.load_audio_seconds:.3f}", f"{r.ours_seconds:.2f}",
                          f"{r.direct_seconds:.2f}", f"{r.ours_rtf:.3f}", f"{r.direct_rtf:.3f}",
                          f"{r.overhead:.2f}x", str(r.same_text)]))

    out = ROOT / "bench" / "results" / "bench_speech.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "model": args.model, "settings": asdict(recognizer.settings), "load_seconds": round(load_seconds, 2),
        "repeats": args.repeats, "python": platform.python_version(), "cpus": cpus, "load_average": load_average,
        "rows": [asdict(r) for r in rows],
    }, indent=2))
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
