"""PDF documents with known content, written on the spot (no files to ship)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from pypdf import PdfWriter
from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject

from harness.pictures import FONT


def text_pdf(path: Path, *pages: list[str] | str, title: str = "") -> Path:
    """A PDF with a text layer: one page per argument, each a list of lines (Helvetica, 12 pt)."""
    writer = PdfWriter()
    font = writer._add_object(DictionaryObject({  # noqa: SLF001 - pypdf's way to add a shared object
        NameObject("/Type"): NameObject("/Font"), NameObject("/Subtype"): NameObject("/Type1"),
        NameObject("/BaseFont"): NameObject("/Helvetica"), NameObject("/Encoding"): NameObject("/WinAnsiEncoding")}))
    for lines in pages:
        lines = [lines] if isinstance(lines, str) else lines
        page = writer.add_blank_page(612, 792)
        page[NameObject("/Resources")] = DictionaryObject(
            {NameObject("/Font"): DictionaryObject({NameObject("/F1"): font})})
        shown = "".join(f"({_escaped(line)}) Tj T* " for line in lines)
        stream = DecodedStreamObject()
        stream.set_data(f"BT /F1 12 Tf 16 TL 72 720 Td {shown}ET".encode("cp1252"))
        page[NameObject("/Contents")] = writer._add_object(stream)  # noqa: SLF001
    if title:
        writer.add_metadata({"/Title": title})
    with open(path, "wb") as out:
        writer.write(out)
    return path


def _escaped(line: str) -> str:
    return line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def scanned_pdf(path: Path, *lines: str, dpi: int = 150) -> Path:
    """A 'scanned' page: a PDF holding only a picture of printed text, no text layer (Pillow's PDF writer)."""
    width, height = int(8.27 * dpi), int(11.69 * dpi)  # A4
    page = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(page)
    size = dpi * 24 // 72  # 24 pt
    try:
        font = ImageFont.truetype(FONT, size)
    except OSError:
        font = ImageFont.load_default(size=size)
    for i, line in enumerate(lines):
        draw.text((dpi, dpi + i * size * 2), line, font=font, fill=0)
    page.save(path, "PDF", resolution=dpi)
    return path
