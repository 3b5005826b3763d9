"""The bot names what real photos show, through the API with the bundled models, and says when it cannot tell.

The photos are scikit-image's samples (photographed, not drawn here), saved under neutral names
so nothing but the pixels can tell the model what they show.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client
from PIL import Image

from tests.support.drivers import api_send, text_of

data = pytest.importorskip("skimage.data")

# Photo, plain question, words any right answer contains.
SUBJECTS = [
    ("chelsea", "What animal is in this photo?", ("cat", "kitten")),
    ("coffee", "What is in this photo?", ("coffee", "espresso", "cappuccino", "latte")),
    ("astronaut", "Who or what is in this photo?", ("person", "man", "woman", "astronaut", "people", "someone")),
    ("rocket", "What is in this photo?", ("rocket", "missile", "spacecraft", "space shuttle")),
]
CANNOT_TELL = re.compile(r"\b(can ?not|can't|could ?not|couldn't|unable to|not able to|don'?t know|not sure|unclear|"
                         r"impossible to|no way to|hard to)\b.{0,40}\b(tell|say|see|determine|identify|recogni[sz]e|"
                         r"know|make out)", re.IGNORECASE | re.DOTALL)


def save(pixels: np.ndarray, path: Path) -> Path:
    Image.fromarray(pixels).convert("RGB").save(path)
    return path


def named(answer: str, words: tuple[str, ...]) -> bool:
    return any(re.search(rf"\b{re.escape(w)}", answer, re.IGNORECASE) for w in words)


def test_the_bot_names_the_main_subject_of_real_photos(app_server, tmp_path):
    hits = []
    for number, (sample, question, words) in enumerate(SUBJECTS, start=1):
        photo = save(getattr(data, sample)(), tmp_path / f"IMG_{number:04d}.png")
        chat = api_send(Client(app_server.url, verbose=False), question, [photo])  # a new conversation each
        answer = text_of(chat[-1])
        print(f"{sample}: {answer!r}")
        hits.append(named(answer, words))
    assert sum(hits) >= 3, hits


def test_a_photo_is_still_answered_from_what_was_seen_ten_turns_later(app_server, tmp_path):
    client = Client(app_server.url, verbose=False)
    photo = save(data.chelsea(), tmp_path / "IMG_0005.png")
    api_send(client, "Here is a photo I took.", [photo])
    for n in range(10):
        api_send(client, f"What is {n + 3} plus {2 * n + 1}?")
    answer = text_of(api_send(client, "What animal was in the photo I sent at the start?")[-1])
    print(answer)
    assert named(answer, ("cat", "kitten")), answer


@pytest.mark.parametrize("kind", ["noise", "blank"])
def test_the_bot_says_it_cannot_tell_what_noise_or_a_blank_image_shows(app_server, tmp_path, kind):
    pixels = (np.random.default_rng(7).integers(0, 256, (480, 640, 3), dtype=np.uint8) if kind == "noise"
              else np.full((480, 640, 3), 255, np.uint8))
    photo = save(pixels, tmp_path / "IMG_0009.png")
    answer = text_of(api_send(Client(app_server.url, verbose=False), "What is in this photo?", [photo])[-1])
    print(answer)
    assert CANNOT_TELL.search(answer), answer
