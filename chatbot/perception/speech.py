"""Speech to text for recordings already prepared by `chatbot.perception.audio.load_audio`.

Two back ends: faster-whisper (CTranslate2, int8 on CPU; the bundled default)
and transformers (any Hugging Face speech-to-text checkpoint, for users who have
one on disk or can reach the hub). `load_recognizer` picks one from a spec.
"""

from __future__ import annotations

import logging
import os
import threading
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from chatbot import footprint, openmp, weights
from chatbot.errors import UserFacingError
from chatbot.perception.on_demand import OnDemand

if TYPE_CHECKING:  # audio imports torch: not before the page is served
    from chatbot.perception.audio import AudioClip

log = logging.getLogger(__name__)

DEFAULT_SPEECH_MODEL = "whisper-base"
SURE_LANGUAGE = 0.5  # below this language probability, a hint from the user's browser wins
WHISPER_WINDOW_SECONDS = 30  # Whisper sees 30 s at a time; longer audio needs its long-form decoding


@dataclass
class Transcript:
    text: str  # "" when no speech was recognised
    language: str  # ISO code ("en"), or "" when the model cannot tell
    duration: float  # seconds of the original recording (AudioClip.duration)
    language_probability: float = 1.0  # how sure the model is of `language` (1.0 when it was fixed)
    no_speech_prob: float = 0.0  # the model's own belief that nothing was said (highest over segments)
    avg_logprob: float = 0.0  # mean token log-probability: very low means guessed words


class SpeechRecognizer(ABC):
    """Loaded once, then `transcribe` may be called from several threads (calls run one at a time)."""

    name: str
    loaded: bool = True  # whether the model is in memory now (see OnDemandRecognizer)

    @abstractmethod
    def transcribe(self, clip: AudioClip, language_hint: str | None = None, language: str | None = None) -> Transcript:
        """`language_hint` (e.g. the browser's language) is used when detection is unsure; a known
        `language` (e.g. a call's, heard surely before) skips detection, which costs a second pass of the
        encoder in faster-whisper."""


@dataclass(frozen=True)
class WhisperSettings:
    """faster-whisper decoding options, kept in one place so the benchmark can reuse them exactly."""

    beam_size: int = 1  # greedy: far cheaper than beam search on CPU, and chat messages are short
    vad_filter: bool = True  # skip non-speech, where Whisper tends to invent text ("Thank you.")
    condition_on_previous_text: bool = False  # stops one misheard window from derailing the rest
    # One greedy pass, no retries at higher temperatures: a decode that fails Whisper's own checks on
    # a short chat message is noise or mumbling, which the log-probability filter then rejects;
    # the retries (up to five more passes) cost seconds exactly there.
    temperature: float = 0.0
    without_timestamps: bool = True  # chat needs the words, not where they are: fewer tokens to write


def _cpu_threads() -> int:
    # CTranslate2's default (4) oversubscribes small machines; more than 4 barely helps a base model. On torch's
    # OpenMP runtime (see `chatbot.openmp`), a team of its own would slow the reply model: one thread then.
    return max(1, min(4, len(os.sched_getaffinity(0)))) if openmp.import_ctranslate2() else 1


class FasterWhisperRecognizer(SpeechRecognizer):
    """A CTranslate2 Whisper model directory, run int8 on the CPU."""

    def __init__(self, model_dir: str | Path, *, language: str | None = None, name: str | None = None,
                 settings: WhisperSettings = WhisperSettings()) -> None:
        from chatbot.perception.onnx import onnxruntime

        openmp.import_ctranslate2()
        from faster_whisper import WhisperModel  # heavy (CTranslate2, onnxruntime): imported on first load

        onnxruntime()  # telemetry off before the voice-activity filter creates its ONNX session

        self.name = name or str(model_dir)
        self.settings = settings
        self.model = WhisperModel(str(model_dir), device="cpu", compute_type="int8", cpu_threads=_cpu_threads())
        if language is not None and language not in self.model.supported_languages:
            raise UserFacingError(f"Speech model '{self.name}' does not support the language '{language}'.")
        self.language = language  # None: detect per recording
        self._lock = threading.Lock()

    def transcribe(self, clip: AudioClip, language_hint: str | None = None, language: str | None = None) -> Transcript:
        audio = clip.waveform.numpy()
        fixed = self.language or (language if language in self.model.supported_languages else None)
        with self._lock:  # one decode at a time: parallel ones would only fight over the same few cores
            segments, info = self.model.transcribe(audio, language=fixed, **asdict(self.settings))
            segments = list(segments)  # lazy: decoding happens here
            language, probability = info.language, info.language_probability
            hint = (language_hint or "").split("-")[0].lower()
            if (fixed is None and probability < SURE_LANGUAGE and hint != language
                    and hint in self.model.supported_languages):
                # Unsure (a short or accented question): the browser's language is the better bet.
                language = hint
                segments = list(self.model.transcribe(audio, language=hint, **asdict(self.settings))[0])
        footprint.give_back()  # the decoder's buffers, not needed until the next recording
        text = " ".join(s.text.strip() for s in segments)
        words = sum(len(s.tokens) for s in segments)
        return Transcript(
            text=text.strip(), language=language, duration=clip.duration, language_probability=probability,
            no_speech_prob=max((s.no_speech_prob for s in segments), default=1.0),
            avg_logprob=sum(s.avg_logprob * len(s.tokens) for s in segments) / words if words else -10.0)


class TransformersRecognizer(SpeechRecognizer):
    """Any transformers speech-to-text checkpoint (hub id or local folder); Whisper gets language handling."""

    def __init__(self, model_id: str | Path, *, language: str | None = None, name: str | None = None) -> None:
        import torch
        from transformers import AutoModelForSpeechSeq2Seq, AutoProcessor

        self.name = name or str(model_id)
        self.processor = AutoProcessor.from_pretrained(str(model_id))
        # float32: checkpoints saved in half precision are slow or unsupported on CPU.
        self.model = AutoModelForSpeechSeq2Seq.from_pretrained(str(model_id), dtype=torch.float32).eval()
        generation = self.model.generation_config
        self._is_whisper = self.model.config.model_type == "whisper"
        multilingual = self._is_whisper and getattr(generation, "is_multilingual", False)
        self._lang_to_id: dict[str, int] = dict(getattr(generation, "lang_to_id", None) or {}) if multilingual else {}
        if language is not None and self._is_whisper and language not in self._languages():
            raise UserFacingError(f"Speech model '{self.name}' does not support the language '{language}'.")
        self.language = language
        self._lock = threading.Lock()

    def _languages(self) -> set[str]:
        # English-only Whisper checkpoints have no language tokens but only ever produce English.
        return {token.strip("<|>") for token in self._lang_to_id} if self._lang_to_id else {"en"}

    @openmp.in_passing_thread
    def transcribe(self, clip: AudioClip, language_hint: str | None = None, language: str | None = None) -> Transcript:
        import torch

        from chatbot.perception.audio import SAMPLE_RATE

        audio = clip.waveform.numpy()
        long_form = self._is_whisper and audio.size > WHISPER_WINDOW_SECONDS * SAMPLE_RATE
        extractor = self.processor.feature_extractor
        if long_form:  # keep every frame; generate() then walks the audio window by window
            inputs = extractor(audio, sampling_rate=SAMPLE_RATE, return_tensors="pt", truncation=False,
                               padding="longest", return_attention_mask=True)
        else:
            inputs = extractor(audio, sampling_rate=SAMPLE_RATE, return_tensors="pt")
        with self._lock, torch.inference_mode():
            known = language if self._is_whisper and language in self._languages() else None
            language = self.language or known or self._detect_language(inputs["input_features"])
            extra = {"language": language, "task": "transcribe"} if self._lang_to_id else {}
            if long_form:
                extra["return_timestamps"] = True
            ids = self.model.generate(**inputs, **extra)
        text = self.processor.batch_decode(ids, skip_special_tokens=True)[0]
        return Transcript(text=text.strip(), language=language, duration=clip.duration)

    def _detect_language(self, features) -> str:
        if not self._lang_to_id:
            return "en" if self._is_whisper else ""  # English-only Whisper, or a model that does not say
        token_id = int(self.model.detect_language(input_features=features)[0])
        return next(token for token, i in self._lang_to_id.items() if i == token_id).strip("<|>")


class OnDemandRecognizer(SpeechRecognizer):
    """`load_recognizer(spec, language)` run at the first recording, released after `release_after` idle seconds."""

    def __init__(self, spec: str = DEFAULT_SPEECH_MODEL, language: str | None = None, *,
                 release_after: float | None = None) -> None:
        self.name = spec
        self._recognizer = OnDemand(lambda: load_recognizer(spec, language), name=f"the speech model '{spec}'",
                                    release_after=release_after)

    @property
    def loaded(self) -> bool:
        return self._recognizer.loaded

    def transcribe(self, clip: AudioClip, language_hint: str | None = None, language: str | None = None) -> Transcript:
        with self._recognizer.use() as recognizer:
            return recognizer.transcribe(clip, language_hint, language)


@openmp.in_passing_thread  # a hub model's loading runs torch ops too
def load_recognizer(spec: str = DEFAULT_SPEECH_MODEL, language: str | None = None) -> SpeechRecognizer:
    """A recogniser for `spec`: a bundled model key, a CTranslate2 folder, or a transformers id/folder.

    `language` is a Whisper language code ("en", "fr"...) to force, or None to detect it per recording.
    Anything that stops the model loading becomes a one-line UserFacingError naming `spec`.
    """
    language = (language or "").strip().lower() or None
    path = Path(spec).expanduser()
    try:
        if spec in weights.SPEECH_MODELS:
            return FasterWhisperRecognizer(weights.SPEECH_MODELS[spec](), language=language, name=spec)
        if (path / "model.bin").is_file():
            return FasterWhisperRecognizer(path, language=language, name=spec)
        if spec.startswith(("/", ".", "~")) and not path.exists():
            raise FileNotFoundError(f"no such folder: {path}")  # clearer than the hub's "invalid repo id"
        return TransformersRecognizer(path if path.is_dir() else spec, language=language, name=spec)
    except UserFacingError:
        raise
    except Exception as e:  # noqa: BLE001 - any loader failure means the same thing to the user
        log.exception("Could not load speech model %r", spec)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserFacingError(f"Speech model '{spec}' could not be loaded: {reason}") from e
