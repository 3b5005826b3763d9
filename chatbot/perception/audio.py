"""Turn an uploaded or recorded audio file into a clean 16 kHz mono waveform.

Decoding uses PyAV, which bundles its own FFmpeg, so no system FFmpeg is needed.
The container format is chosen from the file's first bytes, never its name, and
only from a short list of audio formats: a text file called `.wav` is refused
and FFmpeg's playlist-style demuxers (which can open other files) never run.
Each decoded frame goes through FFmpeg's resampler to 16 kHz mono float at once, so
memory follows the length of the audio, never its declared sample rate (a rate
with no common factor with 16 kHz made torchaudio build gigabyte filter banks).
Everything after decoding (trimming, level) is torch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import av
import torch

from chatbot import openmp
from chatbot.errors import UserFacingError
from chatbot.media import sniff
from chatbot.state import AttachmentKind

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
SUPPORTED = "WAV, MP3, OGG/Opus, WebM, M4A/AAC or FLAC"

MIN_SECONDS = 0.1  # shorter than a syllable: nothing a recogniser could use
FRAME_SECONDS = 0.02  # analysis window for the level measurements below
SILENT_DB = -55.0  # loudest window quieter than this (dBFS) = nothing but hiss
TRIM_BELOW_PEAK_DB = 40.0  # windows this far under the loudest one count as silence...
TRIM_PAD_SECONDS = 0.3  # ...and this much is kept around speech for soft onsets and tails
TARGET_RMS_DB = -20.0  # typical level of normalised speech
PEAK_LIMIT = 0.99  # normalisation never clips
# Container durations of MP3/ADTS files are bitrate estimates; the decode loop is the hard bound.
DURATION_ESTIMATE_SLACK = 1.1
# Sample rates real recordings use lie between telephone (8 kHz, some old codecs 4 kHz) and studio (192 kHz).
# Outside them a file is broken or built to hurt: at 1 Hz one packet would resample to hours of audio.
MIN_RATE = 4_000
MAX_RATE = 192_000


@dataclass
class AudioClip:
    waveform: torch.Tensor  # 1-D float32, mono, 16 kHz, level-normalised, silence trimmed
    sample_rate: int  # always SAMPLE_RATE
    duration: float  # seconds of the original decoded audio, before trimming


@openmp.in_passing_thread
def load_audio(path: str | Path, *, max_seconds: float = 300.0) -> AudioClip:
    """Decode `path` and prepare it for speech recognition; bad input raises UserFacingError."""
    samples = _decode(Path(path), max_seconds)
    duration = samples.numel() / SAMPLE_RATE
    if duration < MIN_SECONDS:
        raise UserFacingError(f"The recording is too short ({duration * 1000:.0f} ms) to contain any speech.")
    samples = samples - samples.mean()  # DC offset from cheap microphones would skew every level below
    frame_db = _frame_levels_db(samples)
    if frame_db.max() < SILENT_DB:
        raise UserFacingError("The recording is silent: no sound was picked up. "
                              "Please check the microphone and try again.")
    samples = _trim_silence(samples, frame_db)
    return AudioClip(waveform=_normalise(samples).contiguous(), sample_rate=SAMPLE_RATE, duration=duration)


def _sniff_format(path: Path) -> str | None:
    """The FFmpeg demuxer for the file's content, or None if it is not a supported audio format."""
    fmt = sniff(path)
    return fmt.demuxer if fmt is not None and fmt.kind is AttachmentKind.AUDIO else None


def _decode(path: Path, max_seconds: float) -> torch.Tensor:
    """Mono float samples at SAMPLE_RATE, refusing anything longer than `max_seconds`."""
    try:
        if path.stat().st_size == 0:
            raise UserFacingError("The audio file is empty.")
        fmt = _sniff_format(path)
    except OSError as e:
        raise UserFacingError("The audio file could not be read.") from e
    if fmt is None:
        raise UserFacingError(f"This file is not a recording I can read. Please send {SUPPORTED} audio.")

    chunks: list[torch.Tensor] = []
    decoded = 0.0
    good = bad = 0
    promised = 0.0  # seconds the container header announces, if it says
    try:
        with av.open(str(path), format=fmt, metadata_errors="replace") as container:
            if not container.streams.audio:
                raise UserFacingError("This file has no sound in it.")
            stream = container.streams.audio[0]
            if stream.codec_context is None:  # a codec FFmpeg does not know (found by fuzzing)
                raise _damaged()
            if stream.codec_context.sample_rate:  # 0 when the header does not say; frames are checked below
                _check_rate(stream.codec_context.sample_rate)
            if container.duration is not None:  # cheap: from the header, before decoding anything
                promised = container.duration / av.time_base
                if promised > max_seconds * DURATION_ESTIMATE_SLACK:
                    raise _too_long(max_seconds, promised)
            # Any sample format, layout and rate -> 16 kHz mono float, one frame at a time.
            to_speech = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
            for packet in container.demux(stream):
                try:
                    frames = packet.decode()
                except av.error.InvalidDataError:
                    bad += 1  # a glitch in one packet: skip it, as the ffmpeg command line does
                    continue
                good += 1
                for frame in frames:
                    _check_rate(frame.sample_rate)  # streams may change rate midway
                    decoded += _keep(to_speech.resample(frame), chunks)
                if decoded > max_seconds:
                    raise _too_long(max_seconds, None)  # stop here: never decode hours of audio
            decoded += _keep(to_speech.resample(None), chunks)  # what the resampler still holds
    except (av.FFmpegError, ValueError) as e:
        log.info("Could not decode %s as %s: %s", path, fmt, e)
        raise _damaged() from e
    if bad > good or (not chunks and promised > 0):
        log.info("Could not decode %s: %d of %d packets corrupt, %.1f of %.1f s decoded",
                 path, bad, good + bad, decoded, promised)
        raise _damaged()
    if not chunks:
        raise UserFacingError("The recording contains no sound.")
    return torch.cat(chunks)


def _keep(frames: list[av.AudioFrame], chunks: list[torch.Tensor]) -> float:
    """Append the resampled frames' samples to `chunks`; the seconds they hold."""
    for f in frames:
        chunks.append(torch.from_numpy(f.to_ndarray()[0].copy()))  # packed mono: shape (1, n)
    return sum(f.samples for f in frames) / SAMPLE_RATE


def _check_rate(rate: int) -> None:
    if not MIN_RATE <= rate <= MAX_RATE:
        raise UserFacingError(f"This recording says it has {rate:,} samples per second, which no real "
                              f"recording uses (they have {MIN_RATE // 1000}–{MAX_RATE // 1000} kHz). "
                              "The file is probably damaged; please record or export it again.")


def _damaged() -> UserFacingError:
    return UserFacingError("The recording seems to be damaged and could not be decoded. "
                           "Please record or export it again.")


def _too_long(max_seconds: float, seconds: float | None) -> UserFacingError:
    actual = f"this one is {_human(seconds)}" if seconds is not None else "this one is longer"
    return UserFacingError(f"Recordings can be at most {_human(max_seconds)} long; {actual}. "
                           "Please send a shorter one.")


def _human(seconds: float) -> str:
    if seconds >= 60:
        minutes = seconds / 60
        n = f"{minutes:.0f}" if abs(minutes - round(minutes)) < 0.05 else f"{minutes:.1f}"
        return f"{n} minute" + ("" if n == "1" else "s")
    n = f"{seconds:g}" if seconds == int(seconds) else f"{seconds:.1f}"
    return f"{n} second" + ("" if n == "1" else "s")


def _frame_levels_db(samples: torch.Tensor) -> torch.Tensor:
    """RMS level of each analysis window in dBFS (a final partial window is padded)."""
    size = int(FRAME_SECONDS * SAMPLE_RATE)
    padded = torch.nn.functional.pad(samples, (0, -samples.numel() % size))
    rms = padded.view(-1, size).pow(2).mean(dim=1).sqrt()
    return 20 * torch.log10(rms.clamp_min(1e-10))


def _trim_silence(samples: torch.Tensor, frame_db: torch.Tensor) -> torch.Tensor:
    """Cut leading and trailing silence only; the gate is relative and padded so quiet speech survives."""
    active = torch.nonzero(frame_db > frame_db.max() - TRIM_BELOW_PEAK_DB).flatten()
    size = int(FRAME_SECONDS * SAMPLE_RATE)
    pad = int(TRIM_PAD_SECONDS * SAMPLE_RATE)
    start = max(0, int(active[0]) * size - pad)
    end = min(samples.numel(), (int(active[-1]) + 1) * size + pad)
    return samples[start:end]


def _normalise(samples: torch.Tensor) -> torch.Tensor:
    """Bring speech to a common loudness (quiet microphones, loud uploads) without clipping."""
    rms = samples.pow(2).mean().sqrt().item()
    peak = samples.abs().max().item()
    gain = min(10 ** (TARGET_RMS_DB / 20) / rms, PEAK_LIMIT / peak)
    return samples * gain
