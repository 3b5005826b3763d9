"""Opening a photo the user attached, safely, as an upright RGB picture.

Everything a user can get wrong (an empty or huge file, a document renamed to
.jpg, a half-uploaded JPEG, a "decompression bomb") becomes a `UserFacingError`
with a message they can act on; analyzers only ever see a clean RGB image.
"""

from __future__ import annotations

import io
import logging
import threading
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from chatbot.errors import UserFacingError

log = logging.getLogger(__name__)

# Pillow format names accepted. Its JPEG reader reports the JPEGs many phones and
# cameras write (with an extra preview image) as "MPO"; to a user they are JPEGs.
_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
_FORMAT_ALIASES = {"MPO": "JPEG"}

NOT_AN_IMAGE = "That file doesn't look like an image I can read (JPEG, PNG, WebP, GIF, BMP or TIFF)."
DAMAGED = "That image seems to be damaged or incomplete, so I can't read it. Could you send it again?"


@dataclass
class LoadedImage:
    image: Image.Image  # RGB, EXIF orientation applied
    format: str  # "JPEG", "PNG", ...
    width: int  # after orientation
    height: int
    exif: dict[str, str] = field(default_factory=dict)  # "date_taken", "camera": facts worth saying
    frames: int = 1  # >1 for an animated GIF/WebP or a multi-page TIFF; only the first is shown


def load_image(path: str | Path, *, max_bytes: int = 20 * 2**20, max_pixels: int = 40_000_000) -> LoadedImage:
    """Read an image file into a `LoadedImage`; raise `UserFacingError` for anything unusable."""
    data = _read_bytes(Path(path), max_bytes)
    try:
        with _open_header(data) as opened:
            # The size comes from the header alone: refuse before any pixels are decoded.
            _check_pixels(*opened.size, max_pixels)
            fmt = _FORMAT_ALIASES.get(opened.format or "", opened.format or "")
            frames = getattr(opened, "n_frames", 1)
            opened.load()
            exif = _exif_facts(opened)
            rgb = to_rgb(_upright(opened))
    except UserFacingError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UserFacingError(_too_many_pixels_message(max_pixels)) from None
    except UnidentifiedImageError:
        raise UserFacingError(NOT_AN_IMAGE) from None
    except (OSError, SyntaxError, ValueError, EOFError):
        # Truncated data, corrupt chunks, unsupported sub-formats (e.g. 12-bit JPEG).
        raise UserFacingError(DAMAGED) from None
    except Exception:  # noqa: BLE001 - Pillow's decoders raise all sorts on malformed files
        log.warning("Unexpected error decoding an image", exc_info=True)
        raise UserFacingError(DAMAGED) from None
    return LoadedImage(image=rgb, format=fmt, width=rgb.width, height=rgb.height, exif=exif, frames=frames)


# `warnings.catch_warnings` swaps process-wide state; serialise it between threads.
_WARNINGS_LOCK = threading.Lock()


def _open_header(data: bytes) -> Image.Image:
    """Parse the header only (Pillow decodes pixels lazily, on `load`)."""
    with _WARNINGS_LOCK, warnings.catch_warnings():
        # Pillow merely warns between its own pixel limit and twice that; treat it as the refusal it means.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data), formats=_FORMATS)


def _read_bytes(path: Path, max_bytes: int) -> bytes:
    try:
        size = path.stat().st_size
        if size == 0:
            raise UserFacingError("That file is empty, so there's no picture in it.")
        if size > max_bytes:
            raise UserFacingError(
                f"That image is too big ({_size_text(size)}); the limit is {_size_text(max_bytes)}. "
                "Could you send a smaller version?")
        return path.read_bytes()
    except OSError:
        raise UserFacingError("I couldn't open that file. Could you attach it again?") from None


def _size_text(n: int) -> str:
    if n < 2**20:
        return f"{max(1, round(n / 2**10))} KB"
    return f"{n / 2**20:.1f} MB" if n < 10 * 2**20 else f"{n / 2**20:.0f} MB"


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise UserFacingError(DAMAGED)
    if width * height > max_pixels:
        raise UserFacingError(f"That image is {width}×{height} pixels, which is more than I can handle. "
                              + _too_many_pixels_message(max_pixels))


def _too_many_pixels_message(max_pixels: int) -> str:
    return (f"Images can have at most {max_pixels / 1e6:g} megapixels; "
            "please send a smaller or resized version.")


def _upright(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - a corrupt EXIF block must not cost the user their photo
        return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB: transparency onto white, high bit depths scaled down."""
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(image)), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        # Transparent areas are shown on white in chat apps; black would look like a dark photo.
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")  # P, L, 1, CMYK, YCbCr, RGB (a copy, detached from the file)


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """Grey levels of a 16-bit, 32-bit or float image mapped to 0..255."""
    values = values.astype(np.float64)
    low, high = float(values.min()), float(values.max())
    if low >= 0 and high <= 1.0 and values.dtype.kind == "f":
        scaled = values * 255  # float images are conventionally 0..1
    elif low >= 0 and high <= 255:
        scaled = values  # 8-bit data stored in a wide container
    elif low >= 0 and high <= 65535:
        scaled = values / 257  # 16-bit data: 65535 -> 255
    else:
        scaled = (values - low) * (255 / (high - low))  # unusual ranges: stretch to fit
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _exif_facts(image: Image.Image) -> dict[str, str]:
    """Date taken and camera, when the file records them; never fails."""
    try:
        exif = image.getexif()
        ifd = exif.get_ifd(ExifTags.IFD.Exif)
    except Exception:  # noqa: BLE001 - EXIF is a bonus: malformed blocks are common
        return {}
    facts: dict[str, str] = {}
    # IFD0's DateTime is when software last saved the file, not when the photo was taken.
    taken = _exif_date(ifd.get(ExifTags.Base.DateTimeOriginal) or ifd.get(ExifTags.Base.DateTimeDigitized))
    if taken:
        facts["date_taken"] = taken
    camera = _camera(_exif_text(exif.get(ExifTags.Base.Make)), _exif_text(exif.get(ExifTags.Base.Model)))
    if camera:
        facts["camera"] = camera
    return facts


def _exif_text(value: object) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        return ""
    text = " ".join(value.replace("\x00", " ").split())
    return text if text.isprintable() and len(text) <= 64 else ""


def _exif_date(value: object) -> str:
    """EXIF's "2024:05:01 14:03:22" as "2024-05-01 14:03"; "" if absent or a placeholder."""
    text = _exif_text(value)
    try:
        return datetime.strptime(text[:19], "%Y:%m:%d %H:%M:%S").strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return ""


def _camera(make: str, model: str) -> str:
    # Models usually repeat the make ("Canon" / "Canon EOS 80D", "NIKON CORPORATION" / "NIKON D750").
    brand = make.split(" ")[0] if make else ""
    if model and brand and model.lower().startswith(brand.lower()):
        return model
    return " ".join(part for part in (brand, model) if part)
