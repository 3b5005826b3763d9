"""The analyser interface every photo analyser implements, and the helpers they share."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

from PIL import Image

from chatbot.perception.images import LoadedImage
from chatbot.state import Observation

# Model files committed with the app (converted once by tools/, never downloaded at run time).
MODELS_DIR = Path(__file__).resolve().parents[3] / "assets" / "models"


class ImageAnalyzer(ABC):
    name: str
    # True for analysers that answer the user's words about the photo (a VQA or vision-language
    # model): they run again for each new question, while the others run once per photo.
    wants_question: bool = False
    loaded: bool = True  # whether its model is in memory now (see OnDemandAnalyzer)

    @abstractmethod
    def analyze(self, img: LoadedImage, question: str = "") -> list[Observation]:
        """Notes about `img` (`question` is what the user typed with it); attachment is left "" for the encoder."""


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


def confidence_word(probability: float) -> str:
    """How sure a note sounds; the cut-offs follow the models' measured precision on real photos."""
    return "probably" if probability >= 0.6 else "might be"


def with_article(noun: str) -> str:
    """ "a cat", "an apple", "a TV"."""
    return f"{'an' if noun[:1].lower() in 'aeiou' and not noun[:1].isupper() else 'a'} {noun}"
