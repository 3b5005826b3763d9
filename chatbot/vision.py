"""What a photo holds, as short English notes a text-only language model can read.

Each `ImageAnalyzer` turns a `LoadedImage` into zero or more `Observation`s:
the text in it (OCR), faces, plain facts (size, brightness, colours, kind of
picture, EXIF) and optionally a caption from a Hugging Face model. Analyzers
say nothing rather than something likely false: an empty list is a fine answer.

Analyzers load their models once, in `__init__`, and serialise model calls
with a lock, so one instance of each can be shared by every chat session.
"""

from __future__ import annotations

import logging
import re
import threading
import unicodedata
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from chatbot.errors import UserFacingError
from chatbot.images import LoadedImage
from chatbot.state import Observation

log = logging.getLogger(__name__)


class ImageAnalyzer(ABC):
    name: str

    @abstractmethod
    def analyze(self, img: LoadedImage) -> list[Observation]:
        """Notes about `img`; attachment is left "" for the encoder to fill in."""


def _downscaled(image: Image.Image, longest: int) -> Image.Image:
    """`image` with its longest side at most `longest` px (the same object if already small)."""
    if max(image.size) <= longest:
        return image
    scale = longest / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    # reducing_gap: box-reduce first, then filter; much faster than a plain LANCZOS on 12 MP.
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=2.0)


def _plural(count: int, singular: str, plural: str) -> str:
    return f"{count} {singular if count == 1 else plural}"


# --------------------------------------------------------------------------- OCR


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

    def __init__(self, *, max_side: int = 1600, min_score: float = 0.6, max_chars: int = 600) -> None:
        from rapidocr_onnxruntime import RapidOCR

        self._engine = RapidOCR()
        self._max_side = max_side
        self._min_score = min_score  # below this RapidOCR mostly "reads" texture as random letters
        self._max_chars = max_chars  # a full page would crowd out the conversation
        self._lock = threading.Lock()

    def read_lines(self, img: LoadedImage) -> list[str]:
        """The text as lines in reading order: top to bottom, each left to right."""
        small = _no_thinner_than(_downscaled(img.image, self._max_side), _MAX_OCR_ASPECT)
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

    def analyze(self, img: LoadedImage) -> list[Observation]:
        lines = self.read_lines(img)
        if not lines:
            return []
        text = " / ".join(lines)
        if len(text) > self._max_chars:
            text = text[: self._max_chars - 1].rstrip() + "…"
        return [Observation(kind="ocr", text=f'text reads: "{text}"', source=self.name)]


# RapidOCR upscales the short side of an image to 736 px before detection, so a 3000×2
# strip would become ~1,000,000 px wide and exhaust memory; pad such strips first.
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


# ------------------------------------------------------------------------- faces


@dataclass(frozen=True)
class _Cascade:
    file: str
    singular: str
    plural: str
    kind: str
    min_neighbors: int  # higher = fewer false positives, fewer small or tilted faces found
    equalize: bool  # stretch the histogram first


# Chosen on sample photos, textures and rendered text (also inverted): frontalface_alt2
# gave no false positives where frontalface_default saw "faces" in coins, gravel and
# star fields. Equalising helped the cat cascade find cats but cost the face cascade faces.
_CASCADES = (
    _Cascade("haarcascade_frontalface_alt2.xml", "face", "faces", "faces", 6, equalize=False),
    _Cascade("haarcascade_frontalcatface_extended.xml", "cat face", "cat faces", "cats", 4, equalize=True),
)


class PeopleDetector(ImageAnalyzer):
    """Frontal human faces and cat faces with OpenCV's bundled Haar cascades.

    Haar cascades miss profiles and small faces; finding none says little, so no
    note is made then.
    """

    name = "haar"

    def __init__(self, *, max_side: int = 1600, min_face_fraction: float = 0.015) -> None:
        import cv2

        if not hasattr(cv2, "CascadeClassifier"):
            raise RuntimeError(f"OpenCV {cv2.__version__} has no Haar cascades (5.x dropped them); "
                               "install opencv-python-headless 4.x")
        folder = Path(cv2.data.haarcascades)
        self._cascades = []
        for spec in _CASCADES:
            classifier = cv2.CascadeClassifier(str(folder / spec.file))
            if classifier.empty():
                raise RuntimeError(f"could not load the Haar cascade {folder / spec.file}")
            self._cascades.append((spec, classifier))
        self._cv2 = cv2
        self._max_side = max_side
        self._min_face_fraction = min_face_fraction  # of the shorter side: smaller hits are mostly noise
        self._lock = threading.Lock()

    def analyze(self, img: LoadedImage) -> list[Observation]:
        cv2 = self._cv2
        grey = np.asarray(_downscaled(img.image, self._max_side).convert("L"))
        side = max(20, round(min(grey.shape) * self._min_face_fraction))
        observations = []
        with self._lock:
            for spec, classifier in self._cascades:
                boxes = classifier.detectMultiScale(cv2.equalizeHist(grey) if spec.equalize else grey,
                                                    scaleFactor=1.1, minNeighbors=spec.min_neighbors,
                                                    minSize=(side, side))
                count = len(_without_nested([tuple(map(int, b)) for b in boxes]))
                if count:
                    observations.append(Observation(kind=spec.kind, source=self.name,
                                                    text=f"{_plural(count, spec.singular, spec.plural)} detected"))
        return observations


def _without_nested(boxes: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int, int]]:
    """Drop boxes mostly inside a bigger one: the same face found at two scales."""
    kept: list[tuple[int, int, int, int]] = []
    for box in sorted(boxes, key=lambda b: -b[2] * b[3]):
        if all(_intersection(box, other) < 0.5 * box[2] * box[3] for other in kept):
            kept.append(box)
    return kept


def _intersection(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> int:
    width = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    height = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return max(0, width) * max(0, height)


# ------------------------------------------------------------------------- facts


# Colour names by hue range in degrees, before the refinements in `_colour_shares`.
_HUES = (("red", 0, 15), ("orange", 15, 40), ("yellow", 40, 70), ("green", 70, 165), ("teal", 165, 195),
         ("blue", 195, 255), ("purple", 255, 290), ("pink", 290, 345), ("red", 345, 361))
_ACHROMATIC = ("black", "grey", "white")


class ImageFacts(ImageAnalyzer):
    """Size, orientation, kind of picture, brightness, main colours and EXIF facts."""

    name = "facts"

    def analyze(self, img: LoadedImage) -> list[Observation]:
        thumb = _downscaled(img.image, 256)
        parts = [f"{_size_words(img.width, img.height)} {_orientation(img.width, img.height)} {_kind(img.image)}"]
        if img.frames > 1:
            unit = "pages" if img.format == "TIFF" else "frames"
            parts.append(f"{img.format} with {img.frames} {unit} (only the first is described)")
        brightness = _brightness(thumb)
        if brightness:
            parts.append(brightness)
        parts.append(_colour_phrase(_colour_shares(thumb)))
        observations = [Observation(kind="facts", text=", ".join(parts), source=self.name)]
        exif = _exif_phrase(img.exif)
        if exif:
            observations.append(Observation(kind="facts", text=exif, source=self.name))
        return observations


def _size_words(width: int, height: int) -> str:
    megapixels = width * height / 1e6
    if megapixels < 1:
        return f"{width}×{height}"
    return f"{width}×{height} ({megapixels:.0f} MP)" if megapixels >= 10 else f"{width}×{height} ({megapixels:.1f} MP)"


def _orientation(width: int, height: int) -> str:
    ratio = width / height
    return "landscape" if ratio > 1.05 else "portrait" if ratio < 1 / 1.05 else "square"


def _brightness(thumb: Image.Image) -> str:
    mean = float(np.asarray(thumb.convert("L")).mean())
    return "dark" if mean < 60 else "dim" if mean < 95 else "bright" if mean > 170 else ""


def _colour_shares(thumb: Image.Image) -> dict[str, float]:
    """Share of pixels per everyday colour name, largest first."""
    hsv = np.asarray(thumb.convert("HSV")).reshape(-1, 3).astype(np.float64)
    hue, sat, val = hsv[:, 0] * 360 / 256, hsv[:, 1] / 255, hsv[:, 2] / 255
    names = np.full(hue.shape, "grey", dtype=object)
    for name, low, high in _HUES:
        names[(hue >= low) & (hue < high)] = name
    orange = names == "orange"
    # Orange hues at low brightness or saturation are what people call brown or beige (wood, skin, sand).
    names[orange & (val < 0.6)] = "brown"
    names[orange & (val >= 0.6) & ((sat < 0.7) | (val < 0.7))] = "beige"
    names[(names == "yellow") & (val < 0.55)] = "olive"
    names[(names == "red") & (val > 0.75) & (sat < 0.5)] = "pink"
    achromatic = (sat < 0.15) | ((sat < 0.3) & (val > 0.9)) | (val < 0.18)
    names[achromatic] = np.where(val[achromatic] < 0.3, "black", np.where(val[achromatic] >= 0.85, "white", "grey"))
    labels, counts = np.unique(names.astype(str), return_counts=True)
    order = np.argsort(-counts)
    return {str(labels[i]): float(counts[i] / names.size) for i in order}


def _colour_phrase(shares: dict[str, float]) -> str:
    main = [name for name, share in shares.items() if share >= 0.12][:3]
    if not main:
        return "many different colours"
    listed = main[0] if len(main) == 1 else ", ".join(main[:-1]) + " and " + main[-1]
    colourful = sum(share for name, share in shares.items() if name not in _ACHROMATIC)
    prefix = "black and white (greyscale), " if colourful < 0.02 and len(main) > 1 else ""
    return f"{prefix}mostly {listed}"


def _kind(image: Image.Image) -> str:
    """What sort of picture this is; "picture" when the signs disagree."""
    work = np.asarray(_downscaled(image, 1200).convert("L"))
    if _looks_like_text_page(work):
        return "document or page of text"
    flat = _flatness(image)
    # Camera sensors add noise, so neighbouring pixels rarely match exactly in a photo;
    # rendered screens and drawings are mostly exactly flat areas.
    if flat >= 0.75:
        return "screenshot or graphic"
    return "photo" if flat <= 0.45 else "picture"


def _flatness(image: Image.Image) -> float:
    """Share of horizontally adjacent pixel pairs that are exactly equal, at full resolution."""
    pixels = np.asarray(image)
    rows = pixels[:: max(1, pixels.shape[0] // 300)].astype(np.int16)
    if rows.shape[1] < 2:
        return 1.0
    return float((np.abs(np.diff(rows, axis=1)).max(axis=2) == 0).mean())


def _looks_like_text_page(grey: np.ndarray) -> bool:
    """A light background with many glyph-sized dark marks sitting on shared lines."""
    import cv2

    if (grey > 170).mean() < 0.45:
        return False
    # A local threshold copes with the uneven light of a photographed page.
    ink = cv2.adaptiveThreshold(grey, 255, cv2.ADAPTIVE_THRESH_MEAN_C, cv2.THRESH_BINARY_INV, 25, 15)
    if not 0.005 <= (ink > 0).mean() <= 0.35:
        return False
    _count, _labels, stats, _centroids = cv2.connectedComponentsWithStats(ink, connectivity=8)
    width, height, area = stats[1:, cv2.CC_STAT_WIDTH], stats[1:, cv2.CC_STAT_HEIGHT], stats[1:, cv2.CC_STAT_AREA]
    glyph = (height >= 5) & (height <= 80) & (width <= 4 * height) & (area >= 8)
    bottoms = (stats[1:, cv2.CC_STAT_TOP] + height)[glyph][:2000].astype(np.float64)
    heights = height[glyph][:2000].astype(np.float64)
    if bottoms.size < 30:
        return False
    # Letters of one line share a baseline and a similar height.
    same_line = (np.abs(bottoms[:, None] - bottoms[None, :]) <= 0.3 * heights[:, None]) & (
        np.abs(np.log(heights[:, None] / heights[None, :])) <= np.log(2))
    return int((same_line.sum(axis=1) >= 5).sum()) >= 30


def _exif_phrase(exif: dict[str, str]) -> str:
    date, camera = exif.get("date_taken"), exif.get("camera")
    if not (date or camera):
        return ""
    article = "an" if camera and camera[0].lower() in "aeiou" else "a"
    return "taken" + (f" {date}" if date else "") + (f" with {article} {camera}" if camera else "")


# ----------------------------------------------------------------------- caption


class Captioner(ImageAnalyzer):
    """A one-line description from a Hugging Face captioning or VQA model (hub id or local folder).

    Captioning models (BLIP, BLIP-2, GIT, vision encoder-decoders) describe the
    picture unprompted; visual-question-answering models (BLIP VQA) are asked `question`.
    Nothing is downloaded: a hub id must already be in the local Hugging Face cache.
    """

    def __init__(self, model: str | Path, *, question: str = "What is in this picture?",
                 max_new_tokens: int = 30, max_side: int = 1024) -> None:
        self.name = f"caption:{model}"
        self._max_new_tokens = max_new_tokens
        self._max_side = max_side  # processors resize to ~384 px anyway; skip their work on 12 MP
        self._lock = threading.Lock()
        try:
            self._processor, self._model, asks = _load_caption_model(str(model))
        except Exception as error:  # noqa: BLE001 - any loading failure means the same to the user
            log.warning("Could not load captioning model %s: %s", model, error)
            raise UserFacingError(f"The image captioning model '{model}' could not be loaded. Check the "
                                  "name or folder; this app works offline, so a hub model must already be "
                                  "in the local Hugging Face cache.") from error
        self.question = question if asks else None  # what a VQA model is asked; None for captioners

    def caption(self, img: LoadedImage) -> str:
        import torch

        picture = _downscaled(img.image, self._max_side)
        text = {"text": self.question} if self.question else {}
        inputs = self._processor(images=picture, return_tensors="pt", **text)
        with self._lock, torch.inference_mode():
            output = self._model.generate(**inputs, max_new_tokens=self._max_new_tokens, do_sample=False)
        return " ".join(self._processor.batch_decode(output, skip_special_tokens=True)[0].split())

    def analyze(self, img: LoadedImage) -> list[Observation]:
        caption = self.caption(img)
        return [Observation(kind="caption", text=f"caption: {caption}", source=self.name)] if caption else []


def _load_caption_model(model: str):
    """(processor, model, whether it answers a question) for a captioning or VQA checkpoint."""
    import transformers
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
        MODEL_FOR_VISUAL_QUESTION_ANSWERING_MAPPING_NAMES,
    )

    config = AutoConfig.from_pretrained(model, local_files_only=True)
    architecture = (config.architectures or [""])[0]
    # A VQA checkpoint loaded as the captioning class would get a randomly initialised
    # decoder and talk nonsense, so honour the architecture the checkpoint names.
    vqa_classes = set(MODEL_FOR_VISUAL_QUESTION_ANSWERING_MAPPING_NAMES.values())
    asks = architecture in vqa_classes and architecture not in set(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.values())
    model_class = getattr(transformers, architecture) if asks else AutoModelForImageTextToText
    processor = AutoProcessor.from_pretrained(model, local_files_only=True)
    if getattr(processor, "chat_template", None):
        raise ValueError("chat vision-language models need a conversation, not supported as a captioner")
    loaded = model_class.from_pretrained(model, local_files_only=True).eval()
    if not loaded.can_generate():
        raise ValueError(f"{architecture} picks answers from a fixed list instead of writing text")
    return processor, loaded, asks


def load_analyzers(caption_model: str | None = None) -> list[ImageAnalyzer]:
    """The default analyzers, plus a captioner when a model is named (UserFacingError if it won't load)."""
    analyzers: list[ImageAnalyzer] = [TextReader(), PeopleDetector(), ImageFacts()]
    if caption_model:
        analyzers.append(Captioner(caption_model))
    return analyzers
