"""PDF attachments: text read with pypdf, scanned pages by OCR, numbered "Document N", compact in the
prompt, and every hostile or broken PDF refused with a friendly message at a bounded cost."""

from __future__ import annotations

import base64
import zlib
from pathlib import Path

import pytest
from pypdf import PdfWriter

from chatbot.conversation.store import ConversationStore
from chatbot.errors import UserFacingError
from chatbot.perception.documents import EXCERPT_CHARS, load_document
from chatbot.perception.encoder import Limits, MultimodalEncoder
from chatbot.state import AttachmentKind, Conversation, ObservationKind
from chatbot.web.openai_api import ApiError, _messages
from harness.documents import scanned_pdf, text_pdf
from harness.pictures import sign
from tests.support.peak_memory import peak_rss_growth_mb


@pytest.fixture
def encoder(tmp_path):
    return MultimodalEncoder(tmp_path / "media")  # no OCR: scanned pages are left unread


def turn_of(encoder, text, *files):
    conv = Conversation()
    return conv, conv.add_user_turn(encoder.encode(text, list(files)))


# -- PDFs written by hand: bombs, broken files ---------------------------------------------------------
def raw_pdf(path: Path, objects: list[bytes]) -> Path:
    """A PDF made of numbered object bodies (object 1 is the catalog), with a correct xref table."""
    out = bytearray(b"%PDF-1.7\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    path.write_bytes(bytes(out))
    return path


def flate(chunks, extra: bytes = b"") -> bytes:
    z = zlib.compressobj(9)
    data = b"".join(z.compress(c) for c in chunks) + z.flush()
    return b"<< /Length %d /Filter /FlateDecode %s >>\nstream\n" % (len(data), extra) + data + b"\nendstream"


ONE_PAGE = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>"]


def content_bomb(path: Path) -> Path:
    """One page whose 100 KB content stream inflates to 100 MB of spaces."""
    page = (b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R"
            b" /Resources << /Font << /F1 5 0 R >> >> >>")
    font = b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"
    return raw_pdf(path, ONE_PAGE + [page, flate([b"BT /F1 12 Tf (hi) Tj ET"] + [b" " * 10_000_000] * 10), font])


def image_bomb(path: Path) -> Path:
    """A 'scanned' page whose 200 KB picture inflates to 15000 x 15000 grey pixels (225 MB)."""
    page = (b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /XObject << /Im1 5 0 R >> >>"
            b" /Contents 4 0 R >>")
    picture = flate([b"\xff" * 25_000_000] * 9, b"/Type /XObject /Subtype /Image /Width 15000 /Height 15000 "
                                                 b"/ColorSpace /DeviceGray /BitsPerComponent 8")
    return raw_pdf(path, ONE_PAGE + [page, flate([b"q 612 0 0 792 0 0 cm /Im1 Do Q"]), picture])


def page_tree_bomb(path: Path, declared: int) -> Path:
    """A 4 KB page tree 40 levels deep, each node naming its child twice: 2**40 pages."""
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>"]
    for level in range(40):
        child = len(objects) + 2
        count = declared if level == 0 else 2 ** (40 - level)
        objects.append(b"<< /Type /Pages /Kids [%d 0 R %d 0 R] /Count %d >>" % (child, child, count))
    objects.append(b"<< /Type /Page /MediaBox [0 0 612 792] >>")
    return raw_pdf(path, objects)


def encrypted(path: Path, source: Path, user_password: str, algorithm: str) -> Path:
    writer = PdfWriter(clone_from=str(source))
    writer.encrypt(user_password=user_password, owner_password="owner-secret", algorithm=algorithm)
    writer.write(str(path))
    return path


# -- reading and numbering -------------------------------------------------------------------------
def test_a_text_pdf_becomes_document_1_with_its_text_in_the_prompt(encoder, tmp_path):
    pdf = text_pdf(tmp_path / "report.pdf", ["Quarterly report", "The code word is MARMALADE."], ["Budget: 4,210 EUR"],
                   title="Q3 report")
    conv, turn = turn_of(encoder, "What is the code word?", pdf)
    [doc] = turn.attachments
    assert doc.kind is AttachmentKind.DOCUMENT and doc.label == "Document 1" and Path(doc.path).suffix == ".pdf"
    prompt = turn.model_text()
    assert "Document 1, the user's first document" in prompt and 'a PDF of 2 pages titled "Q3 report"' in prompt
    assert "[page 1] Quarterly report\nThe code word is MARMALADE.\n[page 2] Budget: 4,210 EUR" in prompt
    assert prompt.endswith("What is the code word?")
    assert conv.title == "What is the code word?"


def test_documents_are_numbered_apart_from_photos_and_named_by_content_not_file_name(encoder, tmp_path):
    first = text_pdf(tmp_path / "a.pdf", ["Alpha memo"])
    disguised = tmp_path / "holiday.jpg"  # a PDF under a photo's name: the content decides
    disguised.write_bytes(text_pdf(tmp_path / "b.pdf", ["Bravo memo"]).read_bytes())
    photo = sign(tmp_path / "sign.png", "EXIT")
    conv, turn = turn_of(encoder, "three files", first, photo, disguised)
    assert [(a.kind, a.label) for a in turn.attachments] == [
        (AttachmentKind.DOCUMENT, "Document 1"), (AttachmentKind.IMAGE, "Photo 1"), (AttachmentKind.DOCUMENT, "Document 2")]
    later = conv.add_user_turn(encoder.encode("", [text_pdf(tmp_path / "c.pdf", ["Charlie memo"])]))
    assert later.attachments[0].label == "Document 3"


def test_the_tracked_state_lists_documents_by_label_and_finds_them_by_content(encoder, tmp_path):
    conv, _ = turn_of(encoder, "", text_pdf(tmp_path / "a.pdf", ["Invoice for the PELICAN project, total 58 EUR"]))
    conv.add_assistant_turn("Got it.")
    conv.add_user_turn(encoder.encode("Hello again", []))
    [item] = conv.tracked(conv.turns[:-1]).items
    assert item.label == "Document 1" and "first document" in item.names and "PELICAN" in item.note
    for asked in ("What did Document 1 say?", "what was in my first document", "how much was the pelican invoice?"):
        block = conv.tracked(conv.turns[:-1]).render(asked, [], len, 2000)
        assert "Photos, recordings and documents the user sent" in block and "PELICAN" in block


def test_a_long_document_keeps_its_beginning_and_says_what_was_left_out(encoder, tmp_path):
    pages = [[f"Page {p} line {i}: the quick brown fox jumps over the lazy dog." for i in range(40)] for p in range(1, 31)]
    pages[0][0] = "START-OF-DOCUMENT"
    pages[-1][-1] = "END-OF-DOCUMENT"
    conv, turn = turn_of(encoder, "Summarise it", text_pdf(tmp_path / "long.pdf", *pages))
    [text] = [o.text for o in turn.observations if o.kind is ObservationKind.DOCUMENT]
    assert text.startswith("[page 1] START-OF-DOCUMENT") and "END-OF-DOCUMENT" not in text
    assert len(text) < EXCERPT_CHARS + 100
    assert "[… left out: pages 2–30, " in text and "more characters …]" in text
    total = sum(len("\n".join(page)) for page in pages)
    left = int(text.rsplit("pages 2–30, ", 1)[1].split(" more")[0].replace(",", ""))
    assert total - EXCERPT_CHARS <= left <= total  # the count is what really was left out
    # Rendered within a small budget, the whole conversation fits it.
    count = lambda s: len(s) // 3  # noqa: E731
    for budget in (1024, 2048):
        assert sum(count(m.content) + 6 for m in conv.render(count, budget)) <= budget


def test_a_dropped_document_is_condensed_briefly(encoder, tmp_path):
    pages = [[f"Line {i} of the MARMALADE plan, with enough words to make it long." for i in range(40)]]
    conv, _ = turn_of(encoder, "here", text_pdf(tmp_path / "plan.pdf", *pages))
    for i in range(30):
        conv.add_assistant_turn(f"Reply {i} " + "words " * 40)
        conv.add_user_turn(encoder.encode(f"Message {i} " + "more " * 40, []))
    count = lambda s: len(s) // 3  # noqa: E731
    system = conv.render(count, 1024, notes=False)[0].content
    assert "Earlier in this conversation (condensed):" in system and "Document 1" in system
    assert "MARMALADE" in system and len(system) < len(conv.system_prompt) + 1200


def test_a_scanned_page_without_ocr_is_said_to_be_unread(encoder, tmp_path):
    text = text_pdf(tmp_path / "t.pdf", ["Cover letter"])
    scan = scanned_pdf(tmp_path / "s.pdf", "Hidden words")
    writer = PdfWriter(clone_from=str(text))
    writer.append(str(scan))
    writer.write(str(tmp_path / "mixed.pdf"))
    _, turn = turn_of(encoder, "", tmp_path / "mixed.pdf")
    assert "Cover letter" in turn.model_text() and "scanned page 2 not read" in turn.model_text()


def test_documents_survive_storage_export_and_import(encoder, tmp_path):
    store = ConversationStore(tmp_path / "data")
    encoder = MultimodalEncoder(store.media_dir)
    conv, _ = turn_of(encoder, "keep this", text_pdf(tmp_path / "a.pdf", ["The code word is HALIBUT."]))
    store.save("key:ana", conv)
    assert store.load("key:ana", conv.id) == conv
    exported = store.export_json("key:ana", conv.id)
    copy = store.import_json("key:ben", exported)
    [doc] = copy.attachments()
    assert doc.kind is AttachmentKind.DOCUMENT and "HALIBUT" in copy.turns[0].model_text()


def test_the_openai_api_takes_a_pdf_as_a_file_part(tmp_path):
    pdf = text_pdf(tmp_path / "a.pdf", ["The code word is HALIBUT."])
    data = "data:application/pdf;base64," + base64.b64encode(pdf.read_bytes()).decode()
    body = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "code word?"}, {"type": "file", "file": {"filename": "a.pdf", "file_data": data}}]}]}
    [message] = _messages(body, tmp_path)
    assert message.files[0].read_bytes() == pdf.read_bytes()
    for bad in ({"file_id": "file-123"}, {"file_data": "data:text/html;base64,PGI+"}):
        body["messages"][0]["content"][1]["file"] = bad
        with pytest.raises(ApiError, match="PDFs sent inline"):
            _messages(body, tmp_path)


# -- bad input: friendly messages, nothing read beyond the limits ---------------------------------------
def refused(encoder, path) -> str:
    with pytest.raises(UserFacingError) as error:
        encoder.encode("what is in it?", [path])
    return str(error.value)


def test_a_pdf_with_too_many_pages_is_refused(tmp_path):
    encoder = MultimodalEncoder(tmp_path / "media", limits=Limits(max_document_pages=5))
    six = text_pdf(tmp_path / "six.pdf", *[[f"page {i}"] for i in range(6)])
    assert "'six.pdf' has 6 pages; documents can have at most 5" in refused(encoder, six)
    assert turn_of(encoder, "", text_pdf(tmp_path / "five.pdf", *[[f"page {i}"] for i in range(5)]))


def test_a_too_large_pdf_is_refused_and_a_smaller_one_still_read(tmp_path):
    encoder = MultimodalEncoder(tmp_path / "media", limits=Limits(max_file_mb=0.05))
    big = text_pdf(tmp_path / "big.pdf", *[[f"Line {i} " + "x" * 80 for i in range(40)] for _ in range(20)])
    assert big.stat().st_size > 0.05 * 2**20
    assert "'big.pdf' is" in refused(encoder, big) and "files can be at most" in refused(encoder, big)
    _, turn = turn_of(encoder, "", text_pdf(tmp_path / "small.pdf", ["tiny"]))
    assert turn.attachments[0].label == "Document 1"


@pytest.mark.parametrize("make, expected", [
    (lambda tmp: page_tree_bomb(tmp / "pages.pdf", 2**40), "has 1,099,511,627,776 pages; documents can have at most 100"),
    (lambda tmp: page_tree_bomb(tmp / "pages.pdf", 1), "won't unpack it"),  # the count lies: the walk is capped
    (lambda tmp: content_bomb(tmp / "pages.pdf"), "won't unpack it"),
], ids=["page-count", "lying-page-count", "content-stream"])
def test_pdf_bombs_are_refused(encoder, tmp_path, make, expected):
    assert expected in refused(encoder, make(tmp_path))


def test_a_picture_bomb_on_a_scanned_page_is_refused_before_it_is_decoded(tmp_path):
    # Pictures are decoded only for OCR: a reader that finds no words stands in for the OCR model here.
    with pytest.raises(UserFacingError, match="won't unpack it"):
        load_document(image_bomb(tmp_path / "scan.pdf"), max_bytes=2**30, max_pages=100, max_pixels=40_000_000,
                      read_image=lambda image: [])


def test_pdf_bombs_cost_little_memory(tmp_path):
    bombs = [page_tree_bomb(tmp_path / "a.pdf", 1), content_bomb(tmp_path / "b.pdf"), image_bomb(tmp_path / "c.pdf")]
    loader = """
        from chatbot.perception.documents import load_document

        def load(path):  # as the encoder with OCR would, minus the OCR model (pictures are decoded)
            return load_document(path, max_bytes=2**30, max_pages=100, max_pixels=40_000_000,
                                 read_image=lambda image: [])
    """
    growth = peak_rss_growth_mb(loader, text_pdf(tmp_path / "normal.pdf", ["A normal page"]), bombs, timeout=120)
    # Inflated whole they would take 100-225 MB more (the page tree: ever more); pypdf's own default limits
    # (75 MB a stream) stop them later than ours (20 MB).
    assert all(mb < 60 for mb in growth.values()), growth


def test_password_protected_pdfs_are_refused_but_restricted_ones_are_read(encoder, tmp_path):
    plain = text_pdf(tmp_path / "plain.pdf", ["The code word is MARMALADE."])
    for algorithm in ("RC4-128", "AES-256"):
        locked = encrypted(tmp_path / f"locked-{algorithm}.pdf", plain, "secret", algorithm)
        assert "is protected with a password" in refused(encoder, locked)
        # Only an owner password (copy/print restrictions): anyone may open it, and so do we.
        restricted = encrypted(tmp_path / f"restricted-{algorithm}.pdf", plain, "", algorithm)
        assert "MARMALADE" in turn_of(encoder, "", restricted)[1].model_text()


@pytest.mark.parametrize("content", [
    lambda good: good[: len(good) // 2],  # truncated upload
    lambda good: b"%PDF-1.4\n" + bytes(range(256)) * 20,  # garbage after a PDF header
    lambda good: b"%PDF-1.7\n%%EOF\n",  # a header and nothing else
], ids=["truncated", "garbage", "empty"])
def test_broken_pdfs_get_a_friendly_message(encoder, tmp_path, content):
    good = text_pdf(tmp_path / "good.pdf", *[["The code word is MARMALADE."] * 30] * 3).read_bytes()
    broken = tmp_path / "contract.pdf"
    broken.write_bytes(content(good))
    assert "'contract.pdf' seems to be damaged or incomplete" in refused(encoder, broken)


@pytest.mark.parametrize("content", [b"<html><script>alert(1)</script></html>", b"PK\x03\x04" + bytes(200),
                                     b"just some text pretending\n"])
def test_other_files_named_pdf_are_refused_by_content(encoder, tmp_path, content):
    fake = tmp_path / "invoice.pdf"
    fake.write_bytes(content)
    message = refused(encoder, fake)
    assert "'invoice.pdf' is not an image, recording or PDF I can read" in message and "a PDF document" in message
    assert not (tmp_path / "media").exists()


def test_a_pdf_without_any_text_is_refused(encoder, tmp_path):
    blank = tmp_path / "blank.pdf"
    writer = PdfWriter()
    writer.add_blank_page(612, 792)
    writer.write(str(blank))
    assert "I couldn't find any text in 'blank.pdf': it has no text" in refused(encoder, blank)
    scan = scanned_pdf(tmp_path / "scan.pdf", "Words")  # no OCR in this encoder
    assert "only pictures with no words I could read" in refused(encoder, scan)


# -- scanned pages through the bundled OCR -----------------------------------------------------------
@pytest.mark.slow
def test_a_scanned_pdf_is_read_by_the_bundled_ocr(tmp_path):
    from chatbot.perception.vision import TextReader

    encoder = MultimodalEncoder(tmp_path / "media", analyzers=[TextReader()])
    scan = scanned_pdf(tmp_path / "scan.pdf", "Invoice number 7314", "The code word is PELICAN")
    _, turn = turn_of(encoder, "What is the code word?", scan)
    prompt = turn.model_text()
    assert "page 1 scanned (text read by OCR)" in prompt
    assert "Invoice number 7314" in prompt and "The code word is PELICAN" in prompt
