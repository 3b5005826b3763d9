"""Faces and cat faces, found with OpenCV's bundled Haar cascades."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chatbot.perception.images import LoadedImage
from chatbot.perception.vision.base import ImageAnalyzer, downscaled, plural
from chatbot.state import Observation, ObservationKind

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Cascade:
    file: str
    singular: str
    plural: str
    kind: ObservationKind
    min_neighbors: int  # higher = fewer false positives, fewer small or tilted faces found
    equalize: bool  # stretch the histogram first


# Chosen on sample photos, textures and rendered text (also inverted): frontalface_alt2
# gave no false positives where frontalface_default saw "faces" in coins, gravel and
# star fields. Equalising helped the cat cascade find cats but cost the face cascade faces.
_CASCADES = (
    _Cascade("haarcascade_frontalface_alt2.xml", "face", "faces", ObservationKind.FACES, 6, equalize=False),
    _Cascade("haarcascade_frontalcatface_extended.xml", "cat face", "cat faces", ObservationKind.CATS, 4, equalize=True),
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

    def analyze(self, img: LoadedImage, question: str = "") -> list[Observation]:
        cv2 = self._cv2
        grey = np.asarray(downscaled(img.image, self._max_side).convert("L"))
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
                                                    text=f"{plural(count, spec.singular, spec.plural)} detected"))
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
