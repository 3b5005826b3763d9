"""Call mode's ears: where an utterance ends (Silero VAD), and whether it was the user at all.

Three filters stand between the microphone and the model, because a chatbot that answers
its own voice, a cough or the hum of a room invents a conversation:
1. `UtteranceDetector`: the Silero voice-activity model (the ONNX file faster-whisper ships)
   marks 32 ms windows as speech; an utterance is speech followed by `end_silence` of non-speech.
2. `EchoGuard`: while the bot's reply plays, the microphone hears it too. A segment that matches
   the played audio (cross-correlation) or repeats its words is the bot, not the user.
3. `heard_words`: Whisper's own no-speech probability and mean log-probability reject what it
   made up from noise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from chatbot import openmp

SAMPLE_RATE = 16_000
WINDOW = 512  # samples per VAD decision (32 ms); the Silero model's fixed input size at 16 kHz
CONTEXT = 64  # samples of the previous window the model sees with each one


class SileroVad:
    """Speech probability per 32 ms window of a 16 kHz stream; keeps its state across calls."""

    def __init__(self) -> None:
        openmp.import_ctranslate2()  # faster_whisper imports it; first, so Whisper keeps its threads
        from faster_whisper.vad import get_assets_path

        from chatbot.perception.onnx import session

        self._session = session(f"{get_assets_path()}/silero_vad_v6.onnx", threads=1)  # tiny model: one core
        self.reset()

    def reset(self) -> None:
        self._h = np.zeros((1, 1, 128), np.float32)
        self._c = np.zeros((1, 1, 128), np.float32)
        self._context = np.zeros(CONTEXT, np.float32)
        self.pending = np.zeros(0, np.float32)

    def __call__(self, samples: np.ndarray) -> np.ndarray:
        """Probabilities for every whole window now available (leftover samples wait for the next call)."""
        audio = np.concatenate([self.pending, samples.astype(np.float32)])
        count = len(audio) // WINDOW
        self.pending = audio[count * WINDOW:]
        if not count:
            return np.zeros(0, np.float32)
        windows = audio[: count * WINDOW].reshape(count, WINDOW)
        contexts = np.concatenate([self._context[None], windows[:-1, -CONTEXT:]])
        self._context = windows[-1, -CONTEXT:].copy()
        out, self._h, self._c = self._session.run(
            None, {"input": np.concatenate([contexts, windows], axis=1), "h": self._h, "c": self._c})
        return np.asarray(out, np.float32).reshape(-1)[:count]


@dataclass
class VadSettings:
    threshold: float = 0.5  # a window above this is speech...
    release: float = 0.35  # ...and speech goes on until windows fall below this
    end_silence: float = 0.6  # seconds of non-speech that end an utterance (a pause mid-sentence is shorter)
    min_speech: float = 0.25  # shorter bursts (a click, a cough's onset) are not utterances
    pad: float = 0.2  # seconds kept before and after the speech, for soft onsets and tails
    max_utterance: float = 30.0  # Whisper's window; a longer monologue is cut here


@dataclass
class UtteranceDetector:
    """Feed microphone audio (16 kHz mono float) in any chunk sizes; get each finished utterance."""

    vad: SileroVad
    settings: VadSettings = field(default_factory=VadSettings)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.vad.reset()
        self._before = np.zeros(0, np.float32)  # recent non-speech, for the leading pad
        self._speech: list[np.ndarray] = []
        self._voiced = 0  # windows above threshold in the current utterance
        self._quiet = 0  # trailing windows below release

    @property
    def hearing_speech(self) -> bool:
        """Someone is speaking right now (long enough to count): what barge-in listens for."""
        return self._voiced * WINDOW >= self.settings.min_speech * SAMPLE_RATE

    def current_speech(self) -> np.ndarray:
        """The utterance heard so far (empty between utterances)."""
        return np.concatenate(self._speech) if self._speech else np.zeros(0, np.float32)

    def feed(self, samples: np.ndarray) -> list[np.ndarray]:
        s = self.settings
        done: list[np.ndarray] = []
        audio = np.concatenate([self.vad.pending, samples.astype(np.float32)])  # what the VAD windows
        for i, p in enumerate(self.vad(samples)):
            window = audio[i * WINDOW: (i + 1) * WINDOW]
            if not self._speech:
                if p >= s.threshold:
                    self._speech = [self._before, window]
                    self._voiced, self._quiet = 1, 0
                else:
                    self._before = np.concatenate([self._before, window])[-int(s.pad * SAMPLE_RATE):]
                continue
            self._speech.append(window)
            self._voiced += p >= s.threshold
            self._quiet = self._quiet + 1 if p < s.release else 0
            length = sum(len(w) for w in self._speech)
            if self._quiet * WINDOW >= s.end_silence * SAMPLE_RATE or length >= s.max_utterance * SAMPLE_RATE:
                utterance = np.concatenate(self._speech)
                cut = max(0, self._quiet * WINDOW - int(s.pad * SAMPLE_RATE))  # keep `pad` of the silence
                if self.hearing_speech:
                    done.append(utterance[: len(utterance) - cut])
                self._speech, self._voiced, self._quiet = [], 0, 0
                self._before = np.zeros(0, np.float32)
        return done


def split_utterances(samples: np.ndarray, settings: VadSettings | None = None,
                     vad: SileroVad | None = None) -> list[np.ndarray]:
    """All utterances of a whole recording, fed as a browser would stream it (0.5 s chunks)."""
    detector = UtteranceDetector(vad or SileroVad(), settings or VadSettings())
    step = SAMPLE_RATE // 2
    found = [u for i in range(0, len(samples), step) for u in detector.feed(samples[i:i + step])]
    tail = np.zeros(int(detector.settings.end_silence * SAMPLE_RATE) + WINDOW, np.float32)
    return found + detector.feed(tail)  # a recording that ends mid-utterance still ends it


# -- echo guard ---------------------------------------------------------------------------------
_WORD = re.compile(r"[\w']+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


@dataclass
class EchoGuard:
    """Remembers what the bot is saying (audio at 16 kHz and words) to recognise it in the microphone."""

    correlation: float = 0.35  # normalised cross-correlation peak above which the mic holds the played audio
    word_overlap: float = 0.7  # share of heard words that were just spoken by the bot
    played: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    said: list[str] = field(default_factory=list)

    def playing(self, samples16k: np.ndarray, text: str) -> None:
        keep = 60 * SAMPLE_RATE  # the last minute of the bot's voice is plenty to look in
        self.played = np.concatenate([self.played, samples16k.astype(np.float32)])[-keep:]
        self.said = (self.said + _words(text))[-400:]

    def clear(self) -> None:
        self.played = np.zeros(0, np.float32)
        self.said = []

    def sounds_like_bot(self, heard: np.ndarray) -> bool:
        """The segment is (a delayed, scaled, noisy copy of) audio the bot played."""
        if len(self.played) < WINDOW or len(heard) < WINDOW:
            return False
        n = 1 << int(np.ceil(np.log2(len(self.played) + len(heard))))
        a = heard - heard.mean()
        b = self.played - self.played.mean()
        xcorr = np.fft.irfft(np.fft.rfft(b, n) * np.conj(np.fft.rfft(a, n)), n)
        # Normalise by the energy of the heard segment and of the best-matching stretch of played audio.
        energy = np.concatenate([[0.0], np.cumsum(b.astype(np.float64) ** 2)])
        lag = int(np.argmax(xcorr[: len(b)]))
        stretch = energy[min(len(b), lag + len(a))] - energy[lag]
        peak = xcorr[lag] / (np.sqrt(float(np.sum(a.astype(np.float64) ** 2)) * stretch) + 1e-9)
        return bool(peak >= self.correlation)

    def repeats_bot(self, transcript: str) -> bool:
        """Most of the heard words are words the bot just said (echo the browser did not cancel)."""
        heard = _words(transcript)
        if not heard or not self.said:
            return False
        said = set(self.said)
        return sum(w in said for w in heard) / len(heard) >= self.word_overlap

    def is_echo(self, heard: np.ndarray, transcript: str = "") -> bool:
        return self.sounds_like_bot(heard) or self.repeats_bot(transcript)


# -- Whisper's own doubt ------------------------------------------------------------------------
MAX_NO_SPEECH = 0.6  # Whisper's probability that a window holds no speech
MIN_AVG_LOGPROB = -1.0  # mean token log-probability below this: guessed words (faster-whisper's own cut)


def heard_words(text: str, no_speech_prob: float, avg_logprob: float) -> bool:
    """Whether a transcript is words someone said, not text Whisper made up from noise."""
    return bool(_words(text)) and no_speech_prob < MAX_NO_SPEECH and avg_logprob > MIN_AVG_LOGPROB


class StreamResampler:
    """Microphone chunks at the browser's rate to 16 kHz, seamlessly across chunk boundaries.

    Resampling each chunk on its own leaves a click at every boundary (filters start cold),
    which Whisper hears as words. Here a low-pass FIR carries its history from chunk to chunk
    and the output sample positions carry their phase.
    """

    def __init__(self, rate: int, taps: int = 63) -> None:
        self.rate = rate
        self.step = rate / SAMPLE_RATE
        n = np.arange(taps) - (taps - 1) / 2
        cutoff = 0.95 * (SAMPLE_RATE / 2) / rate  # just below the new Nyquist, as a fraction of the old rate
        kernel = 2 * cutoff * np.sinc(2 * cutoff * n) * np.hamming(taps)
        self.kernel = (kernel / kernel.sum()).astype(np.float32)
        self.history = np.zeros(taps - 1, np.float32)
        self.position = 0.0  # where the next output sample falls, relative to the next chunk's first sample
        self.last = np.float32(0)

    def __call__(self, samples: np.ndarray) -> np.ndarray:
        if self.rate == SAMPLE_RATE or not len(samples):
            return samples.astype(np.float32)
        buffer = np.concatenate([self.history, samples.astype(np.float32)])
        filtered = np.convolve(buffer, self.kernel, mode="valid")  # one value per new sample
        self.history = buffer[len(buffer) - len(self.history):]
        positions = np.arange(self.position, len(filtered) - 1 + 1e-9, self.step)
        with_last = np.concatenate([[self.last], filtered])  # index 0 is the previous chunk's last sample
        out = np.interp(positions + 1, np.arange(len(with_last)), with_last)
        if len(positions):
            self.position = positions[-1] + self.step - len(filtered)
        else:
            self.position -= len(filtered)
        self.last = filtered[-1]
        return out.astype(np.float32)


def to_16k(samples: np.ndarray, rate: int) -> np.ndarray:
    """Mono float samples at the VAD's and the echo guard's rate."""
    return samples.astype(np.float32) if rate == SAMPLE_RATE else _resampled(samples, rate)


@openmp.in_passing_thread
def _resampled(samples: np.ndarray, rate: int) -> np.ndarray:
    import torch
    import torchaudio.functional as AF

    return AF.resample(torch.from_numpy(samples.astype(np.float32)), rate, SAMPLE_RATE).numpy()
