"""Hands-free call mode: listen, answer, speak, listen again; the user can interrupt (barge-in).

One `VoicePeer` per browser tab. The page streams microphone packets into `receive`; the VAD
(`UtteranceDetector`) finds where each utterance ends; a worker thread transcribes it, checks it
was the user (Whisper's doubt, `EchoGuard`), sends it as a voice turn through `ChatService` (so
typed, photo and spoken turns share one conversation) and lets `ReplySpeaker` speak the reply.
`collect` hands the page the clips to play and the state to show. Speaking while the bot talks
stops its generation and playback; its own voice, picked up by the microphone, does not.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
import wave
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import numpy as np

from chatbot.conversation.service import ChatService
from chatbot.perception.speech import SpeechRecognizer
from chatbot.voice.listening import (
    EchoGuard,
    SileroVad,
    StreamResampler,
    UtteranceDetector,
    heard_words,
    to_16k,
)
from chatbot.voice.speaker import Clip, ReplySpeaker
from chatbot.voice.tts import write_wav

log = logging.getLogger(__name__)

PLAYBACK_SLACK = 0.5  # seconds: the browser starts a clip a little after it is handed over
# A call keeps the language of the first turn heard this surely: detecting it again costs Whisper a second
# pass of its encoder, about half of the wait before a reply (bench_call). Whoever switches language
# mid-call is heard in the first one until the call is restarted.
KEEP_LANGUAGE = 0.9


class CallState(str, Enum):
    OFF = "off"
    LISTENING = "listening"
    THINKING = "thinking"
    SPEAKING = "speaking"


@dataclass
class Update:
    """What the page should do now."""

    clips: list[Clip] = field(default_factory=list)  # to play, in order
    stop_playback: bool = False  # barge-in: silence what is playing
    status: str = ""
    conversation_changed: bool = False  # a call turn added to the conversation: redraw it
    conversation_id: str | None = None


class VoicePeer:
    """One browser tab's voice: its speaker setting, its call, and the clips it has been given."""

    def __init__(self, service: ChatService, speaker: ReplySpeaker, recognizer: SpeechRecognizer | None) -> None:
        self.service = service
        self.speaker = speaker
        self.recognizer = recognizer
        self.owner = ""
        self.conversation_id: str | None = None
        self.conversation = None  # the call's Conversation, as the worker updates it
        self.reply_so_far: str | None = None
        self.language_hint: str | None = None
        self.language: str | None = None  # the call's language, once a turn was heard in it surely
        self.state = CallState.OFF
        self.guard = EchoGuard()
        self._detector: UtteranceDetector | None = None
        self._resampler: StreamResampler | None = None
        self._stream: tuple[str, int] = ("", 0)  # (the browser's microphone stream, samples of it heard)
        self._lock = threading.Lock()
        self._hearing = threading.Lock()  # microphone chunks are handled one at a time, in order
        self._worker: threading.Thread | None = None
        self._cancel = threading.Event()  # set by a barge-in: the current turn's reply must stop
        self._given: tuple[str, int] = ("", 0)  # (the SpokenReply, clips of it handed over)
        self._playing_until = 0.0
        self._barged = False  # this utterance already interrupted the bot
        self._stop_playback = False
        self._changed = False
        self._status = ""
        self._folder = Path(tempfile.mkdtemp(prefix="chatbot-call-"))

    # -- the call ---------------------------------------------------------------------------------
    def start_call(self, owner: str, conversation_id: str | None, language_hint: str | None) -> None:
        if self.recognizer is None:
            raise RuntimeError("no speech recogniser")
        with self._lock:
            self.owner, self.conversation_id, self.language_hint = owner, conversation_id, language_hint
            self.language = None
            self.conversation = None
            if self._detector is None:
                self._detector = UtteranceDetector(SileroVad())
            self._detector.reset()
            self._resampler = None
            self.state = CallState.LISTENING
            self._status = "Listening…"
        self.speaker.set_speaking(owner, True)  # a call is spoken, whatever the toggle says

    def end_call(self) -> None:
        with self._lock:
            self.state = CallState.OFF
            self._status = ""
        self._barge_in()

    def receive(self, stream: str, start: int, rate: int, samples: np.ndarray) -> int:
        """A packet of the browser's microphone stream `stream`: `samples` from sample number `start` on.

        The browser sends everything not yet acknowledged, so packets overlap, repeat, or (two
        requests in flight) arrive out of order; each sample is heard exactly once, in order.
        Returns how many samples of the stream are heard: the browser's acknowledgement.
        """
        with self._hearing:
            name, heard = self._stream
            if name != stream:  # a new call (or a reloaded tab): its stream starts at sample 0
                name, heard = stream, 0
            fresh = samples[max(0, heard - start):]
            if start > heard:  # a gap cannot happen with a well-behaved browser; hear on from here
                log.warning("Call: %d microphone samples never arrived", start - heard)
                heard = start
            self._stream = (name, heard + len(fresh))
            if len(fresh):
                self._hear(rate, fresh)
            return self._stream[1]

    def _hear(self, rate: int, samples: np.ndarray) -> None:
        """A chunk of the microphone stream (any rate, int16 or float, mono or stereo), in order."""
        if self.state is CallState.OFF or self._detector is None:
            return
        audio = samples.astype(np.float32)
        if samples.dtype.kind == "i":
            audio /= 32768.0
        if audio.ndim > 1:
            audio = audio.mean(axis=1)
        if self._resampler is None or self._resampler.rate != rate:
            self._resampler = StreamResampler(rate)
        utterances = self._detector.feed(self._resampler(audio))
        if self._bot_active() and self._detector.hearing_speech and not self._barged:
            if not self.guard.sounds_like_bot(self._detector.current_speech()):
                log.info("Barge-in: the user spoke while the bot was answering")
                self._barged = True
                self._barge_in()
        for utterance in utterances:
            self._barged = False
            if self._bot_active() and self.guard.sounds_like_bot(utterance):
                continue  # the bot's own voice came back through the microphone
            self._start_turn(utterance)

    def _bot_active(self) -> bool:
        busy = self._worker is not None and self._worker.is_alive()
        return busy or time.monotonic() < self._playing_until

    def _barge_in(self) -> None:
        self._cancel.set()  # also when the turn is still being transcribed: it must not start a reply
        if self.conversation_id:
            self.service.stop(self.owner, self.conversation_id)
            self.speaker.cancel(self.conversation_id)
        with self._lock:
            if time.monotonic() < self._playing_until:
                self._stop_playback = True
            self._playing_until = 0.0

    def _start_turn(self, utterance: np.ndarray) -> None:
        previous = self._worker
        self._cancel = threading.Event()
        self._worker = threading.Thread(target=self._turn, args=(utterance, previous, self._cancel), name="call-turn",
                                        daemon=True)
        self._worker.start()

    def _turn(self, utterance: np.ndarray, previous: threading.Thread | None, cancel: threading.Event) -> None:
        from chatbot.perception.audio import load_audio

        if previous is not None:
            previous.join()  # after a barge-in the old reply ends within a token or two

        self.state, self._status = CallState.THINKING, "Thinking…"
        try:
            path = write_wav(self._folder / f"utterance-{time.time_ns()}.wav", utterance, 16_000)
            transcript = self.recognizer.transcribe(load_audio(path), self.language_hint, self.language)
            if not heard_words(transcript.text, transcript.no_speech_prob, transcript.avg_logprob) \
                    or self.guard.repeats_bot(transcript.text):
                log.info("Call: ignored %r (no speech %.2f, log-prob %.2f)", transcript.text,
                         transcript.no_speech_prob, transcript.avg_logprob)
                return
            log.info("Call: heard %r (%.1f s of speech)", transcript.text, len(utterance) / 16_000)
            if self.language is None and transcript.language_probability >= KEEP_LANGUAGE:
                self.language = transcript.language
            self.service.encoder.remember_recording(path, transcript)
            conv = self.service.conversation(self.owner, self.conversation_id)
            self.conversation_id, self.conversation = conv.id, conv
            self._status = f"Heard ({transcript.language}): {transcript.text}"
            for reply in self.service.respond(self.owner, conv, "", [str(path)]):
                self.reply_so_far, self._changed = reply, True
                if cancel.is_set():  # interrupted before its reply began: it ends, marked stopped, at once
                    self.service.stop(self.owner, conv.id)
            self.reply_so_far, self._changed = None, True
        except Exception:  # noqa: BLE001 - one failed turn must not end the call
            log.exception("A call turn failed")
            self._status = "Sorry, that did not work; please say it again."
        finally:
            if self.state is not CallState.OFF:
                self.state = CallState.LISTENING
                self._status = self._status if self._status.startswith(("Heard", "Sorry")) else "Listening…"

    # -- what the page gets --------------------------------------------------------------------
    def collect(self, conversation_id: str | None) -> Update:
        """New clips of the conversation's current reply (speaker or call), and what to show."""
        conv_id = self.conversation_id if self.state is not CallState.OFF else conversation_id
        update = Update(status=self._status, conversation_id=conv_id)
        with self._lock:
            update.stop_playback, self._stop_playback = self._stop_playback, False
            update.conversation_changed, self._changed = self._changed, False
        spoken = self.speaker.current(conv_id) if conv_id else None
        if spoken is None:
            return update
        reply_id, given = self._given
        if reply_id != spoken.id:
            given = 0
        update.clips = spoken.clips[given:]
        self._given = (spoken.id, given + len(update.clips))
        if spoken.silent_reason and spoken.done:
            update.status = spoken.silent_reason
        now = time.monotonic()
        for clip in update.clips:
            with wave.open(clip.url_path) as f:
                samples = np.frombuffer(f.readframes(f.getnframes()), "<i2").astype(np.float32) / 32768
                self.guard.playing(to_16k(samples, f.getframerate()), clip.text)
            self._playing_until = max(self._playing_until, now) + clip.seconds + PLAYBACK_SLACK
        return update
