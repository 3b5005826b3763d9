"""Time to describe a 12-megapixel photo: loading it, each analyzer, and a cached repeat.

    python bench/bench_vision.py [--repeats 3] [--caption-model DIR_OR_HUB_ID]

The photo (4000×3000 JPEG) is made here: a colour gradient with sensor-like noise, a
face from scikit-image's sample data when that package is installed, and lines of text
in three sizes; then scikit-image's real photos (a cat, coffee, an astronaut, a rocket) go
through the encoder with what the classifier and detector said. "setup" is each analyzer's
one-off model load. Every analyze time is the
median of `--repeats` runs on the already loaded image. "encoder, first" runs the app's
`MultimodalEncoder` on the file (load + all analyzers + copy); "encoder, cached" sends the
same file again, which the encoder answers from its content-hash cache.
Prints a table and writes bench/results/bench_vision.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from chatbot.perception.encoder import MultimodalEncoder  # noqa: E402
from chatbot.perception.images import load_image  # noqa: E402
from chatbot.perception.vision import (  # noqa: E402
    Captioner,
    ImageAnalyzer,
    ImageFacts,
    ObjectDetector,
    PeopleDetector,
    SceneClassifier,
    TextReader,
)

FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf")
TEXT_LINES = (("CITY MUSEUM OF MODERN ART", 160), ("Open daily 10:00 - 18:00", 110), ("Free entry on Sundays", 70))


@dataclass
class Row:
    step: str
    setup_seconds: float  # one-off: loading the model
    seconds: float  # per photo
    notes: str  # what it said (shortened)


def make_photo(path: Path) -> list[str]:
    """Write the benchmark JPEG; return the text lines drawn on it."""
    rng = np.random.default_rng(0)
    height, width = 3000, 4000
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    pixels = np.stack([x / width * 170 + 50, y / height * 110 + 70, 220 - x / width * 140], axis=-1)
    pixels += rng.normal(0, 7, pixels.shape).astype(np.float32)
    photo = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    face = _sample_face()
    if face is not None:
        photo.paste(face.resize((900, 900)), (2800, 1900))
    draw = ImageDraw.Draw(photo)
    top = 250
    for text, size in TEXT_LINES:
        draw.text((250, top), text, font=ImageFont.truetype(str(FONT), size), fill=(250, 250, 245))
        top += int(size * 1.6)
    photo.save(path, "JPEG", quality=90)
    return [text for text, _ in TEXT_LINES]


def _sample_face() -> Image.Image | None:
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "astronaut.png"
    return Image.open(path).convert("RGB") if path.exists() else None


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def _said(observations) -> str:
    text = "; ".join(o.text for o in observations) or "(nothing)"
    return text if len(text) <= 90 else text[:89] + "…"


def bench_analyzers(path: Path, repeats: int, caption_model: str | None) -> tuple[list[Row], list[ImageAnalyzer]]:
    load_seconds = statistics.median(timed(lambda: load_image(path))[0] for _ in range(repeats))
    image = load_image(path)
    rows = [Row("load_image (decode, orient, RGB)", 0.0, load_seconds, f"{image.width}×{image.height} {image.format}")]
    factories = [SceneClassifier, ObjectDetector, TextReader, PeopleDetector, ImageFacts]
    if caption_model:
        factories.append(lambda: Captioner(caption_model))
    analyzers = []
    for factory in factories:
        setup, analyzer = timed(factory)
        analyzers.append(analyzer)
        runs = [timed(lambda a=analyzer: a.analyze(image)) for _ in range(repeats)]
        rows.append(Row(f"{analyzer.name} analyze", setup, statistics.median(t for t, _ in runs), _said(runs[0][1])))
    rows.append(Row("total (load + all analyzers)", sum(r.setup_seconds for r in rows),
                    sum(r.seconds for r in rows), ""))
    return rows, analyzers


def bench_real_photos(analyzers: list[ImageAnalyzer], repeats: int) -> list[Row]:
    """The encoder's analysers on scikit-image's real photos (under a neutral name), with what they said."""
    import skimage.data

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for number, sample in enumerate(("chelsea", "coffee", "astronaut", "rocket"), start=1):
            path = Path(tmp) / f"IMG_{number:04d}.png"
            Image.fromarray(getattr(skimage.data, sample)()).convert("RGB").save(path)
            seconds = []
            for _ in range(repeats):  # a fresh encoder each time: no cache
                encoder = MultimodalEncoder(Path(tmp) / "media", analyzers=analyzers)
                elapsed, turn = timed(lambda e=encoder, p=path: e.encode("What is in this photo?", [p]))
                seconds.append(elapsed)
            said = "; ".join(o.text for o in turn.observations if o.kind in ("labels", "objects")) or "(nothing)"
            rows.append(Row(f"encoder, {sample} ({path.name})", 0.0, statistics.median(seconds), said))
    return rows


def bench_encoder(path: Path, analyzers: list[ImageAnalyzer]) -> list[Row]:
    """The app's encoder on the same file twice: the second answer comes from its content-hash cache."""
    with tempfile.TemporaryDirectory() as media:
        encoder = MultimodalEncoder(Path(media), analyzers=analyzers)
        first, turn = timed(lambda: encoder.encode("What does the sign say?", [path]))
        again, _ = timed(lambda: encoder.encode("And now?", [path]))
    notes = _said(turn.observations)
    return [Row("encoder, first time", 0.0, first, notes), Row("encoder, same file again (cached)", 0.0, again, "")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--caption-model", default=None, help="a captioning model folder or cached hub id")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "photo_12mp.jpg"
        # Drawn in a child process: its float buffers would otherwise dominate our peak RSS.
        with ProcessPoolExecutor(max_workers=1) as pool:
            drawn = pool.submit(make_photo, path).result()
        rows, analyzers = bench_analyzers(path, args.repeats, args.caption_model)
        rows += bench_encoder(path, analyzers)
        rows += bench_real_photos(analyzers, args.repeats)
        size_mb = path.stat().st_size / 2**20

    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    print(f"12 MP JPEG (4000×3000, {size_mb:.1f} MB), median of {args.repeats} runs; text drawn: {drawn}")
    print(f"{'step':36} {'setup s':>8} {'per photo s':>12}  says")
    for row in rows:
        print(f"{row.step:36} {row.setup_seconds:8.2f} {row.seconds:12.3f}  {row.notes}")
    print(f"peak RSS of this process (models + one decoded photo + analysis): {peak_rss_mb:.0f} MB")

    out = ROOT / "bench" / "results" / "bench_vision.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "machine": {"python": platform.python_version(), "cpu": platform.processor() or platform.machine()},
        "photo": {"width": 4000, "height": 3000, "bytes_mb": round(size_mb, 2), "text_drawn": drawn},
        "repeats": args.repeats,
        "rows": [asdict(r) for r in rows],
        "peak_rss_mb": round(peak_rss_mb),
    }, indent=1))
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
