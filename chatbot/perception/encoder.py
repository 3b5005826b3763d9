"""The multimodal encoder: turns what a user sent (text + files) into a user `Turn`.

Photos go through the vision analyzers, recordings through the speech
recogniser, PDFs through the document reader (scanned pages through the OCR
analyzer); what they yield is kept as `Observation`s on the turn. Each file
is analysed once: results are cached by content hash, so the same photo sent
again (or a conversation re-encoded) costs nothing.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path

from chatbot import footprint, media
from chatbot.errors import UserFacingError
from chatbot.state import (
    Attachment,
    AttachmentKind,
    Observation,
    ObservationKind,
    Role,
    Turn,
)

log = logging.getLogger(__name__)

NOT_MEDIA = ("'{name}' is not an image, recording or PDF I can read. Please send a photo (JPEG, PNG, WebP, GIF, "
             "BMP or TIFF), a recording (WAV, MP3, OGG/Opus, WebM, M4A/AAC or FLAC) or a PDF document.")


@dataclass(frozen=True)
class Limits:
    # What one message may carry; each request holds the only model thread, so these bound its cost.
    max_message_chars: int = 50_000  # a long pasted document; the model reads at most its context of it
    max_files: int = 10
    max_file_mb: float = 50.0  # also the upload limit the web server enforces
    max_image_mb: float = 20.0
    max_image_megapixels: float = 40.0
    max_audio_seconds: float = 300.0
    max_document_pages: int = 100  # each page is parsed (text pages take milliseconds, scanned ones OCR)


class MultimodalEncoder:
    """Shared by all sessions; thread-safe."""

    def __init__(self, media_dir: Path, recognizer=None, analyzers=(), limits: Limits | None = None,
                 cache_size: int = 512):
        self.media_dir = Path(media_dir)
        self.recognizer = recognizer  # a speech.SpeechRecognizer, or None when voice is off
        self.analyzers = list(analyzers)  # vision.ImageAnalyzer instances
        self.limits = limits or Limits()
        self._cache: OrderedDict[str, tuple[AttachmentKind, list[Observation]]] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._dictated: set[str] = set()  # recordings whose transcript waits in a message box

    def encode(self, text: str, files: list[str | Path] = ()) -> Turn:
        """A user turn for `text` and `files`; raises UserFacingError for input it cannot use."""
        text = (text or "").strip()
        # Checked before any file is opened: refusing must cost nothing.
        if len(text) > self.limits.max_message_chars:
            raise UserFacingError(f"Your message is {len(text):,} characters long; messages can have at most "
                                  f"{self.limits.max_message_chars:,}. Please send a shorter part of it.")
        if len(files) > self.limits.max_files:
            raise UserFacingError(f"You attached {len(files)} files; one message can carry at most "
                                  f"{self.limits.max_files}. Please send them in smaller groups.")
        turn = Turn(role=Role.USER, text=text)
        for file in files:
            attachment, notes = self._encode_file(Path(file), turn.text)
            if turn.text and self._take_dictation(attachment.sha256):
                # Push-to-talk: the message is this recording's transcript as the user left it (maybe
                # corrected): those are the words said, kept once, with the recording.
                notes = [replace(o, text=turn.text) if o.kind is ObservationKind.TRANSCRIPT else o for o in notes]
                turn.text = ""
            turn.attachments.append(attachment)
            turn.observations.extend(notes)
        if not turn.text and not turn.attachments:
            raise UserFacingError("Type a message, attach a photo or record your voice, then send it.")
        return turn

    def models_to_load(self, files: list[str | Path]) -> list[str]:
        """What these files need that is not in memory now ("the speech model"): for a status line, as its
        first use loads it. Files already analysed, or not readable, need nothing."""
        needed: list[str] = []
        for file in files:
            try:
                fmt = media.sniff(file)
                if fmt is None or self._cached(media.sha256_file(Path(file))):
                    continue
            except OSError:
                continue
            if fmt.kind is AttachmentKind.IMAGE and not all(a.loaded for a in self.analyzers):
                needed.append("the image models")
            elif fmt.kind is AttachmentKind.AUDIO and self.recognizer is not None and not self.recognizer.loaded:
                needed.append("the speech model")
        return list(dict.fromkeys(needed))

    # -- one file -------------------------------------------------------------------
    def _encode_file(self, path: Path, question: str) -> tuple[Attachment, list[Observation]]:
        name = path.name
        if not path.is_file():
            raise UserFacingError(f"I couldn't find the uploaded file '{name}'. Please attach it again.")
        size = path.stat().st_size
        if size == 0:
            raise UserFacingError(f"'{name}' is empty (0 bytes). Please attach it again.")
        if size > self.limits.max_file_mb * 2**20:
            raise UserFacingError(f"'{name}' is {size / 2**20:.0f} MB; files can be at most "
                                  f"{self.limits.max_file_mb:.0f} MB.")
        fmt = media.sniff(path)  # the content decides, never the name
        if fmt is None:
            raise UserFacingError(NOT_MEDIA.format(name=name))
        sha = media.sha256_file(path)
        cached = self._cached(sha)
        if cached:
            kind, notes = cached
        else:
            kind = fmt.kind
            read = {AttachmentKind.IMAGE: lambda p: self._describe_image(p, once=True),
                    AttachmentKind.AUDIO: self._transcribe, AttachmentKind.DOCUMENT: self._read_document}[kind]
            notes = read(path)
            self._remember(sha, kind, notes)
        if kind is AttachmentKind.IMAGE and any(a.wants_question for a in self.analyzers):
            notes = notes + self._answers(path, sha, question)
        stored = self._keep_copy(path, sha, fmt)
        attachment = Attachment(kind=kind, path=str(stored), sha256=sha, name=name)
        return attachment, [replace(o, attachment=sha) for o in notes]

    def _answers(self, path: Path, sha: str, question: str) -> list[Observation]:
        """What the question-answering analysers say about this photo and these words (cached per pair)."""
        key = f"{sha}\n{question}"
        cached = self._cached(key)
        if cached:
            return cached[1]
        notes = self._describe_image(path, once=False, question=question)
        self._remember(key, AttachmentKind.IMAGE, notes)
        return notes

    def _describe_image(self, path: Path, *, once: bool, question: str = "") -> list[Observation]:
        """Notes from the analysers that describe a photo `once`, or else from those that answer `question`."""
        from chatbot.perception.images import load_image

        image = load_image(path, max_bytes=int(self.limits.max_image_mb * 2**20),
                           max_pixels=int(self.limits.max_image_megapixels * 1e6))
        notes: list[Observation] = []
        for analyzer in self.analyzers:
            if analyzer.wants_question == once:
                continue
            try:
                notes.extend(analyzer.analyze(image, question))
            except Exception:  # noqa: BLE001 - one failing analyzer must not lose the photo
                log.exception("Image analyzer %s failed on %s", analyzer.name, path.name)
        footprint.give_back()  # the decoded photo and the models' buffers: hundreds of MB, not needed until the next
        return notes

    def _read_document(self, path: Path) -> list[Observation]:
        from chatbot.perception.documents import load_document
        from chatbot.perception.vision.ocr import TextReader

        ocr = next((a for a in self.analyzers if a.name == TextReader.name), None)  # maybe an OnDemandAnalyzer
        doc = load_document(path, max_bytes=int(self.limits.max_file_mb * 2**20),
                            max_pages=self.limits.max_document_pages,
                            max_pixels=int(self.limits.max_image_megapixels * 1e6),
                            read_image=ocr.read_lines if ocr else None)
        if not doc.chars:
            what = "only pictures with no words I could read" if any(p.scanned for p in doc.pages) else "no text"
            raise UserFacingError(f"I couldn't find any text in '{path.name}': it has {what}. "
                                  "Please send a clearer scan or a PDF with text.")
        return [Observation(kind=ObservationKind.FACTS, text=doc.about(), source="pdf"),
                Observation(kind=ObservationKind.DOCUMENT, text=doc.excerpt(), source="pdf")]

    def _transcribe(self, path: Path) -> list[Observation]:
        if self.recognizer is None:
            raise UserFacingError("Voice messages are turned off on this server; please type instead.")
        from chatbot.perception.audio import load_audio

        clip = load_audio(path, max_seconds=self.limits.max_audio_seconds)
        transcript = self.recognizer.transcribe(clip)
        if not transcript.text.strip():
            raise UserFacingError("I couldn't make out any words in that recording. "
                                  "Please try again a little closer to the microphone.")
        return self._transcript_notes(transcript)

    def _transcript_notes(self, transcript) -> list[Observation]:
        from chatbot.perception.speech import SURE_LANGUAGE

        sure = "" if transcript.language_probability >= SURE_LANGUAGE else " (detection unsure)"
        return [Observation(kind=ObservationKind.TRANSCRIPT, text=transcript.text.strip(), source=self.recognizer.name),
                Observation(kind=ObservationKind.LANGUAGE, text=f"spoken language: {transcript.language}{sure}",
                            source=self.recognizer.name)]

    def remember_recording(self, path: str | Path, transcript, dictated: bool = False) -> None:
        """A recording already transcribed elsewhere (call mode, push-to-talk): sending it costs nothing more.

        `transcript` is a `speech.Transcript` for exactly this file. `dictated`: its text was put in
        the message box (push-to-talk); the text the recording is next sent with, maybe corrected,
        then counts as what was said.
        """
        if transcript.text.strip():
            sha = media.sha256_file(Path(path))
            self._remember(sha, AttachmentKind.AUDIO, self._transcript_notes(transcript))
            if dictated:
                with self._lock:
                    self._dictated.add(sha)

    def _take_dictation(self, sha: str) -> bool:
        with self._lock:
            found = sha in self._dictated
            self._dictated.discard(sha)
        return found

    def _keep_copy(self, path: Path, sha: str, fmt: media.MediaFormat) -> Path:
        """Copy the upload into the media folder the app owns (uploads in temp dirs vanish)."""
        target = media.media_path(self.media_dir, sha, fmt)
        if not target.exists():
            media.copy_file(path, target)
        return target

    # -- cache ------------------------------------------------------------------------
    def _cached(self, sha: str):
        with self._lock:
            if sha in self._cache:
                self._cache.move_to_end(sha)
                return self._cache[sha]
        return None

    def _remember(self, sha: str, kind: AttachmentKind, notes: list[Observation]) -> None:
        with self._lock:
            self._cache[sha] = (kind, notes)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

