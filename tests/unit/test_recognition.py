"""What the photo shows: the ImageNet classifier and the COCO object detector on real photographs.

The photos are scikit-image's samples (a cat, a cup of coffee, an astronaut, a rocket, a
horse's silhouette, a cameraman): photographed, not drawn by us.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from chatbot.perception.images import LoadedImage
from chatbot.perception.vision import ObjectDetector, SceneClassifier, load_analyzers
from chatbot.perception.vision.classifier import plain_labels
from chatbot.perception.vision.detector import _position

data = pytest.importorskip("skimage.data")
pytestmark = pytest.mark.unit


def photo(name: str) -> LoadedImage:
    image = Image.fromarray(getattr(data, name)()).convert("RGB")
    return LoadedImage(image=image, format="PNG", width=image.width, height=image.height)


def noise() -> LoadedImage:
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (480, 640, 3), dtype=np.uint8))
    return LoadedImage(image=image, format="PNG", width=640, height=480)


def blank(colour: str = "white") -> LoadedImage:
    return LoadedImage(image=Image.new("RGB", (640, 480), colour), format="PNG", width=640, height=480)


@pytest.fixture(scope="module")
def classifier() -> SceneClassifier:
    return SceneClassifier()


@pytest.fixture(scope="module")
def detector() -> ObjectDetector:
    return ObjectDetector()


# --- classifier ----------------------------------------------------------------------------

def test_everyday_words_replace_imagenet_names():
    from chatbot.perception.vision.base import MODELS_DIR

    classes = (MODELS_DIR / "imagenet-classes.txt").read_text().splitlines()
    words = plain_labels(classes)
    assert len(words) == 1000 and "_" not in "".join(words)
    assert {words[i] for i in (281, 282, 283, 284, 285)} == {"cat"}  # tabby, tiger cat, Persian, Siamese, Egyptian
    assert words[207] == "dog" and words[967] == "cup of coffee" and words[638] == "swimsuit"


@pytest.mark.parametrize(("sample", "word"), [("chelsea", "cat"), ("coffee", "cup of coffee")])
def test_the_main_subject_is_named_with_its_probability(classifier, sample, word):
    (best, probability), *_ = classifier.labels(photo(sample))
    assert best == word and probability >= 0.6
    [note] = classifier.analyze(photo(sample))
    assert note.kind == "labels" and note.text.startswith(f"what it shows: probably a {word} (")


def test_a_less_certain_subject_is_hedged(classifier):
    [note] = classifier.analyze(photo("rocket"))
    assert note.text.startswith("what it shows: might be a rocket or missile (")


@pytest.mark.parametrize("image", [noise(), blank(), blank("black"), blank("grey")], ids=["noise", "white", "black", "grey"])
def test_nothing_is_said_about_noise_or_blank_images(classifier, image):
    assert classifier.analyze(image) == []


def test_an_unfamiliar_scene_gives_no_confident_label(classifier):
    # EfficientNet-Lite0 has no "astronaut"; its guesses (helmet, bobsled) stay below the threshold.
    assert classifier.analyze(photo("astronaut")) == []


# --- detector ------------------------------------------------------------------------------

def test_a_person_is_found_with_its_position(detector):
    [note] = detector.analyze(photo("astronaut"))
    assert note.kind == "objects" and note.text.startswith("objects found: probably a person (centre, ")


@pytest.mark.parametrize(("sample", "thing"), [("chelsea", "cat"), ("horse", "horse"), ("camera", "person")])
def test_the_main_object_is_found(detector, sample, thing):
    detections = detector.detect(photo(sample))
    assert detections and detections[0].name == thing


def test_the_cameraman_stands_left_of_centre(detector):
    best = detector.detect(photo("camera"))[0]
    assert _position(best.box) == "left" and 0 <= best.box[0] < best.box[2] <= 1


@pytest.mark.parametrize("image", [noise(), blank(), blank("black")], ids=["noise", "white", "black"])
def test_no_objects_in_noise_or_blank_images(detector, image):
    assert detector.analyze(image) == []


def test_several_objects_of_a_kind_are_counted(detector):
    # Three copies of the astronaut side by side: three people, left, centre and right.
    single = photo("astronaut").image.resize((256, 256))
    strip = Image.new("RGB", (768, 256))
    for i in range(3):
        strip.paste(single, (256 * i, 0))
    [note] = detector.analyze(LoadedImage(image=strip, format="PNG", width=768, height=256))
    assert note.text.startswith("objects found: probably 3 people (") and all(
        place in note.text for place in ("left", "centre", "right"))


def test_positions_on_a_three_by_three_grid():
    assert _position((0.0, 0.0, 0.2, 0.2)) == "top left"
    assert _position((0.4, 0.4, 0.6, 0.6)) == "centre"
    assert _position((0.7, 0.4, 1.0, 0.6)) == "right"
    assert _position((0.4, 0.8, 0.6, 1.0)) == "bottom"


def test_the_default_analysers_include_both_models():
    names = [a.name for a in load_analyzers()]
    assert names[:2] == ["imagenet", "nanodet"] and {"ocr", "haar", "facts"} <= set(names)
