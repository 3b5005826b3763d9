"""What a photo holds, as short English notes a text-only language model can read.

Each `ImageAnalyzer` turns a `LoadedImage` into zero or more `Observation`s:
what the whole picture shows (an ImageNet classifier), the objects in it with
counts and positions (a COCO detector), the text in it (OCR), faces, plain facts
(size, brightness, colours, kind of picture, EXIF) and optionally a caption or an
answer to the user's question from a Hugging Face model. Analyzers say nothing
rather than something likely false: an empty list is a fine answer.

Analyzers load their models once, in `__init__`, and serialise model calls
with a lock, so one instance of each can be shared by every chat session. The app
wraps the model-backed ones in `OnDemandAnalyzer`: loaded at the first photo,
released when unused for a while.
"""

from __future__ import annotations

from chatbot.perception.images import LoadedImage
from chatbot.perception.on_demand import OnDemand
from chatbot.perception.vision.base import ImageAnalyzer
from chatbot.perception.vision.captioner import Captioner
from chatbot.perception.vision.classifier import SceneClassifier
from chatbot.perception.vision.detector import ObjectDetector
from chatbot.perception.vision.faces import PeopleDetector
from chatbot.perception.vision.facts import ImageFacts
from chatbot.perception.vision.ocr import TextReader

__all__ = ["Captioner", "ImageAnalyzer", "ImageFacts", "ObjectDetector", "OnDemandAnalyzer", "PeopleDetector",
           "SceneClassifier", "TextReader", "load_analyzers"]


class OnDemandAnalyzer(ImageAnalyzer):
    """An analyser of class `kind` made at the first photo and released after `release_after` idle seconds.

    Its other methods (TextReader.read_lines, for scanned PDF pages) are reached through it the same way.
    """

    def __init__(self, kind: type[ImageAnalyzer], *, release_after: float | None = None) -> None:
        self.kind = kind
        self.name = kind.name
        self.wants_question = kind.wants_question
        self._analyzer = OnDemand(kind, name=f"the image model '{kind.name}'", release_after=release_after,
                                  group="photo models")

    @property
    def loaded(self) -> bool:
        return self._analyzer.loaded

    def analyze(self, img: LoadedImage, question: str = ""):
        with self._analyzer.use() as analyzer:
            return analyzer.analyze(img, question)

    def __getattr__(self, name: str):
        if name.startswith("_") or not callable(getattr(self.__dict__.get("kind"), name, None)):
            raise AttributeError(name)

        def call(*args, **kwargs):
            with self._analyzer.use() as analyzer:
                return getattr(analyzer, name)(*args, **kwargs)
        return call


def load_analyzers(caption_model: str | None = None, *, on_demand: bool = False,
                   release_after: float | None = None) -> list[ImageAnalyzer]:
    """The default analyzers, plus a captioner when a model is named (UserFacingError if it won't load).

    Their order is the order of the notes: what the picture is, then what is in it, then details.
    `on_demand`: the default models load at the first photo (and are released after `release_after`
    idle seconds) instead of now; a named captioner still loads now, so a wrong name stops the start.
    """
    kinds: list[type[ImageAnalyzer]] = [SceneClassifier, ObjectDetector, TextReader, PeopleDetector]
    analyzers: list[ImageAnalyzer] = [OnDemandAnalyzer(kind, release_after=release_after) if on_demand else kind()
                                      for kind in kinds]
    analyzers.append(ImageFacts())
    if caption_model:
        analyzers.append(Captioner(caption_model))
    return analyzers
