"""Files the app keeps: content hashes, content-addressed names, durable writes, format sniffing.

The one place for these jobs (the encoder's uploads, imported attachments, the
browser secret and the joined model weights all use it). A file is named by the
SHA-256 of its bytes and an extension derived from its *detected* format, never
from a name someone sent: `media/ab/<sha>.<ext>`. Writes go to a unique
temporary name, are fsync'd, renamed into place and the folder fsync'd, so a
crash leaves either the whole file or none, and concurrent writers never share
a temporary file.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from chatbot.state import AttachmentKind

_CHUNK = 8 << 20
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class MediaFormat:
    """An accepted attachment format, as detected from the first bytes of a file."""

    kind: AttachmentKind
    ext: str  # the extension files of this format are stored under
    mime: str  # what the browser is told it is
    demuxer: str = ""  # the FFmpeg demuxer for audio (only these ever run on uploads)


_JPEG = MediaFormat(AttachmentKind.IMAGE, "jpg", "image/jpeg")
_PNG = MediaFormat(AttachmentKind.IMAGE, "png", "image/png")
_GIF = MediaFormat(AttachmentKind.IMAGE, "gif", "image/gif")
_WEBP = MediaFormat(AttachmentKind.IMAGE, "webp", "image/webp")
_BMP = MediaFormat(AttachmentKind.IMAGE, "bmp", "image/bmp")
_TIFF = MediaFormat(AttachmentKind.IMAGE, "tif", "image/tiff")
_WAV = MediaFormat(AttachmentKind.AUDIO, "wav", "audio/wav", "wav")
_OGG = MediaFormat(AttachmentKind.AUDIO, "ogg", "audio/ogg", "ogg")
_WEBM = MediaFormat(AttachmentKind.AUDIO, "webm", "audio/webm", "matroska")
_M4A = MediaFormat(AttachmentKind.AUDIO, "m4a", "audio/mp4", "mov")
_FLAC = MediaFormat(AttachmentKind.AUDIO, "flac", "audio/flac", "flac")
_AAC = MediaFormat(AttachmentKind.AUDIO, "aac", "audio/aac", "aac")
_MP3 = MediaFormat(AttachmentKind.AUDIO, "mp3", "audio/mpeg", "mp3")
_PDF = MediaFormat(AttachmentKind.DOCUMENT, "pdf", "application/pdf")
FORMATS = (_JPEG, _PNG, _GIF, _WEBP, _BMP, _TIFF, _WAV, _OGG, _WEBM, _M4A, _FLAC, _AAC, _MP3, _PDF)
ACCEPTED_EXTENSIONS = frozenset(f.ext for f in FORMATS)


# -- hashing ---------------------------------------------------------------------------
def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def media_path(media_dir: Path, sha256: str, fmt: MediaFormat) -> Path:
    """Where a file with this hash and detected format lives: `<media_dir>/ab/<sha>.<ext>`."""
    if not SHA256_PATTERN.fullmatch(sha256):
        raise ValueError("not a SHA-256 hex digest")
    return Path(media_dir) / sha256[:2] / f"{sha256}.{fmt.ext}"


# -- sniffing --------------------------------------------------------------------------
def sniff(path: str | Path) -> MediaFormat | None:
    """The accepted format of the file's content, or None (whatever its name says)."""
    with open(path, "rb") as f:
        head = f.read(16)
        skip = _id3_size(head)
        if skip is None:
            return sniff_bytes(head)
        f.seek(skip)
        return _sniff_audio(f.read(12))


def sniff_bytes(data: bytes) -> MediaFormat | None:
    """Like `sniff`, for content already in memory."""
    skip = _id3_size(data)
    if skip is not None:
        return _sniff_audio(data[skip:skip + 12])
    if data[:3] == b"\xff\xd8\xff":
        return _JPEG
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return _PNG
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return _GIF
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _WEBP
    if data[:2] == b"BM" and len(data) >= 14:
        return _BMP
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return _TIFF
    if data[:5] == b"%PDF-":
        return _PDF
    return _sniff_audio(data[:12])


def _id3_size(head: bytes) -> int | None:
    """Where the audio starts after an ID3v2 tag (MP3, sometimes AAC/FLAC); None without one."""
    if head[:3] != b"ID3" or len(head) < 10:
        return None
    size = (head[6] & 0x7F) << 21 | (head[7] & 0x7F) << 14 | (head[8] & 0x7F) << 7 | (head[9] & 0x7F)
    return 10 + size + (10 if head[5] & 0x10 else 0)


def _sniff_audio(head: bytes) -> MediaFormat | None:
    if head[:4] in (b"RIFF", b"RF64") and head[8:12] == b"WAVE":
        return _WAV
    if head[:4] == b"OggS":
        return _OGG
    if head[:4] == b"\x1a\x45\xdf\xa3":  # EBML: WebM / Matroska
        return _WEBM
    if head[4:8] == b"ftyp":  # ISO media: M4A / MP4
        return _M4A
    if head[:4] == b"fLaC":
        return _FLAC
    if len(head) >= 3 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:  # MPEG audio frame sync
        # The sync is only 11 bits, so check the header fields too before trusting it.
        version, layer = (head[1] >> 3) & 0b11, (head[1] >> 1) & 0b11
        if head[1] & 0xF6 == 0xF0 and (head[2] >> 2) & 0xF < 13:  # ADTS (raw AAC): layer 0, known rate
            return _AAC
        if layer == 0b01 and version != 0b01 and head[2] >> 4 != 0xF and (head[2] >> 2) & 0b11 != 0b11:
            return _MP3  # Layer III, valid version, bitrate and sample rate
    return None


# -- durable writes --------------------------------------------------------------------
@contextmanager
def atomic_writer(target: str | Path, *, mode: int = 0o600, exclusive: bool = False) -> Iterator[BinaryIO]:
    """Write `target` all or nothing: a unique temporary file, fsync'd, renamed, folder fsync'd.

    `exclusive`: never replace an existing `target` (raises FileExistsError; the
    first writer wins, as for a secret created once).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        if exclusive:
            os.link(tmp, target)  # fails if it exists, unlike rename
        else:
            os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(target.parent)


def write_bytes(target: str | Path, data: bytes, *, mode: int = 0o600, exclusive: bool = False) -> Path:
    with atomic_writer(target, mode=mode, exclusive=exclusive) as out:
        out.write(data)
    return Path(target)


def copy_file(source: str | Path, target: str | Path, *, mode: int = 0o600) -> Path:
    with open(source, "rb") as src, atomic_writer(target, mode=mode) as out:
        shutil.copyfileobj(src, out, _CHUNK)
    return Path(target)


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable: the new directory entry is on disk only once the folder is synced."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def private_dir(folder: str | Path, *, clean: bool = False) -> Path:
    """A folder only this user can enter (0700), optionally emptied first (a temp dir from a past run)."""
    folder = Path(folder)
    if clean:
        shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    return folder
