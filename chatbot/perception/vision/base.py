"""The analyser interface every photo analyser implements, and two helpers they share."""

from __future__ import annotations

from abc import ABC, abstractmethod

from PIL import Image

from chatbot.perception.images import LoadedImage
from chatbot.state import Observation


class ImageAnalyzer(ABC):
    name: str

    @abstractmethod
    def analyze(self, img: LoadedImage) -> list[Observation]:
        """Notes about `img`; attachment is left "" for the encoder to fill in."""


def downscaled(image: Image.Image, longest: int) -> Image.Image:
    """`image` with its longest side at most `longest` px (the same object if already small)."""
    if max(image.size) <= longest:
        return image
    scale = longest / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    # reducing_gap: box-reduce first, then filter; much faster than a plain LANCZOS on 12 MP.
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=2.0)


def plural(count: int, singular: str, plural: str) -> str:
    return f"{count} {singular if count == 1 else plural}"
