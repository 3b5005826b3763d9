"""Turn an uploaded or recorded audio file into a clean 16 kHz mono waveform.

Decoding uses PyAV, which bundles its own FFmpeg, so no system FFmpeg is needed.
The container format is chosen from the file's first bytes, never its name, and
only from a short list of audio formats: a text file called `.wav` is refused
and FFmpeg's playlist-style demuxers (which can open other files) never run.
Everything after decoding (downmix, resampling, trimming, level) is torch/torchaudio.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import av
import torch
import torchaudio.functional as AF

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


@dataclass
class AudioClip:
    waveform: torch.Tensor  # 1-D float32, mono, 16 kHz, level-normalised, silence trimmed
    sample_rate: int  # always SAMPLE_RATE
    duration: float  # seconds of the original decoded audio, before trimming


def load_audio(path: str | Path, *, max_seconds: float = 300.0) -> AudioClip:
    """Decode `path` and prepare it for speech recognition; bad input raises UserFacingError."""
    samples, rate = _decode(Path(path), max_seconds)
    duration = samples.numel() / rate
    if duration < MIN_SECONDS:
        raise UserFacingError(f"The recording is too short ({duration * 1000:.0f} ms) to contain any speech.")
    if rate != SAMPLE_RATE:
        samples = AF.resample(samples, rate, SAMPLE_RATE)
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


def _decode(path: Path, max_seconds: float) -> tuple[torch.Tensor, int]:
    """Mono float samples at the file's own rate, refusing anything longer than `max_seconds`."""
    try:
        if path.stat().st_size == 0:
            raise UserFacingError("The audio file is empty.")
        fmt = _sniff_format(path)
    except OSError as e:
        raise UserFacingError("The audio file could not be read.") from e
    if fmt is None:
        raise UserFacingError(f"This file is not a recording I can read. Please send {SUPPORTED} audio.")

    chunks: list[torch.Tensor] = []
    rate = 0
    decoded = 0.0
    good = bad = 0
    promised = 0.0  # seconds the container header announces, if it says
    try:
        with av.open(str(path), format=fmt, metadata_errors="replace") as container:
            if not container.streams.audio:
                raise UserFacingError("This file has no sound in it.")
            stream = container.streams.audio[0]
            if container.duration is not None:  # cheap: from the header, before decoding anything
                promised = container.duration / av.time_base
                if promised > max_seconds * DURATION_ESTIMATE_SLACK:
                    raise _too_long(max_seconds, promised)
            to_float = av.AudioResampler(format="fltp")  # any sample format -> float planar, same layout and rate
            for packet in container.demux(stream):
                try:
                    frames = packet.decode()
                except av.error.InvalidDataError:
                    bad += 1  # a glitch in one packet: skip it, as the ffmpeg command line does
                    continue
                good += 1
                for frame in frames:
                    for f in to_float.resample(frame):
                        rate = rate or f.sample_rate
                        chunks.append(torch.from_numpy(f.to_ndarray()).mean(dim=0))  # (channels, n) -> mono
                        decoded += f.samples / f.sample_rate
                if decoded > max_seconds:
                    raise _too_long(max_seconds, None)  # stop here: never decode hours of audio
    except (av.FFmpegError, ValueError) as e:
        log.info("Could not decode %s as %s: %s", path, fmt, e)
        raise _damaged() from e
    if bad > good or (not chunks and promised > 0):
        log.info("Could not decode %s: %d of %d packets corrupt, %.1f of %.1f s decoded",
                 path, bad, good + bad, decoded, promised)
        raise _damaged()
    if not chunks:
        raise UserFacingError("The recording contains no sound.")
    return torch.cat(chunks), rate


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
