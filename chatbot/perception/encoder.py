"""The multimodal encoder: turns what a user sent (text + files) into a user `Turn`.

Photos go through the vision analyzers, recordings through the speech
recogniser; what they yield is kept as `Observation`s on the turn. Each file
is analysed once: results are cached by content hash, so the same photo sent
again (or a conversation re-encoded) costs nothing.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image

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

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
AUDIO_SUFFIXES = {".wav", ".mp3", ".ogg", ".oga", ".opus", ".webm", ".m4a", ".aac", ".mp4", ".flac"}


@dataclass
class Limits:
    max_file_mb: float = 50.0
    max_image_mb: float = 20.0
    max_image_megapixels: float = 40.0
    max_audio_seconds: float = 300.0


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

    def encode(self, text: str, files: list[str | Path] = ()) -> Turn:
        """A user turn for `text` and `files`; raises UserFacingError for input it cannot use."""
        turn = Turn(role=Role.USER, text=(text or "").strip())
        for file in files:
            attachment, notes = self._encode_file(Path(file))
            turn.attachments.append(attachment)
            turn.observations.extend(notes)
        if not turn.text and not turn.attachments:
            raise UserFacingError("Type a message, attach a photo or record your voice, then send it.")
        return turn

    # -- one file -------------------------------------------------------------------
    def _encode_file(self, path: Path) -> tuple[Attachment, list[Observation]]:
        name = path.name
        if not path.is_file():
            raise UserFacingError(f"I couldn't find the uploaded file '{name}'. Please attach it again.")
        size = path.stat().st_size
        if size == 0:
            raise UserFacingError(f"'{name}' is empty (0 bytes). Please attach it again.")
        if size > self.limits.max_file_mb * 2**20:
            raise UserFacingError(f"'{name}' is {size / 2**20:.0f} MB; files can be at most "
                                  f"{self.limits.max_file_mb:.0f} MB.")
        sha = file_sha256(path)
        cached = self._cached(sha)
        if cached:
            kind, notes = cached
        else:
            kind = self._kind_of(path)
            notes = self._describe_image(path) if kind is AttachmentKind.IMAGE else self._transcribe(path)
            self._remember(sha, kind, notes)
        stored = self._keep_copy(path, sha)
        attachment = Attachment(kind=kind, path=str(stored), sha256=sha, name=name)
        return attachment, [replace(o, attachment=sha) for o in notes]

    @staticmethod
    def _kind_of(path: Path) -> AttachmentKind:
        """Trust the content over the name: a photo renamed .mp3 is still a photo."""
        try:
            with Image.open(path):
                return AttachmentKind.IMAGE
        except Exception:  # noqa: BLE001 - not something Pillow can identify
            pass
        if path.suffix.lower() in IMAGE_SUFFIXES:
            return AttachmentKind.IMAGE  # the image loader explains what is wrong with it
        if path.suffix.lower() in AUDIO_SUFFIXES:
            return AttachmentKind.AUDIO
        # Unknown name: let the audio decoder sniff it; it says clearly if it is not audio either.
        return AttachmentKind.AUDIO

    def _describe_image(self, path: Path) -> list[Observation]:
        from chatbot.perception.images import load_image

        image = load_image(path, max_bytes=int(self.limits.max_image_mb * 2**20),
                           max_pixels=int(self.limits.max_image_megapixels * 1e6))
        notes: list[Observation] = []
        for analyzer in self.analyzers:
            try:
                notes.extend(analyzer.analyze(image))
            except Exception:  # noqa: BLE001 - one failing analyzer must not lose the photo
                log.exception("Image analyzer %s failed on %s", analyzer.name, path.name)
        return notes

    def _transcribe(self, path: Path) -> list[Observation]:
        if self.recognizer is None:
            raise UserFacingError("Voice messages are turned off on this server; please type instead.")
        from chatbot.perception.audio import load_audio

        clip = load_audio(path, max_seconds=self.limits.max_audio_seconds)
        transcript = self.recognizer.transcribe(clip)
        if not transcript.text.strip():
            raise UserFacingError("I couldn't make out any words in that recording. "
                                  "Please try again a little closer to the microphone.")
        return [Observation(kind=ObservationKind.TRANSCRIPT, text=transcript.text.strip(), source=self.recognizer.name),
                Observation(kind=ObservationKind.LANGUAGE, text=f"spoken language: {transcript.language}",
                            source=self.recognizer.name)]

    def _keep_copy(self, path: Path, sha: str) -> Path:
        """Copy the upload into the media folder the app owns (uploads in temp dirs vanish)."""
        target = self.media_dir / sha[:2] / f"{sha}{path.suffix.lower()}"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".partial")
            shutil.copyfile(path, tmp)
            tmp.replace(target)
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


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
