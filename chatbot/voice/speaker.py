"""Replies spoken sentence by sentence while they are written, and kept with the reply.

`ReplySpeaker` is the `ChatService`'s reply listener. For a conversation whose speaker is on,
it cuts the reply into sentences as it streams (`SentenceStream`), synthesises each one at
once into a short clip the page plays in order, and when the reply ends joins the clips into
one recording stored as the reply's attachment ("Spoken reply N": playable later, exported,
never sent to the model). A reply in a language no voice speaks is not spoken; the page says so.
"""

from __future__ import annotations

import io
import logging
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from chatbot.conversation.store import ConversationStore
from chatbot.state import Attachment, AttachmentKind, new_id
from chatbot.voice.speakable import SentenceStream
from chatbot.voice.tts import SpeechSynthesizer, write_wav

log = logging.getLogger(__name__)

LANGUAGE_NAMES = {"en": "English", "fr": "French", "de": "German", "es": "Spanish", "it": "Italian",
                  "pt": "Portuguese", "nl": "Dutch", "ru": "Russian", "zh": "Chinese", "ja": "Japanese"}
MIN_LANGUAGE_CHARS = 20  # shorter text does not tell its language reliably: wait for more
SURE_TEXT_LANGUAGE = 0.8


class TextLanguage:
    """The language a text is written in (langid.py: a small offline classifier, loaded in the background)."""

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._identifier = None
        threading.Thread(target=self._load, name="langid-load", daemon=True).start()

    def _load(self) -> None:
        try:
            from langid.langid import LanguageIdentifier, model

            identifier = LanguageIdentifier.from_modelstring(model, norm_probs=True)
            identifier.set_languages(list(LANGUAGE_NAMES))  # the common ones: fewer wild guesses on short text
            self._identifier = identifier
        finally:
            self._ready.set()

    def __call__(self, text: str) -> str | None:
        """ISO code, or None when unsure."""
        self._ready.wait()
        if self._identifier is None:
            return None
        language, probability = self._identifier.classify(text)
        return language if probability >= SURE_TEXT_LANGUAGE else None


@dataclass
class Clip:
    url_path: str  # a file the page may serve
    seconds: float
    text: str


@dataclass
class SpokenReply:
    """One reply being spoken: its clips so far, for the page to fetch and play in order."""

    sentences: SentenceStream = field(default_factory=SentenceStream)
    clips: list[Clip] = field(default_factory=list)
    audio: list[np.ndarray] = field(default_factory=list)
    language: str | None = None  # decided from the first sentences
    id: str = field(default_factory=new_id)
    silent_reason: str = ""  # why this reply is not spoken (no voice for its language)
    cancelled: bool = False  # barge-in / stop: say nothing more
    done: bool = False


class ReplySpeaker:
    """Shared by all sessions; speaks the replies of owners whose speaker is on (`set_speaking`)."""

    def __init__(self, voice: SpeechSynthesizer, store: ConversationStore,
                 language_of: TextLanguage | None = None) -> None:
        self.voice = voice
        self.store = store
        self.language_of = language_of or TextLanguage()
        self._clip_dir = Path(tempfile.mkdtemp(prefix="chatbot-voice-"))
        self._on: set[str] = set()  # owners whose speaker is on
        self._replies: dict[str, SpokenReply] = {}
        self._lock = threading.Lock()

    @property
    def clip_dir(self) -> Path:
        return self._clip_dir

    def set_speaking(self, owner: str, on: bool) -> None:
        """The owner's speaker toggle: their replies are spoken from the next sentence on."""
        with self._lock:
            (self._on.add if on else self._on.discard)(owner)

    def current(self, conv_id: str) -> SpokenReply | None:
        with self._lock:
            return self._replies.get(conv_id)

    def cancel(self, conv_id: str) -> None:
        """Barge-in or stop: no more sentences of the current reply are spoken."""
        spoken = self.current(conv_id)
        if spoken:
            spoken.cancelled = True

    # -- ReplyListener ------------------------------------------------------------------------
    def heard(self, owner: str, conv_id: str, reply: str) -> None:
        spoken = self._reply_for(owner, conv_id)
        if spoken is not None:
            self._say(spoken, spoken.sentences.feed(reply))

    def finished(self, owner: str, conv_id: str, reply: str, interrupted: bool) -> list[Attachment]:
        spoken = self._reply_for(owner, conv_id)
        if spoken is None:
            return []
        if not interrupted:
            self._say(spoken, spoken.sentences.finish(reply), final=True)
        spoken.done = True
        if not spoken.audio:
            return []
        buffer = io.BytesIO()
        write_wav(buffer, np.concatenate(spoken.audio), self.voice.sample_rate)
        path, sha = self.store.keep_media(buffer.getvalue())
        return [Attachment(kind=AttachmentKind.AUDIO, path=str(path), sha256=sha, name="spoken-reply.wav")]

    # -- internals --------------------------------------------------------------------------------
    def _reply_for(self, owner: str, conv_id: str) -> SpokenReply | None:
        with self._lock:
            if owner not in self._on:
                return None
            spoken = self._replies.get(conv_id)
            if spoken is None or spoken.done:
                spoken = self._replies[conv_id] = SpokenReply()
            return spoken

    def _say(self, spoken: SpokenReply, sentences: list[str], final: bool = False) -> None:
        for sentence in sentences:
            if spoken.cancelled or spoken.silent_reason:
                return
            said = " ".join(c.text for c in spoken.clips) + " " + sentence
            # Too short to tell ("OK.", a name) is said in the voice's language; then the reply decides.
            if spoken.language is None and (final or len(said) >= MIN_LANGUAGE_CHARS):
                spoken.language = self.language_of(said) or self.voice.language
                if spoken.language != self.voice.language:
                    name = LANGUAGE_NAMES.get(spoken.language, spoken.language)
                    spoken.silent_reason = f"Not spoken: there is no voice for {name} here."
                    return
            try:
                samples = self.voice.synthesize(sentence)
            except Exception:  # noqa: BLE001 - an unspeakable sentence must not end the reply
                log.exception("Speaking a sentence failed")
                continue
            if not samples.size:
                continue
            path = write_wav(self._clip_dir / f"{new_id()}.wav", samples, self.voice.sample_rate)
            spoken.audio.append(samples)
            spoken.clips.append(Clip(str(path), samples.size / self.voice.sample_rate, sentence))

