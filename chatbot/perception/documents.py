"""Reading a PDF the user attached: its text layer with pypdf, scanned pages with the bundled OCR.

Everything a user can get wrong (a password, a damaged or truncated file, a renamed
non-PDF, hundreds of pages, a "PDF bomb" whose streams inflate to gigabytes) becomes a
`UserFacingError` they can act on. The work is bounded before it starts: the page count
is read from the page tree (whose walk pypdf caps), and pypdf's own limits cap every
stream it inflates, every image it decodes and the parsing of each page's content.

The model reads a compact excerpt, not the whole text: the beginning of the document and
a line saying what was left out (see `Document.excerpt`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from chatbot.errors import UserFacingError

log = logging.getLogger(__name__)

# What the model reads of a document, in characters (≈ 400 tokens of the ≈ 2,000 of a prompt).
EXCERPT_CHARS = 1500
# Streams of a real page inflate to well under this; a bomb's are refused at this size.
_MAX_STREAM_BYTES = 20_000_000
DAMAGED = ("'{name}' seems to be damaged or incomplete, so I can't read it. "
           "Could you save it again (or print it to a new PDF) and send that?")
PROTECTED = ("'{name}' is protected with a password, so I can't read it. "
             "Please send a copy without the password (open it and save or print it to a new PDF).")


@dataclass(frozen=True)
class Page:
    number: int  # from 1
    text: str
    scanned: bool = False  # the page holds no text layer: its text (if any) was read by OCR from its images
    read: bool = True  # False: a scanned page left unread because the excerpt was already full


@dataclass(frozen=True)
class Document:
    pages: list[Page]
    title: str = ""
    scanned_unread: list[int] = field(default_factory=list)

    @property
    def chars(self) -> int:
        return sum(len(p.text) for p in self.pages)

    def about(self) -> str:
        """One line of facts: size, title, which pages were scanned."""
        count = len(self.pages)
        parts = [f"a PDF of {count} page{'s' if count != 1 else ''}"]
        if self.title:
            parts[0] += f' titled "{self.title}"'
        parts.append(f"{self.chars:,} characters of text")
        scanned = [p.number for p in self.pages if p.scanned and p.read]
        if scanned:
            parts.append(f"{_pages(scanned)} scanned (text read by OCR)")
        return "; ".join(parts)

    def excerpt(self, limit: int = EXCERPT_CHARS) -> str:
        """The text from the beginning, at most `limit` characters cut at a word, and what was left out."""
        marked = len(self.pages) > 1
        text = "\n".join(f"[page {p.number}] {p.text}" if marked else p.text for p in self.pages if p.text)
        if len(text) <= limit and not self.scanned_unread:
            return text
        kept = text[:limit]
        if len(text) > limit:
            kept = kept[: kept.rfind(" ")] if " " in kept[limit // 2:] else kept
        shown = {int(n) for n in re.findall(r"\[page (\d+)\]", kept)} or {1}
        left = [p.number for p in self.pages if p.number > max(shown)]
        missing = max(0, self.chars - len(re.sub(r"\[page \d+\] ", "", kept)))
        out = [f"{missing:,} more characters"] if missing else []
        if left:
            out.insert(0, _pages(left))
        if self.scanned_unread:
            out.append(f"scanned {_pages(self.scanned_unread)} not read")
        return f"{kept.rstrip()}\n[… left out: {', '.join(out)} …]"


def _pages(numbers: list[int]) -> str:
    """[3] -> "page 3"; [3, 4, 5] -> "pages 3–5"; [2, 5] -> "pages 2, 5"."""
    if len(numbers) == 1:
        return f"page {numbers[0]}"
    if numbers == list(range(numbers[0], numbers[-1] + 1)):
        return f"pages {numbers[0]}–{numbers[-1]}"
    return "pages " + ", ".join(map(str, numbers))


def load_document(path: str | Path, *, max_bytes: int, max_pages: int, max_pixels: int,
                  read_image: Callable[[object], list[str]] | None = None) -> Document:
    """Read a PDF; `read_image` (OCR: a `LoadedImage` -> lines) reads scanned pages, if given.

    Raises `UserFacingError` for anything unusable.
    """
    import pypdf
    from pypdf.errors import DependencyError, FileNotDecryptedError, LimitReachedError, PyPdfError

    path = Path(path)
    name = path.name
    size = path.stat().st_size
    if size > max_bytes:
        raise UserFacingError(f"'{name}' is {size / 2**20:.0f} MB; documents can be at most "
                              f"{max_bytes / 2**20:.0f} MB.")
    limits = dict(
        # Decompression bombs: no stream, image or accumulated decoding work beyond these.
        zlib_maximum_output_length=_MAX_STREAM_BYTES, lzw_maximum_output_length=_MAX_STREAM_BYTES,
        run_length_maximum_output_length=_MAX_STREAM_BYTES, jbig2_maximum_output_length=_MAX_STREAM_BYTES,
        brotli_maximum_output_length=_MAX_STREAM_BYTES, array_based_stream_maximum_output_length=_MAX_STREAM_BYTES,
        stream_decoding_work_maximum_length=4 * _MAX_STREAM_BYTES,
        image_maximum_buffer_size=max(3 * max_pixels, 1), xform_maximum_invocations_per_extraction=500,
        # A page tree with millions of entries is refused while it is walked, not after.
        page_tree_maximum_entries=max_pages + 1000, page_tree_maximum_page_entries=100 * (max_pages + 1000),
        jbig2dec_binary=None,  # never run an outside program on an upload
    )
    try:
        with pypdf.apply_configuration(**limits):
            reader = pypdf.PdfReader(path)
            if reader.is_encrypted:
                _decrypt(reader, name)
            # The count the page tree declares, before the tree is walked; a lying count is caught by the walk's cap.
            declared = reader.trailer["/Root"]["/Pages"].get("/Count", 0)
            count = max(int(declared) if isinstance(declared, int) else 0, 0)
            if count <= max_pages:
                count = len(reader.pages)
            if count > max_pages:
                raise UserFacingError(_too_many_pages(name, count, max_pages))
            if count == 0:
                raise UserFacingError(DAMAGED.format(name=name))
            return _read(reader, read_image, max_pixels)
    except UserFacingError:
        raise
    except (FileNotDecryptedError, DependencyError):
        raise UserFacingError(PROTECTED.format(name=name)) from None
    except LimitReachedError:
        raise UserFacingError(f"'{name}' holds far more (or far more tightly packed) data than a document of at most "
                              f"{max_pages:,} pages should, so I won't unpack it. Please send a simpler PDF.") from None
    except (PyPdfError, OSError, ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError):
        log.info("Unreadable PDF %s", name, exc_info=True)
        raise UserFacingError(DAMAGED.format(name=name)) from None
    except Exception:  # noqa: BLE001 - pypdf raises all sorts on malformed files
        log.warning("Unexpected error reading a PDF", exc_info=True)
        raise UserFacingError(DAMAGED.format(name=name)) from None


def _too_many_pages(name: str, count: int, max_pages: int) -> str:
    return (f"'{name}' has {count:,} pages; documents can have at most {max_pages:,}. "
            "Please send the part you need as a smaller PDF.")


def _decrypt(reader, name: str) -> None:
    """Open a PDF encrypted with an empty user password (only copying/printing restricted); refuse the rest."""
    from pypdf import PasswordType

    if reader.decrypt("") == PasswordType.NOT_DECRYPTED:
        raise UserFacingError(PROTECTED.format(name=name))


def _read(reader, read_image, max_pixels: int) -> Document:
    pages: list[Page] = []
    unread: list[int] = []
    chars = 0
    for number, page in enumerate(reader.pages, start=1):
        text = _tidy(page.extract_text() or "")
        scanned = not text and _has_images(page)
        if scanned and read_image is not None and chars < EXCERPT_CHARS:
            text = _tidy("\n".join(_ocr(page, read_image, max_pixels)))
        elif scanned:
            unread.append(number)
        chars += len(text)
        pages.append(Page(number, text, scanned, read=number not in unread))
    title = _tidy(str((reader.metadata or {}).get("/Title") or ""))[:120]
    return Document(pages, title, unread)


def _has_images(page) -> bool:
    try:
        return bool(page.images)
    except Exception:  # noqa: BLE001 - a broken image list means: nothing to read
        return False


def _ocr(page, read_image, max_pixels: int) -> list[str]:
    """The lines OCR reads in each picture on a scanned page, pictures in the page's order."""
    from chatbot.perception.images import LoadedImage, to_rgb

    lines: list[str] = []
    for picture in page.images:
        image = picture.image
        if image is None or image.width * image.height > max_pixels:
            continue
        rgb = to_rgb(image)
        lines += read_image(LoadedImage(image=rgb, format="PDF", width=rgb.width, height=rgb.height))
    return lines


def _tidy(text: str) -> str:
    """Runs of spaces and blank lines squeezed: they cost tokens and say nothing."""
    lines = (" ".join(line.split()) for line in text.replace("\x00", "").splitlines())
    return "\n".join(line for line in lines if line)
