"""chatbot.perception.audio: decoding every supported format, signal clean-up, and friendly refusals."""

from __future__ import annotations

import wave
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torchaudio.functional as AF

from chatbot.errors import UserFacingError
from chatbot.perception import audio
from chatbot.perception.audio import SAMPLE_RATE, load_audio

DATA = Path(__file__).resolve().parents[1] / "data"
SPEECH = DATA / "capital_of_france.wav"
OTHER_SPEECH = DATA / "elephant_giraffe.wav"

# suffix -> (PyAV muxer, encoder, encoder sample rate); the encoders PyAV's bundled FFmpeg has.
ENCODINGS = {
    "mp3": ("mp3", "libmp3lame", 16000),
    "ogg": ("ogg", "libopus", 48000),
    "webm": ("webm", "libopus", 48000),
    "m4a": ("ipod", "aac", 16000),
    "aac": ("adts", "aac", 16000),  # raw AAC stream, no container
    "flac": ("flac", "flac", 16000),
}


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """int16 samples (frames, channels) and rate, with the standard library only."""
    with wave.open(str(path)) as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
        return pcm.reshape(-1, w.getnchannels()), w.getframerate()


def write_wav(path: Path, samples: np.ndarray, rate: int) -> Path:
    """Write float samples in [-1, 1], shape (n,) or (n, channels), as 16-bit PCM WAV."""
    samples = samples.reshape(len(samples), -1)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(samples.shape[1])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def speech(path: Path = SPEECH) -> np.ndarray:
    pcm, rate = read_wav(path)
    assert rate == SAMPLE_RATE
    return pcm[:, 0] / 32768.0


def encode(dest: Path, samples: np.ndarray, suffix: str) -> Path:
    """Encode mono 16 kHz float samples with PyAV into the container/codec for `suffix`."""
    muxer, codec, rate = ENCODINGS[suffix]
    frame = av.AudioFrame.from_ndarray((samples * 32767).astype(np.int16).reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate = SAMPLE_RATE
    with av.open(str(dest), "w", format=muxer) as out:
        stream = out.add_stream(codec, rate=rate, layout="mono")
        fmt = stream.codec_context.codec.audio_formats[0].name
        resampler = av.AudioResampler(format=fmt, layout="mono", rate=rate)
        for converted in resampler.resample(frame) + resampler.resample(None):
            out.mux(stream.encode(converted))
        out.mux(stream.encode(None))
    return dest


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    n = min(a.numel(), b.numel())
    return float(torch.corrcoef(torch.stack([a[:n], b[:n]]))[0, 1])


def refused(path: Path, **kwargs) -> str:
    with pytest.raises(UserFacingError) as info:
        load_audio(path, **kwargs)
    return str(info.value)


# --- decoding -----------------------------------------------------------------------------


def test_fixture_wav_gives_16k_mono_float_clip():
    clip = load_audio(SPEECH)
    assert clip.sample_rate == SAMPLE_RATE
    assert clip.waveform.dtype == torch.float32 and clip.waveform.dim() == 1
    assert clip.duration == pytest.approx(len(speech()) / SAMPLE_RATE)
    assert 0.5 < clip.waveform.abs().max() <= 1.0


@pytest.mark.parametrize("suffix", sorted(ENCODINGS))
def test_decodes_compressed_formats(tmp_path, suffix):
    reference = load_audio(SPEECH)
    clip = load_audio(encode(tmp_path / f"speech.{suffix}", speech(), suffix))
    # Codecs add a few ms of priming/padding; the speech must all be there.
    assert clip.duration == pytest.approx(reference.duration, abs=0.1)
    assert clip.waveform.numel() == pytest.approx(reference.waveform.numel(), abs=0.1 * SAMPLE_RATE)
    assert clip.waveform.abs().max() > 0.5


@pytest.mark.parametrize("suffix", ["mp3", "ogg", "m4a"])
def test_content_decides_format_not_extension(tmp_path, suffix):
    wav_named_other = tmp_path / f"really_wav.{suffix}"
    wav_named_other.write_bytes(SPEECH.read_bytes())
    other_named_wav = encode(tmp_path / f"really_{suffix}.{suffix}", speech(), suffix).rename(tmp_path / "x.wav")
    assert load_audio(wav_named_other).duration == pytest.approx(load_audio(SPEECH).duration)
    assert load_audio(other_named_wav).duration == pytest.approx(load_audio(SPEECH).duration, abs=0.1)


def test_gradio_microphone_wav_44k_16bit_mono(tmp_path):
    mic = AF.resample(torch.from_numpy(speech()).float(), SAMPLE_RATE, 44100).numpy()
    clip = load_audio(write_wav(tmp_path / "audio.wav", mic, 44100))
    reference = load_audio(SPEECH)
    assert clip.sample_rate == SAMPLE_RATE
    assert clip.duration == pytest.approx(reference.duration, abs=1e-3)
    assert clip.waveform.numel() == pytest.approx(reference.waveform.numel(), abs=SAMPLE_RATE * 0.02)
    assert correlation(clip.waveform, reference.waveform) > 0.98


def test_stereo_48k_is_downmixed_and_resampled(tmp_path):
    left = AF.resample(torch.from_numpy(speech()).float(), SAMPLE_RATE, 48000).numpy()
    stereo = np.stack([left, np.zeros_like(left)], axis=1)  # speech on one channel only
    clip = load_audio(write_wav(tmp_path / "stereo.wav", stereo, 48000))
    assert clip.waveform.dim() == 1
    assert correlation(clip.waveform, load_audio(SPEECH).waveform) > 0.98


# --- trimming and level -------------------------------------------------------------------


def test_trim_drops_edge_silence_but_keeps_all_speech(tmp_path):
    words = speech()
    rng = np.random.default_rng(0)
    silence = rng.normal(0, 10 ** (-70 / 20), 2 * SAMPLE_RATE)  # a quiet room, not digital zero
    padded = np.concatenate([silence, words, silence])
    clip = load_audio(write_wav(tmp_path / "padded.wav", padded, SAMPLE_RATE))

    assert clip.duration == pytest.approx(len(padded) / SAMPLE_RATE)
    assert clip.waveform.numel() < len(words) + 2 * audio.TRIM_PAD_SECONDS * SAMPLE_RATE + 0.05 * SAMPLE_RATE
    # Locate the words inside the trimmed clip; every audible sample of them must be inside it.
    x = clip.waveform.numpy()
    n = len(x) + len(words)
    lag = int(np.argmax(np.fft.irfft(np.fft.rfft(x, n) * np.conj(np.fft.rfft(words, n)), n)))
    offset = lag if lag < len(x) else lag - n  # where words[0] lands in the clip (may be negative)
    audible = np.flatnonzero(np.abs(words) > 10 ** (-50 / 20))
    assert offset + audible[0] >= 0 and offset + audible[-1] < len(x)


def test_trim_keeps_pauses_inside_speech(tmp_path):
    first, second = speech(SPEECH), speech(OTHER_SPEECH)
    pause = np.zeros(2 * SAMPLE_RATE)
    clip = load_audio(write_wav(tmp_path / "pause.wav", np.concatenate([first, pause, second]), SAMPLE_RATE))
    # Only the ends may lose their near-silent edges (espeak leaves a little around each sentence).
    assert clip.waveform.numel() > len(first) + len(pause) + len(second) - 0.3 * SAMPLE_RATE


def test_quiet_and_loud_recordings_come_out_at_the_same_level(tmp_path):
    loud = load_audio(SPEECH).waveform
    quiet = load_audio(write_wav(tmp_path / "quiet.wav", speech() * 0.01, SAMPLE_RATE)).waveform
    rms_db = [20 * np.log10(w.pow(2).mean().sqrt().item()) for w in (loud, quiet)]
    assert rms_db[0] == pytest.approx(rms_db[1], abs=1.0)
    assert quiet.abs().max() <= audio.PEAK_LIMIT + 1e-6
    assert correlation(loud, quiet) > 0.98


# --- refusals -----------------------------------------------------------------------------


def test_empty_file(tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    assert "empty" in refused(tmp_path / "empty.wav")


def test_missing_file(tmp_path):
    assert "could not be read" in refused(tmp_path / "nope.wav")


def test_text_file_named_wav(tmp_path):
    (tmp_path / "notes.wav").write_text("Shopping list: eggs, milk, bread.\n" * 20)
    message = refused(tmp_path / "notes.wav")
    assert "not a recording" in message and "MP3" in message


def test_random_bytes(tmp_path):
    (tmp_path / "noise.mp3").write_bytes(np.random.default_rng(1).bytes(4096))
    assert "not a recording" in refused(tmp_path / "noise.mp3")


@pytest.mark.parametrize("suffix, keep", [("wav", 12), ("ogg", 40), ("m4a", 40), ("flac", 42)])
def test_valid_header_with_corrupt_body(tmp_path, suffix, keep):
    # Keep enough of a real file for the format sniff (and, for FLAC, its stream header) to pass.
    good = SPEECH if suffix == "wav" else encode(tmp_path / f"good.{suffix}", speech(), suffix)
    (tmp_path / f"bad.{suffix}").write_bytes(good.read_bytes()[:keep] + np.random.default_rng(2).bytes(20_000))
    assert "damaged" in refused(tmp_path / f"bad.{suffix}")


def test_one_corrupt_stretch_is_skipped_like_ffmpeg_does(tmp_path):
    mp3 = encode(tmp_path / "speech.mp3", np.concatenate([speech(), speech()]), "mp3").read_bytes()
    middle = len(mp3) // 2
    (tmp_path / "glitch.mp3").write_bytes(mp3[:middle] + np.random.default_rng(3).bytes(500) + mp3[middle + 500:])
    clip = load_audio(tmp_path / "glitch.mp3")
    assert clip.duration > 3.0


def test_a_few_milliseconds(tmp_path):
    message = refused(write_wav(tmp_path / "blip.wav", speech()[8000:8080], SAMPLE_RATE))
    assert "too short" in message and "5 ms" in message


@pytest.mark.parametrize("level_db", [None, -70.0])
def test_silent(tmp_path, level_db):
    n = 3 * SAMPLE_RATE
    quiet = np.zeros(n) if level_db is None else np.random.default_rng(4).normal(0, 10 ** (level_db / 20), n)
    assert "silent" in refused(write_wav(tmp_path / "silence.wav", quiet, SAMPLE_RATE))


def test_too_long_says_the_cap():
    message = refused(SPEECH, max_seconds=1.0)
    assert "at most 1 second long" in message and f"{len(speech()) / SAMPLE_RATE:.1f} seconds" in message


def test_too_long_is_refused_from_the_header_without_decoding(tmp_path):
    # A one-second FLAC whose stream header claims ten minutes: only a header check can say "10 minutes".
    flac = bytearray(encode(tmp_path / "short.flac", speech()[:SAMPLE_RATE], "flac").read_bytes())
    total = 600 * SAMPLE_RATE  # STREAMINFO's 36-bit sample count: low nibble of byte 21, then bytes 22-25
    flac[21] = (flac[21] & 0xF0) | (total >> 32)
    flac[22:26] = (total & 0xFFFFFFFF).to_bytes(4, "big")
    (tmp_path / "claims_long.flac").write_bytes(flac)
    message = refused(tmp_path / "claims_long.flac")
    assert "at most 5 minutes" in message and "10 minutes" in message


def test_too_long_is_bounded_during_decode_when_the_header_understates(tmp_path, monkeypatch):
    # Header durations of MP3/ADTS are estimates; with the header check disabled the decode loop must stop.
    monkeypatch.setattr(audio, "DURATION_ESTIMATE_SLACK", float("inf"))
    message = refused(encode(tmp_path / "speech.mp3", speech(), "mp3"), max_seconds=1.0)
    assert "at most 1 second" in message and "longer" in message
