"""chatbot.perception.speech: the bundled Whisper models on synthetic speech; the transformers path on a tiny random Whisper."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import textwrap
import threading
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
import torchaudio.functional as AF
from transformers.models.whisper.tokenization_whisper import LANGUAGES

from chatbot import weights
from chatbot.errors import UserFacingError
from chatbot.perception.audio import SAMPLE_RATE, AudioClip, load_audio
from chatbot.perception.speech import (
    FasterWhisperRecognizer,
    Transcript,
    TransformersRecognizer,
    load_recognizer,
)

pytestmark = pytest.mark.slow  # loads the real bundled models: not in `pytest -m unit`

DATA = Path(__file__).resolve().parents[1] / "data"
# Fixture -> words its transcript must contain (see tests/data/make_speech_fixtures.py for the sentences).
KEY_WORDS = {
    "capital_of_france.wav": ("capital", "france"),
    "elephant_giraffe.wav": ("elephant", "giraffe", "river"),
}


def write_wav(path: Path, samples: np.ndarray, rate: int) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path)) as w:
        return np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16) / 32768.0


@pytest.fixture(scope="module")
def base() -> FasterWhisperRecognizer:
    recognizer = load_recognizer("whisper-base")
    assert isinstance(recognizer, FasterWhisperRecognizer) and recognizer.name == "whisper-base"
    return recognizer


@pytest.fixture(scope="module")
def tiny_en() -> FasterWhisperRecognizer:
    return load_recognizer("whisper-tiny.en")


@pytest.fixture(scope="module")
def clips() -> dict[str, AudioClip]:
    return {name: load_audio(DATA / name) for name in KEY_WORDS}


# --- bundled faster-whisper models --------------------------------------------------------


@pytest.fixture(scope="module")
def base_transcripts(base, clips) -> dict[str, Transcript]:
    return {name: base.transcribe(clip) for name, clip in clips.items()}


@pytest.mark.parametrize("name", sorted(KEY_WORDS))
def test_whisper_base_hears_the_key_words(base_transcripts, clips, name):
    transcript = base_transcripts[name]
    assert isinstance(transcript, Transcript)
    for word in KEY_WORDS[name]:
        assert word in transcript.text.lower(), transcript.text
    assert transcript.duration == clips[name].duration


def test_whisper_base_detects_english(base, base_transcripts):
    assert base.language is None
    assert {t.language for t in base_transcripts.values()} == {"en"}


def test_fixed_language_is_honoured(base_transcripts, clips):
    french = load_recognizer("whisper-base", language="FR")  # codes are case-insensitive
    forced = french.transcribe(clips["capital_of_france.wav"])
    assert forced.language == "fr"
    # Decoded as French rather than re-detected as English.
    assert forced.text and forced.text != base_transcripts["capital_of_france.wav"].text


def test_a_known_language_skips_detection_and_hears_the_same_words(base, base_transcripts, clips):
    known = base.transcribe(clips["capital_of_france.wav"], language="en")
    assert known.language == "en" and known.language_probability == 1.0  # detection did not run
    assert known.text == base_transcripts["capital_of_france.wav"].text
    assert base.transcribe(clips["capital_of_france.wav"], language="xx").language == "en"  # unknown code: detected


def test_gradio_microphone_recording(base, tmp_path):
    mic = AF.resample(torch.from_numpy(read_wav(DATA / "capital_of_france.wav")).float(), SAMPLE_RATE, 44100)
    transcript = base.transcribe(load_audio(write_wav(tmp_path / "audio.wav", mic.numpy(), 44100)))
    assert "capital" in transcript.text.lower() and "france" in transcript.text.lower()


def test_whisper_tiny_en_hears_the_key_words(tiny_en, clips):
    transcript = tiny_en.transcribe(clips["capital_of_france.wav"])
    assert "capital" in transcript.text.lower() and "france" in transcript.text.lower()
    assert transcript.language == "en"


def test_speech_after_the_first_30_seconds_is_heard(tiny_en, tmp_path):
    # A sentence, half a minute of quiet room, another sentence: the second one lies beyond Whisper's
    # first 30 s window, so it only comes back if nothing cuts the recording short. (Two different
    # sentences, not one repeated: repeated text trips Whisper's compression check into random sampling.)
    room = np.random.default_rng(5).normal(0, 10 ** (-65 / 20), 30 * SAMPLE_RATE)
    long = np.concatenate([read_wav(DATA / "capital_of_france.wav"), room, read_wav(DATA / "elephant_giraffe.wav")])
    clip = load_audio(write_wav(tmp_path / "long.wav", long, SAMPLE_RATE))
    assert clip.duration > 35
    text = tiny_en.transcribe(clip).text.lower()
    assert all(word in text for word in ("capital", "france", "elephant", "giraffe", "river")), text


def test_concurrent_calls_give_the_same_answers(tiny_en, clips):
    expected = {name: tiny_en.transcribe(clip).text for name, clip in clips.items()}
    results: dict[str, str] = {}
    threads = [threading.Thread(target=lambda n=name: results.__setitem__(n, tiny_en.transcribe(clips[n]).text))
               for name in clips]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == expected


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="torch needs two threads for a team")
@pytest.mark.parametrize("ctranslate2_first", [False, True], ids=["as-the-app", "ctranslate2-imported-first"])
def test_hearing_a_recording_leaves_the_reply_models_threads_as_they_were(ctranslate2_first):
    """torch's OpenMP threads keep spinning at their barriers after a recording was heard (a fresh process: libgomp's
    state is process-wide), as the web server hears it: in a request thread that lives on, the model kept loaded.

    A CTranslate2 team on torch's libgomp, or the recording's own torch ops in that thread, left libgomp with more
    threads than CPUs: it slept and woke at every barrier, and the same matmuls switched context thousands of times
    (replies ≈45 % slower). CTranslate2 imported by someone else first cannot get its own runtime: one thread then.
    """
    script = textwrap.dedent('''
        import resource, threading, torch
        $first
        torch.set_num_threads(2)
        a, w = torch.randn(128, 896), torch.randn(896, 896)
        def switches():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw
            for _ in range(2000):
                torch.mm(a, w)
            return resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw - before
        before = switches()
        from pathlib import Path
        from chatbot.perception.encoder import MultimodalEncoder
        from chatbot.perception.speech import load_recognizer
        encoder = MultimodalEncoder(Path("$media"), recognizer=load_recognizer("whisper-tiny.en"))
        heard, done = threading.Event(), threading.Event()
        def request_thread():
            print(encoder.encode("", ["tests/data/capital_of_france.wav"]).observations[0].text)
            heard.set()
            done.wait()
        threading.Thread(target=request_thread).start()
        heard.wait()
        print(before, switches())
        done.set()
    ''')
    root = Path(__file__).resolve().parents[2]
    with tempfile.TemporaryDirectory() as media:
        script = script.replace("$media", media).replace("$first", "import ctranslate2" if ctranslate2_first else "")
        out = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "PYTHONPATH": str(root)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "capital" in out.stdout.lower(), out.stdout
    before, after = map(int, out.stdout.split()[-2:])
    assert after <= before + 200, (before, after)  # 0 and 7,300-7,800 with either cause back


def test_english_only_model_refuses_another_language():
    with pytest.raises(UserFacingError, match="whisper-tiny.en.*'fr'"):
        load_recognizer("whisper-tiny.en", language="fr")


# --- loading failures ---------------------------------------------------------------------


def test_missing_folder_names_the_spec(tmp_path):
    spec = str(tmp_path / "no-such-model")
    with pytest.raises(UserFacingError, match="no-such-model") as info:
        load_recognizer(spec)
    assert "\n" not in str(info.value)


def test_folder_without_a_model(tmp_path):
    with pytest.raises(UserFacingError, match=re.escape(f"'{tmp_path}' could not be loaded")):
        load_recognizer(str(tmp_path))


def test_corrupt_ctranslate2_model(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"\0" * 100)
    with pytest.raises(UserFacingError, match="could not be loaded") as info:
        load_recognizer(str(tmp_path))
    assert "\n" not in str(info.value)


# --- transformers path with a tiny randomly initialised Whisper ---------------------------


@pytest.fixture(scope="module")
def tiny_random_whisper(tmp_path_factory) -> Path:
    """A Whisper with the real tokenizer and feature extractor but ~1M random weights, saved to disk."""
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizerFast,
    )

    folder = tmp_path_factory.mktemp("tiny-whisper")
    tokenizer = WhisperTokenizerFast(tokenizer_file=str(weights.SPEECH_MODELS["whisper-base"]() / "tokenizer.json"))
    token = tokenizer.convert_tokens_to_ids
    torch.manual_seed(0)
    config = WhisperConfig(
        vocab_size=len(tokenizer), d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=80,
        max_source_positions=1500, max_target_positions=64,
        decoder_start_token_id=token("<|startoftranscript|>"), eos_token_id=token("<|endoftext|>"),
        pad_token_id=token("<|endoftext|>"), bos_token_id=token("<|endoftext|>"))
    model = WhisperForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=config.decoder_start_token_id, eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id, max_length=24, is_multilingual=True,
        lang_to_id={f"<|{code}|>": token(f"<|{code}|>") for code in LANGUAGES},
        task_to_id={"transcribe": token("<|transcribe|>"), "translate": token("<|translate|>")},
        no_timestamps_token_id=token("<|notimestamps|>"))
    model.save_pretrained(folder)
    WhisperProcessor(feature_extractor=WhisperFeatureExtractor(), tokenizer=tokenizer).save_pretrained(folder)
    return folder


def test_transformers_whisper_runs_end_to_end(tiny_random_whisper, clips):
    recognizer = load_recognizer(str(tiny_random_whisper))
    assert isinstance(recognizer, TransformersRecognizer)
    transcript = recognizer.transcribe(clips["capital_of_france.wav"])
    assert isinstance(transcript, Transcript) and isinstance(transcript.text, str)
    # Random weights pick a random language, but it must be one of Whisper's codes.
    assert transcript.language in LANGUAGES


def spy_on_generate(recognizer: TransformersRecognizer, monkeypatch) -> list[dict]:
    calls: list[dict] = []
    real = recognizer.model.generate

    def generate(**kwargs):
        calls.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(recognizer.model, "generate", generate)
    return calls


def test_transformers_whisper_fixed_language(tiny_random_whisper, clips, monkeypatch):
    recognizer = load_recognizer(str(tiny_random_whisper), language="fr")
    calls = spy_on_generate(recognizer, monkeypatch)
    assert recognizer.transcribe(clips["elephant_giraffe.wav"]).language == "fr"
    assert calls[0]["language"] == "fr" and calls[0]["task"] == "transcribe"


def test_transformers_whisper_known_language_for_one_recording(tiny_random_whisper, clips, monkeypatch):
    recognizer = load_recognizer(str(tiny_random_whisper))
    calls = spy_on_generate(recognizer, monkeypatch)
    assert recognizer.transcribe(clips["elephant_giraffe.wav"], language="de").language == "de"
    assert calls[-1]["language"] == "de"


def test_transformers_whisper_long_form(tiny_random_whisper, clips, monkeypatch):
    recognizer = load_recognizer(str(tiny_random_whisper), language="en")
    calls = spy_on_generate(recognizer, monkeypatch)
    short = clips["capital_of_france.wav"].waveform
    long = AudioClip(waveform=short.repeat(16)[: 35 * SAMPLE_RATE], sample_rate=SAMPLE_RATE, duration=35.0)
    assert isinstance(recognizer.transcribe(long).text, str)
    # All 35 s reach generate (not cut at Whisper's 30 s window), with the timestamps long-form needs.
    assert calls[0]["input_features"].shape[-1] > 3000 and calls[0]["return_timestamps"] is True


def test_transformers_whisper_rejects_unknown_language(tiny_random_whisper):
    with pytest.raises(UserFacingError, match="language 'xx'"):
        load_recognizer(str(tiny_random_whisper), language="xx")


def test_push_to_talk_words_as_corrected_go_with_the_recording_once(tiny_en, tmp_path):
    from chatbot.perception.encoder import MultimodalEncoder
    from chatbot.state import ObservationKind

    encoder = MultimodalEncoder(tmp_path / "media", recognizer=tiny_en)
    recording = DATA / "capital_of_france.wav"
    encoder.remember_recording(recording, tiny_en.transcribe(load_audio(recording)), dictated=True)
    turn = encoder.encode("What is the capital of Italy?", [recording])  # the box's words, corrected
    spoken = [o.text for o in turn.observations if o.kind is ObservationKind.TRANSCRIPT]
    assert turn.text == "" and spoken == ["What is the capital of Italy?"] and len(turn.attachments) == 1
    again = encoder.encode("Which language is this?", [recording])  # sent again later: a question about it
    assert again.text == "Which language is this?"
    assert "france" in " ".join(o.text for o in again.observations).lower()
