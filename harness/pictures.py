"""Photos with known content, drawn on the spot (no image files to ship)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"


def sign(path: Path, *lines: str) -> Path:
    """A street-sign-like photo with known text, drawn here."""
    image = Image.new("RGB", (1200, 700), (20, 70, 150))
    draw = ImageDraw.Draw(image)
    try:
        font = ImageFont.truetype(FONT, 110)
    except OSError:
        font = ImageFont.load_default(size=110)
    for i, line in enumerate(lines):
        draw.text((600, 220 + 220 * i), line, font=font, fill="white", anchor="mm")
    image.save(path, quality=92)
    return path
