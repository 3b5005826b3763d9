"""Models loaded at their first use and released when idle (chatbot.perception.on_demand): one load under
concurrent first uses, no load kept after a failure, release only when unused, and the app's wrappers around
the bundled Whisper and photo models (marked slow: they load the real ones)."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from pathlib import Path

import pytest
import skimage.data
from PIL import Image

from chatbot.perception.audio import load_audio
from chatbot.perception.encoder import MultimodalEncoder
from chatbot.perception.images import load_image
from chatbot.perception.on_demand import OnDemand
from chatbot.perception.speech import OnDemandRecognizer
from chatbot.perception.vision import ImageFacts, OnDemandAnalyzer, SceneClassifier, TextReader, load_analyzers
from harness.documents import scanned_pdf

DATA = Path(__file__).resolve().parents[1] / "data"


class Model:
    """Stands for a model: something big whose loading takes a while."""


class SlowLoader:
    def __init__(self, seconds: float = 0.2, fail_first: bool = False) -> None:
        self.seconds, self.fail_first, self.calls = seconds, fail_first, 0

    def __call__(self) -> Model:
        self.calls += 1
        time.sleep(self.seconds)  # wide enough a window for every thread to arrive while the first one loads
        if self.fail_first and self.calls == 1:
            raise OSError("disk hiccup")
        return Model()


def eventually(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def use_from_threads(holder: OnDemand, threads: int = 8, hold: float = 0.0) -> list:
    got, start = [], threading.Barrier(threads)

    def one():
        start.wait()
        with holder.use() as model:
            got.append(model)
            time.sleep(hold)

    workers = [threading.Thread(target=one) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return got


def test_concurrent_first_uses_load_once_and_share_the_model():
    loader = SlowLoader()
    holder = OnDemand(loader, name="fake")
    assert not holder.loaded and loader.calls == 0  # nothing loads before the first use
    got = use_from_threads(holder)
    assert loader.calls == 1 and holder.loads == 1
    assert len(got) == 8 and all(m is got[0] for m in got)
    assert holder.loaded


def test_a_failed_load_keeps_nothing_and_the_next_use_tries_again():
    loader = SlowLoader(0.0, fail_first=True)
    holder = OnDemand(loader, name="fake")
    with pytest.raises(OSError, match="disk hiccup"), holder.use():
        pass
    assert not holder.loaded
    with holder.use() as model:
        assert isinstance(model, Model)
    assert loader.calls == 2


def test_without_release_after_the_model_stays():
    holder = OnDemand(SlowLoader(0.0), name="fake")
    with holder.use():
        pass
    time.sleep(0.3)
    assert holder.loaded


def test_released_after_idle_time_and_loaded_again_on_the_next_use():
    loader = SlowLoader(0.0)
    holder = OnDemand(loader, name="fake", release_after=0.1)
    with holder.use() as model:
        gone = weakref.ref(model)
    del model
    assert eventually(lambda: not holder.loaded)
    gc.collect()
    assert gone() is None  # nothing else holds it: its memory is free
    with holder.use():
        pass
    assert loader.calls == 2 and holder.loads == 2


def test_never_released_while_in_use():
    holder = OnDemand(SlowLoader(0.0), name="fake", release_after=0.05)
    entered, leave = threading.Event(), threading.Event()

    def long_use():
        with holder.use():
            entered.set()
            leave.wait(5)

    with holder.use():
        pass  # arms a release 0.05 s from now
    user = threading.Thread(target=long_use)
    user.start()
    entered.wait(5)
    assert not holder.release()  # a direct release is refused too
    time.sleep(0.3)  # well past the idle time: the armed release fired and found a user
    assert holder.loaded
    leave.set()
    user.join()
    assert eventually(lambda: not holder.loaded)


def test_a_use_after_the_timer_started_postpones_the_release():
    holder = OnDemand(SlowLoader(0.0), name="fake", release_after=0.4)
    with holder.use():
        pass
    time.sleep(0.25)
    with holder.use():
        pass  # the first timer fires 0.15 s from now, only 0.15 s after this use: it must not release
    time.sleep(0.25)
    assert holder.loaded
    assert eventually(lambda: not holder.loaded)


# -- the app's wrappers on the real bundled models -----------------------------------------------------
@pytest.mark.slow
def test_loading_one_group_drops_the_idle_models_of_other_groups_only():
    classifier = OnDemand(SlowLoader(0), name="classifier", group="photo")
    ocr = OnDemand(SlowLoader(0), name="ocr", group="photo")
    whisper = OnDemand(SlowLoader(0), name="whisper")
    with classifier.use():
        pass
    with ocr.use():
        pass
    assert classifier.loaded and ocr.loaded  # same group: kept side by side (a photo uses them together)
    with ocr.use():  # in use while the speech model loads: not dropped
        with whisper.use():
            assert ocr.loaded and not classifier.loaded
    with classifier.use():
        assert not whisper.loaded and ocr.loaded
    assert classifier.loads == 2 and whisper.loads == 1


def test_on_demand_whisper_loads_once_for_concurrent_first_recordings():
    recognizer = OnDemandRecognizer("whisper-tiny.en")
    assert not recognizer.loaded
    clip = load_audio(DATA / "capital_of_france.wav", max_seconds=60)
    texts, start = [], threading.Barrier(3)

    def hear():
        start.wait()
        texts.append(recognizer.transcribe(clip).text.lower())

    workers = [threading.Thread(target=hear) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert recognizer._recognizer.loads == 1 and recognizer.loaded
    assert len(texts) == 3 and all("capital" in t and "france" in t for t in texts)


@pytest.mark.slow
def test_on_demand_whisper_hears_again_after_release():
    recognizer = OnDemandRecognizer("whisper-tiny.en", release_after=0.1)
    clip = load_audio(DATA / "capital_of_france.wav", max_seconds=60)
    assert "france" in recognizer.transcribe(clip).text.lower()
    assert eventually(lambda: not recognizer.loaded)
    assert "france" in recognizer.transcribe(clip).text.lower()
    assert recognizer._recognizer.loads == 2


@pytest.mark.slow
def test_on_demand_photo_models_load_at_the_first_photo(tmp_path):
    analyzers = load_analyzers(on_demand=True)
    assert [a.name for a in analyzers] == [a.name for a in load_analyzers()]  # the same analysers, same order
    assert not any(a.loaded for a in analyzers if isinstance(a, OnDemandAnalyzer))
    assert isinstance(analyzers[-1], ImageFacts)  # no model: nothing to defer
    encoder = MultimodalEncoder(tmp_path / "media", analyzers=analyzers)
    photo = tmp_path / "IMG_0001.jpg"
    Image.fromarray(skimage.data.chelsea()).save(photo)
    audio = DATA / "capital_of_france.wav"
    assert encoder.models_to_load([str(photo), str(audio)]) == ["the image models"]  # voice is off here
    turn = encoder.encode("What is this?", [photo])
    assert "cat" in turn.model_text().lower()
    assert all(a.loaded for a in analyzers)
    assert encoder.models_to_load([str(photo)]) == []


@pytest.mark.slow
def test_on_demand_classifier_loads_once_for_concurrent_photos(tmp_path):
    classifier = OnDemandAnalyzer(SceneClassifier)
    path = tmp_path / "cat.jpg"
    Image.fromarray(skimage.data.chelsea()).save(path)
    image = load_image(path, max_bytes=2**25, max_pixels=10**8)
    notes, start = [], threading.Barrier(4)

    def look():
        start.wait()
        notes.append(" ".join(o.text for o in classifier.analyze(image)))

    workers = [threading.Thread(target=look) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert classifier._analyzer.loads == 1
    assert len(set(notes)) == 1 and "cat" in notes[0]


@pytest.mark.slow
def test_a_scanned_pdf_is_read_by_on_demand_ocr(tmp_path):
    ocr = OnDemandAnalyzer(TextReader, release_after=0.1)
    encoder = MultimodalEncoder(tmp_path / "media", analyzers=[ocr])
    scan = scanned_pdf(tmp_path / "scan.pdf", "The code word is PELICAN")
    assert "The code word is PELICAN" in encoder.encode("Code word?", [scan]).model_text()
    assert eventually(lambda: not ocr.loaded)


def test_the_speech_model_is_named_until_it_is_loaded(tmp_path):
    encoder = MultimodalEncoder(tmp_path / "media", recognizer=OnDemandRecognizer("whisper-tiny.en"))
    assert encoder.models_to_load([str(DATA / "capital_of_france.wav")]) == ["the speech model"]
    assert encoder.models_to_load([str(tmp_path / "gone.wav")]) == []  # unreadable: the turn will say so
