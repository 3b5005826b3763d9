"""Text in a photo (signs, documents, screenshots), read with RapidOCR."""

from __future__ import annotations

import logging
import re
import threading
import unicodedata
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from chatbot.perception.images import LoadedImage
from chatbot.perception.vision.base import ImageAnalyzer, downscaled
from chatbot.state import Observation, ObservationKind

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Word:
    """One piece of text RapidOCR found, with its axis-aligned box."""

    text: str
    left: float
    top: float
    right: float
    bottom: float
    centres: tuple[float, ...] = ()  # x centre of each character of `text`; () if unknown

    @property
    def height(self) -> float:
        return self.bottom - self.top


class TextReader(ImageAnalyzer):
    """Text in the photo (signs, documents, screenshots) via RapidOCR (PP-OCRv4, ONNX).

    RapidOCR itself shrinks anything over 2000 px; shrinking to `max_side` first
    saves time on big photos while keeping text a few pixels high readable.
    """

    name = "ocr"

    def __init__(self, *, max_side: int = 1600, min_score: float = 0.6, max_chars: int = 600, threads: int = 2) -> None:
        from rapidocr_onnxruntime import RapidOCR

        from chatbot.perception.onnx import onnxruntime, session

        onnxruntime()  # telemetry off before RapidOCR creates its sessions
        self._engine = RapidOCR()
        # RapidOCR runs its models without a memory arena, which left a photo's peak ≈200 MB higher than an
        # arena that is shrunk after each run (the same model files and graph optimisations: the same text).
        for holder in (self._engine.text_det.infer, self._engine.text_cls.infer, self._engine.text_rec.session):
            holder.session = session(holder.session._model_path, threads, give_back_memory=True)
        self._engine.text_det.get_preprocess = _bounded_detector_input(self._engine.text_det)
        self._max_side = max_side
        self._min_score = min_score  # below this RapidOCR mostly "reads" texture as random letters
        self._max_chars = max_chars  # a full page would crowd out the conversation
        self._lock = threading.Lock()

    def read_lines(self, img: LoadedImage) -> list[str]:
        """The text as lines in reading order: top to bottom, each left to right."""
        small = _no_thinner_than(downscaled(img.image, self._max_side), _MAX_OCR_ASPECT)
        # RapidOCR takes OpenCV's BGR channel order for arrays.
        bgr = np.ascontiguousarray(np.asarray(small)[:, :, ::-1])
        with self._lock:
            # Character boxes let us restore the spaces the recogniser drops between English words.
            result, _timings = self._engine(bgr, return_word_box=True)
        words = [_word(box, text, details) for box, text, score, *details in result or ()
                 if self._confident(text, float(score))]
        grey = np.asarray(small.convert("L"))
        return [" ".join(_tidy(word, grey) for word in _without_overlaps(line)) for line in _lines(words)]

    def _confident(self, text: str, score: float) -> bool:
        # One or two characters are what texture (fur, coins, leaves) gets misread as.
        letters = sum(ch.isalnum() for ch in text)
        return letters > 0 and score >= (self._min_score if letters >= 3 else max(self._min_score, 0.9))

    def analyze(self, img: LoadedImage, question: str = "") -> list[Observation]:
        lines = self.read_lines(img)
        if not lines:
            return []
        text = " / ".join(lines)
        if len(text) > self._max_chars:
            text = text[: self._max_chars - 1].rstrip() + "…"
        return [Observation(kind=ObservationKind.OCR, text=f'the text in it says "{text}"', source=self.name)]


# Text detection's working memory grows with its input's area. RapidOCR brings a photo's short side to at
# least 736 px: a 600×400 photo became 1104×736 (+140 MB at its peak), but a 1600×1200 one kept all its
# pixels (+360 MB), and a 1200×300 banner became 2944×736. Inputs larger than the first are scaled down to
# its area (+160 MB; the banner to 1792×448); the recogniser still reads the words from the photo at its size.
_DETECTOR_PIXELS = 1104 * 736


def _bounded_detector_input(detector):
    """A replacement for RapidOCR's `TextDetector.get_preprocess`: its own sizing (short side to at least
    `limit_side_len`), down to at most `_DETECTOR_PIXELS` (sides multiples of 32). Its other sizing
    ("max", by the longest side) is left as it is."""
    if detector.limit_type != "min":
        return detector.get_preprocess
    from rapidocr_onnxruntime.ch_ppocr_det.utils import DetPreProcess

    class Bounded(DetPreProcess):
        def resize(self, img: np.ndarray) -> np.ndarray | None:
            height, width = img.shape[:2]
            if (height * width) * max(1.0, self.limit_side_len / min(height, width)) ** 2 <= _DETECTOR_PIXELS:
                return super().resize(img)
            import cv2

            ratio = (_DETECTOR_PIXELS / (height * width)) ** 0.5
            return cv2.resize(img, (max(32, round(width * ratio / 32) * 32), max(32, round(height * ratio / 32) * 32)))

    return lambda _longest_side: Bounded(detector.limit_side_len, detector.limit_type, detector.mean, detector.std)


# A 3000×2 strip would reach the detector a few pixels high (and, with RapidOCR's own sizing, ~1,000,000
# px wide): pad such strips first.
_MAX_OCR_ASPECT = 4


def _no_thinner_than(image: Image.Image, max_aspect: float) -> Image.Image:
    """`image` padded with its median colour so the long side is at most `max_aspect` × the short side."""
    width, height = image.size
    short = max(width, height) / max_aspect
    if min(width, height) >= short:
        return image
    background = tuple(int(v) for v in np.median(np.asarray(image).reshape(-1, 3), axis=0))
    padded = Image.new("RGB", (max(width, int(short) + 1), max(height, int(short) + 1)), background)
    padded.paste(image, (0, 0))
    return padded


def _word_gaps(grey: np.ndarray, word: _Word) -> list[float]:
    """x positions of blank column runs in a text line wide enough to be spaces between words."""
    import cv2

    left, top = max(0, int(word.left)), max(0, int(word.top))
    crop = grey[top: int(word.bottom) + 1, left: int(word.right) + 1]
    if min(crop.shape) < 4:
        return []
    threshold, _ = cv2.threshold(crop, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
    # The background is the majority of a line's pixels: dark text on light or light on dark.
    ink = crop < threshold if np.median(crop) >= threshold else crop > threshold
    runs, start = [], None
    for x, inked in enumerate(ink.any(axis=0)):
        if not inked and start is None:
            start = x
        elif inked and start is not None:
            if start > 0:  # blank between two inked columns, not the margin
                runs.append((start, x))
            start = None
    if not runs:
        return []
    # A word gap is clearly wider than the typical (letter) gap and than a fifth of the line's
    # height; tuned on several fonts, JPEG-compressed text and text on noisy photos. Too
    # strict only leaves words joined, too loose would split words, which is worse.
    cut = max(0.2 * crop.shape[0], 1.5 * float(np.median([end - begin for begin, end in runs])))
    return [left + (begin + end) / 2 for begin, end in runs if end - begin >= cut]


def _restore_spaces(text: str, centres: tuple[float, ...], gaps: list[float]) -> str:
    """Put back spaces between Latin words where the recogniser ran them together.

    Only long tokens are split (a correctly spaced line is left alone), only
    before a Latin letter or digit (never between two digits), and only at a
    wide blank gap in the pixels.
    """
    cuts = set()
    for token in re.finditer(r"\S{8,}", text):
        for i in range(token.start() + 1, token.end()):
            if _separable(text[i - 1], text[i]) and any(centres[i - 1] < gap < centres[i] for gap in gaps):
                cuts.add(i)
    return "".join((" " if i in cuts else "") + ch for i, ch in enumerate(text))


def _separable(before: str, after: str) -> bool:
    latin = before.isascii() and after.isascii() and (before.isalnum() or before in ",.;:!?") and after.isalnum()
    return latin and not (before.isdigit() and after.isdigit())


def _word(box: list[list[float]], text: str, details: list) -> _Word:
    """A `_Word` from one RapidOCR result; `details` is [character boxes, characters, scores]."""
    xs, ys = [p[0] for p in box], [p[1] for p in box]
    char_boxes, chars = (details + [None, None])[:2]
    aligned = chars is not None and "".join(chars) == text and len(char_boxes) == len(text)
    centres = tuple((b[0][0] + b[1][0]) / 2 for b in char_boxes) if aligned else ()
    return _Word(text, min(xs), min(ys), max(xs), max(ys), centres)


def _without_overlaps(line: list[_Word]) -> list[_Word]:
    """Drop letters read twice: the detector can cut one word into overlapping boxes ("NO P" + "PARKING")."""
    kept = []
    for word, following in zip(line, line[1:] + [None]):
        if following is not None and word.centres and word.right > following.left:
            keep = next((i for i, centre in enumerate(word.centres) if centre >= following.left), len(word.text))
            word = replace(word, text=word.text[:keep], centres=word.centres[:keep])
        if word.text.strip():
            kept.append(word)
    return kept


def _tidy(word: _Word, grey: np.ndarray) -> str:
    text = _restore_spaces(word.text, word.centres, _word_gaps(grey, word)) if word.centres else word.text
    # NFKC turns the recogniser's full-width punctuation ("，：") into ASCII.
    return " ".join(unicodedata.normalize("NFKC", text).split())


def _lines(words: list[_Word]) -> list[list[_Word]]:
    """Group words into lines by vertical overlap, then order lines and words.

    Two words share a line when they overlap vertically by at least half the
    shorter one's height; that tolerates slightly tilted text and mixed sizes.
    """
    lines: list[list[_Word]] = []
    for word in sorted(words, key=lambda w: (w.top + w.bottom) / 2):
        best, best_overlap = None, 0.0
        for line in lines:
            top, bottom = min(w.top for w in line), max(w.bottom for w in line)
            overlap = min(bottom, word.bottom) - max(top, word.top)
            shorter = min(word.height, min(w.height for w in line))
            if overlap >= 0.5 * shorter and overlap > best_overlap:
                best, best_overlap = line, overlap
        if best is None:
            lines.append([word])
        else:
            best.append(word)
    lines.sort(key=lambda line: min(w.top for w in line))
    return [sorted(line, key=lambda w: w.left) for line in lines]
