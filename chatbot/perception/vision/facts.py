"""Plain facts about a photo: size, kind of picture, brightness, colours, EXIF."""

from __future__ import annotations

import logging

import numpy as np
from PIL import Image

from chatbot.perception.images import LoadedImage
from chatbot.perception.vision.base import ImageAnalyzer, downscaled
from chatbot.state import Observation, ObservationKind

log = logging.getLogger(__name__)


# Colour names by hue range in degrees, before the refinements in `_colour_shares`.
_HUES = (("red", 0, 15), ("orange", 15, 40), ("yellow", 40, 70), ("green", 70, 165), ("teal", 165, 195),
         ("blue", 195, 255), ("purple", 255, 290), ("pink", 290, 345), ("red", 345, 361))
_ACHROMATIC = ("black", "grey", "white")


class ImageFacts(ImageAnalyzer):
    """Size, orientation, kind of picture, brightness, main colours and EXIF facts."""

    name = "facts"

    def analyze(self, img: LoadedImage, question: str = "") -> list[Observation]:
        thumb = downscaled(img.image, 256)
        parts = [f"{_size_words(img.width, img.height)} {_orientation(img.width, img.height)} {_kind(img.image)}"]
        if img.frames > 1:
            unit = "pages" if img.format == "TIFF" else "frames"
            parts.append(f"{img.format} with {img.frames} {unit} (only the first is described)")
        brightness = _brightness(thumb)
        if brightness:
            parts.append(brightness)
        parts.append(_colour_phrase(_colour_shares(thumb)))
        observations = [Observation(kind=ObservationKind.FACTS, text=", ".join(parts), source=self.name)]
        exif = _exif_phrase(img.exif)
        if exif:
            observations.append(Observation(kind=ObservationKind.FACTS, text=exif, source=self.name))
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
    work = np.asarray(downscaled(image, 1200).convert("L"))
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
