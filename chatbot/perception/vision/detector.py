"""Things in the photo, counted and placed: NanoDet-m (COCO's 80 kinds of object), ONNX via onnxruntime."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
from PIL import Image

from chatbot.perception.images import LoadedImage
from chatbot.perception.vision.base import MODELS_DIR, ImageAnalyzer, confidence_word, plural, with_article
from chatbot.state import Observation, ObservationKind

MODEL_FILE = MODELS_DIR / "nanodet-m-416.onnx"  # made by tools/convert_nanodet.py
_SIZE = 416
_STRIDES = (8, 16, 32)
_BINS = 11  # NanoDet's box sides are distributions over 0..10 strides (Generalised Focal Loss)
# NanoDet's training normalisation, in its BGR channel order.
_MEAN = np.array([103.53, 116.28, 123.675], np.float32)
_STD = np.array([57.375, 57.12, 58.395], np.float32)

# COCO's 80 categories in the model's output order, as (singular, plural).
_COCO = [(w, p or w + "s") for w, p in (
    ("person", "people"), ("bicycle", ""), ("car", ""), ("motorbike", ""), ("aeroplane", ""), ("bus", "buses"),
    ("train", ""), ("truck", ""), ("boat", ""), ("traffic light", ""), ("fire hydrant", ""), ("stop sign", ""),
    ("parking meter", ""), ("bench", "benches"), ("bird", ""), ("cat", ""), ("dog", ""), ("horse", ""),
    ("sheep", "sheep"), ("cow", ""), ("elephant", ""), ("bear", ""), ("zebra", ""), ("giraffe", ""),
    ("backpack", ""), ("umbrella", ""), ("handbag", ""), ("tie", ""), ("suitcase", ""), ("frisbee", ""),
    ("pair of skis", "pairs of skis"), ("snowboard", ""), ("ball", ""), ("kite", ""), ("baseball bat", ""),
    ("baseball glove", ""), ("skateboard", ""), ("surfboard", ""), ("tennis racket", ""), ("bottle", ""),
    ("wine glass", "wine glasses"), ("cup", ""), ("fork", ""), ("knife", "knives"), ("spoon", ""),
    ("bowl", ""), ("banana", ""), ("apple", ""), ("sandwich", "sandwiches"), ("orange", ""), ("broccoli", "broccoli"),
    ("carrot", ""), ("hot dog", ""), ("pizza", ""), ("doughnut", ""), ("cake", ""), ("chair", ""), ("sofa", ""),
    ("potted plant", ""), ("bed", ""), ("dining table", ""), ("toilet", ""), ("TV", ""), ("laptop", ""),
    ("computer mouse", "computer mice"), ("remote control", ""), ("keyboard", ""), ("mobile phone", ""),
    ("microwave", ""), ("oven", ""), ("toaster", ""), ("sink", ""), ("fridge", ""), ("book", ""), ("clock", ""),
    ("vase", ""), ("pair of scissors", "pairs of scissors"), ("teddy bear", ""), ("hair dryer", ""),
    ("toothbrush", "toothbrushes"))]


@dataclass(frozen=True)
class Detection:
    kind: int  # COCO category index
    score: float
    box: tuple[float, float, float, float]  # left, top, right, bottom as fractions of the picture

    @property
    def name(self) -> str:
        return _COCO[self.kind][0]


class ObjectDetector(ImageAnalyzer):
    """People, animals, vehicles and household things (COCO's 80 kinds) with counts and rough positions.

    NanoDet-m (Apache-2.0, 0.95 M parameters, 416 px) is small and fast but misses small
    things and sometimes names a close-up wrongly; only detections above `min_score` are said.
    """

    name = "nanodet"

    def __init__(self, *, min_score: float = 0.45, threads: int = 2) -> None:
        from chatbot.perception.onnx import session

        self._session = session(MODEL_FILE, threads, give_back_memory=True)
        self._min_score = min_score
        self._lock = threading.Lock()

    def detect(self, img: LoadedImage) -> list[Detection]:
        """Detections above `min_score`, overlapping duplicates removed, best first."""
        x, extent = _letterboxed(img.image)
        with self._lock:
            outputs = dict(zip((o.name for o in self._session.get_outputs()), self._session.run(None, {"input_1": x})))
        found: list[Detection] = []
        # Outputs: Identity..Identity_2 class scores (sigmoid) and Identity_3..5 box distributions, per stride.
        for level, stride in enumerate(_STRIDES):
            scores = outputs["Identity" + (f"_{level}" if level else "")][0]
            boxes = outputs[f"Identity_{level + 3}"][0]
            found += _decode(scores, boxes, stride, self._min_score, extent)
        return _non_maximum_suppression(found)

    def analyze(self, img: LoadedImage, question: str = "") -> list[Observation]:
        detections = self.detect(img)
        if not detections:
            return []
        return [Observation(kind=ObservationKind.OBJECTS, source=self.name,
                            text="objects found: " + "; ".join(_describe(detections)))]


def _letterboxed(image: Image.Image) -> tuple[np.ndarray, tuple[float, float]]:
    """The network input (the picture scaled to fit 416 px, keeping its shape, padded with the mean
    colour: squashing made a cat's close-up a "person") and the part of it the picture fills, in px."""
    scale = _SIZE / max(image.size)
    width, height = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    pixels = np.zeros((_SIZE, _SIZE, 3), np.float32)  # 0 = the mean after normalising
    resized = np.asarray(image.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=2.0), np.float32)
    pixels[:height, :width] = (resized[:, :, ::-1] - _MEAN) / _STD
    return pixels.transpose(2, 0, 1)[None].copy(), (float(width), float(height))


def _decode(scores: np.ndarray, boxes: np.ndarray, stride: int, min_score: float,
            extent: tuple[float, float]) -> list[Detection]:
    cells, kinds = np.nonzero(scores >= min_score)
    if not len(cells):
        return []
    side = _SIZE // stride
    logits = boxes[cells].reshape(-1, 4, _BINS)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    distances = (weights / weights.sum(-1, keepdims=True)) @ np.arange(_BINS, dtype=np.float32) * stride
    cx, cy = (cells % side + 0.5) * stride, (cells // side + 0.5) * stride
    found = []
    for i, (cell, kind) in enumerate(zip(cells, kinds)):
        left, top, right, bottom = distances[i]
        corners = ((cx[i] - left) / extent[0], (cy[i] - top) / extent[1],
                   (cx[i] + right) / extent[0], (cy[i] + bottom) / extent[1])
        box = tuple(float(np.clip(v, 0, 1)) for v in corners)
        found.append(Detection(int(kind), float(scores[cell, kind]), box))
    return found


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _non_maximum_suppression(found: list[Detection], overlap: float = 0.5) -> list[Detection]:
    kept: list[Detection] = []
    for detection in sorted(found, key=lambda d: -d.score):
        if all(other.kind != detection.kind or _iou(other.box, detection.box) < overlap for other in kept):
            kept.append(detection)
    return kept


def _position(box: tuple[float, float, float, float]) -> str:
    """Where a box's centre lies on a 3×3 grid: "top left" … "centre" … "bottom right"."""
    x, y = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    row = "top" if y < 1 / 3 else "bottom" if y > 2 / 3 else ""
    column = "left" if x < 1 / 3 else "right" if x > 2 / 3 else ""
    return f"{row} {column}".strip() or "centre"


def _describe(detections: list[Detection]) -> list[str]:
    """One phrase per kind of object, most confident first: "probably 2 cups (centre, left)"."""
    by_kind: dict[int, list[Detection]] = {}
    for detection in detections:
        by_kind.setdefault(detection.kind, []).append(detection)
    phrases = []
    for kind, group in sorted(by_kind.items(), key=lambda item: -item[1][0].score):
        singular, many = _COCO[kind]
        count = plural(len(group), singular, many) if len(group) > 1 else with_article(singular)
        places = list(dict.fromkeys(_position(d.box) for d in group))
        phrases.append(f"{confidence_word(group[0].score)} {count} ({', '.join(places)}, {group[0].score:.0%})")
    return phrases
