"""What a photo holds, as short English notes a text-only language model can read.

Each `ImageAnalyzer` turns a `LoadedImage` into zero or more `Observation`s:
what the whole picture shows (an ImageNet classifier), the objects in it with
counts and positions (a COCO detector), the text in it (OCR), faces, plain facts
(size, brightness, colours, kind of picture, EXIF) and optionally a caption or an
answer to the user's question from a Hugging Face model. Analyzers say nothing
rather than something likely false: an empty list is a fine answer.

Analyzers load their models once, in `__init__`, and serialise model calls
with a lock, so one instance of each can be shared by every chat session.
"""

from __future__ import annotations

from chatbot.perception.vision.base import ImageAnalyzer
from chatbot.perception.vision.captioner import Captioner
from chatbot.perception.vision.classifier import SceneClassifier
from chatbot.perception.vision.detector import ObjectDetector
from chatbot.perception.vision.faces import PeopleDetector
from chatbot.perception.vision.facts import ImageFacts
from chatbot.perception.vision.ocr import TextReader

__all__ = ["Captioner", "ImageAnalyzer", "ImageFacts", "ObjectDetector", "PeopleDetector", "SceneClassifier",
           "TextReader", "load_analyzers"]


def load_analyzers(caption_model: str | None = None) -> list[ImageAnalyzer]:
    """The default analyzers, plus a captioner when a model is named (UserFacingError if it won't load).

    Their order is the order of the notes: what the picture is, then what is in it, then details.
    """
    analyzers: list[ImageAnalyzer] = [SceneClassifier(), ObjectDetector(), TextReader(), PeopleDetector(),
                                      ImageFacts()]
    if caption_model:
        analyzers.append(Captioner(caption_model))
    return analyzers
