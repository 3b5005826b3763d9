"""Call mode's ears on committed recordings: utterance ends (Silero VAD), the echo guard, Whisper's doubt."""

import threading
import wave
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from chatbot.voice.call import CallState, VoicePeer
from chatbot.voice.listening import (
    SAMPLE_RATE,
    EchoGuard,
    SileroVad,
    UtteranceDetector,
    heard_words,
    split_utterances,
    to_16k,
)

DATA = Path(__file__).resolve().parents[1] / "data"


def read_wav(name: str) -> np.ndarray:
    with wave.open(str(DATA / name)) as f:
        assert f.getframerate() == SAMPLE_RATE and f.getnchannels() == 1
        return np.frombuffer(f.readframes(f.getnframes()), "<i2").astype(np.float32) / 32768


@pytest.fixture(scope="module")
def vad():
    return SileroVad()


def test_two_questions_with_a_pause_are_two_utterances(vad):
    audio = read_wav("call_two_questions.wav")  # 1 s quiet, question, 2.5 s pause, question, 8 s silence
    utterances = split_utterances(audio, vad=vad)
    assert len(utterances) == 2
    for utterance in utterances:
        assert 1.5 < len(utterance) / SAMPLE_RATE < 3.5  # each question whole, without the long silence


def test_noise_and_a_cough_are_no_utterance(vad):
    assert split_utterances(read_wav("noise_and_cough.wav"), vad=vad) == []


def test_chunk_size_does_not_change_the_result(vad):
    audio = read_wav("call_two_questions.wav")
    detector = UtteranceDetector(vad)
    sizes = [160, 4000, 777, 16000]  # browsers deliver irregular chunks
    found, i, k = [], 0, 0
    while i < len(audio):
        found += detector.feed(audio[i:i + sizes[k % len(sizes)]])
        i += sizes[k % len(sizes)]
        k += 1
    assert len(found) == 2


def test_barge_in_is_heard_while_the_question_is_still_going(vad):
    audio = read_wav("capital_of_france.wav")
    detector = UtteranceDetector(vad)
    heard_at = next(i for i in range(0, len(audio), 1600) if detector.feed(audio[i:i + 1600]) == [] and
                    detector.hearing_speech)
    assert heard_at / SAMPLE_RATE < 1.0  # well before the question ends (about 2 s)


def _bot_voice() -> tuple[np.ndarray, str]:
    from chatbot.voice.tts import load_voice

    voice = load_voice()
    text = "The capital of France is Paris, a city on the river Seine."
    return to_16k(voice.synthesize(text), voice.sample_rate), text


def test_echo_guard_knows_the_bots_own_voice_in_the_microphone():
    played, text = _bot_voice()
    guard = EchoGuard()
    guard.playing(played, text)
    rng = np.random.default_rng(0)
    # What a microphone picks up from a loudspeaker: later, quieter, with room noise.
    delay = int(0.25 * SAMPLE_RATE)
    echo = 0.3 * played[int(0.8 * SAMPLE_RATE): int(2.6 * SAMPLE_RATE)]
    mic = np.concatenate([np.zeros(delay, np.float32), echo]) + rng.normal(0, 0.01, delay + len(echo)).astype(np.float32)
    assert guard.sounds_like_bot(mic)
    assert guard.repeats_bot("the capital of France is Paris")


def test_echo_guard_lets_the_user_through():
    played, text = _bot_voice()
    guard = EchoGuard()
    guard.playing(played, text)
    user = read_wav("elephant_giraffe.wav")
    assert not guard.sounds_like_bot(user)
    assert not guard.repeats_bot("The elephant and the giraffe drink water from the river.")
    assert not guard.is_echo(user, "Stop, what about Berlin?")


def test_whispers_doubt_rejects_invented_text():
    assert heard_words("What is the capital of France?", no_speech_prob=0.02, avg_logprob=-0.3)
    assert not heard_words("Thank you.", no_speech_prob=0.85, avg_logprob=-0.4)  # silence "heard" as thanks
    assert not heard_words("Ugh hm kh", no_speech_prob=0.3, avg_logprob=-1.6)  # a cough read as words
    assert not heard_words("...", no_speech_prob=0.0, avg_logprob=-0.1)


def test_microphone_chunks_are_resampled_without_seams():
    from chatbot.voice.listening import StreamResampler

    rate = 44_100  # not a multiple of 16 kHz: the output positions must carry their phase
    t = np.arange(2 * rate) / rate
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    resampler = StreamResampler(rate)
    chunked = np.concatenate([resampler(tone[i:i + 3333]) for i in range(0, len(tone), 3333)])
    whole = StreamResampler(rate)(tone)
    assert abs(len(chunked) - 2 * SAMPLE_RATE) <= 1
    assert np.allclose(chunked, whole, atol=1e-4)  # the same as one long chunk: no clicks
    assert np.abs(np.diff(chunked[100:])).max() < 1.1 * 0.5 * 2 * np.pi * 440 / SAMPLE_RATE


class _Ears(VoicePeer):
    """A call's peer whose finished utterances are collected instead of answered."""

    def __init__(self) -> None:
        super().__init__(service=None, speaker=None, recognizer=None)
        self.utterances: list[np.ndarray] = []
        self.state, self._detector = CallState.LISTENING, UtteranceDetector(SileroVad())

    def _start_turn(self, utterance: np.ndarray) -> None:
        self.utterances.append(utterance)


def test_microphone_packets_that_overlap_repeat_or_cross_are_heard_once_in_order():
    # The browser resends all it has not had acknowledged, and two requests can cross on the way.
    audio = (read_wav("call_two_questions.wav") * 32767).astype(np.int16)
    clean = _Ears()
    assert clean.receive("call-1", 0, SAMPLE_RATE, audio) == len(audio)
    rng = np.random.default_rng(1)
    ears, acked, sent = _Ears(), 0, 0
    while acked < len(audio):
        sent = min(len(audio), sent + int(rng.integers(1000, 9000)))
        packets = [(acked, audio[acked:sent])]
        if rng.random() < 0.3:  # a later packet overtakes this one: the older arrives second
            more = min(len(audio), sent + 3000)
            packets.insert(0, (acked, audio[acked:more]))
            sent = more
        for start, samples in packets:
            acked = max(acked, ears.receive("call-1", start, SAMPLE_RATE, samples))
    assert [len(u) for u in ears.utterances] == [len(u) for u in clean.utterances] and len(clean.utterances) == 2
    assert all(np.array_equal(a, b) for a, b in zip(ears.utterances, clean.utterances))
    assert ears.receive("call-2", 0, SAMPLE_RATE, audio[:100]) == 100  # a new call's stream starts again at 0


class _Recognizer:
    """Hears the words it is given, in the language it is given; records what it was asked."""

    def __init__(self, heard: list[tuple[str, str, float]]):
        self.heard, self.asked = list(heard), []

    def transcribe(self, clip, language_hint=None, language=None):
        from chatbot.perception.speech import Transcript

        self.asked.append(language)
        text, detected, sure = self.heard.pop(0)
        return Transcript(text, language or detected, clip.duration, 1.0 if language else sure, 0.01, -0.2)


class _Service:
    """Just what a call turn uses of ChatService."""

    class encoder:
        @staticmethod
        def remember_recording(path, transcript):
            pass

    def conversation(self, owner, conv_id):
        from chatbot.state import Conversation

        return Conversation()

    def respond(self, owner, conv, text, files):
        yield "Fine."


def test_a_call_keeps_the_language_it_heard_surely_so_later_turns_skip_detection(tmp_path):
    recognizer = _Recognizer([("wie spät ist es jetzt", "de", 0.4), ("what is the capital of Italy", "en", 0.97),
                              ("and of France", "en", 1.0)])
    speaker = SimpleNamespace(set_speaking=lambda owner, on: None)
    peer = VoicePeer(service=_Service(), speaker=speaker, recognizer=recognizer)
    peer.state, peer._folder = CallState.LISTENING, tmp_path
    speech = read_wav("call_two_questions.wav")[16_000:48_000]
    for _ in range(3):
        peer._turn(speech, None, threading.Event())
    assert recognizer.asked == [None, None, "en"]  # unsure at first: detected again; then kept
    peer.start_call("key:ana", None, "de-DE")
    assert peer.language is None  # a new call listens for its language again
