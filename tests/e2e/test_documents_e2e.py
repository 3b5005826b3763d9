"""PDF documents end to end on the real app: a text PDF and a scanned PDF (read by the bundled OCR) are
answered by the bundled model, through the API and in Chromium at a phone and a laptop size
(screenshots in test-artifacts/), and a broken PDF costs the conversation nothing."""

import base64
import os
from pathlib import Path

import openai
import pytest
from gradio_client import Client
from playwright.sync_api import expect

from harness.documents import scanned_pdf, text_pdf
from tests.support.drivers import api_send, browser_send, text_of

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("CHATBOT_TEST_ARTIFACTS", ROOT / "test-artifacts"))
SIZES = {"phone": (390, 844), "laptop": (1366, 900)}


@pytest.fixture
def client(app_server):
    return Client(app_server.url, verbose=False)


def memo(tmp_path: Path) -> Path:
    return text_pdf(tmp_path / "memo.pdf", ["Internal memo", "The secret code word is MARMALADE.",
                                            "Please keep it private."], ["Page two: the office opens at nine."])


def scan(tmp_path: Path) -> Path:
    return scanned_pdf(tmp_path / "scan.pdf", "Delivery note", "The code word is PELICAN.")


def test_a_text_pdf_and_a_scanned_pdf_are_answered_and_referable_by_number(client, tmp_path):
    chat = api_send(client, "What is the code word in the document?", [memo(tmp_path)])
    assert "marmalade" in text_of(chat[-1]).lower(), text_of(chat[-1])
    chat = api_send(client, "What is the code word in this scanned document?", [scan(tmp_path)])
    assert "pelican" in text_of(chat[-1]).lower(), text_of(chat[-1])
    chat = api_send(client, "What was the code word in Document 1?")
    assert "marmalade" in text_of(chat[-1]).lower(), text_of(chat[-1])


def test_a_broken_pdf_gets_a_friendly_message_and_the_chat_goes_on(client, tmp_path):
    api_send(client, "Hi! My name is Ana.")
    good = memo(tmp_path).read_bytes()
    broken = tmp_path / "contract.pdf"
    broken.write_bytes(good[: len(good) // 2])
    chat = api_send(client, "What does this say?", [broken])
    assert "'contract.pdf' seems to be damaged or incomplete" in text_of(chat[-1])
    chat = api_send(client, "What is my name?")
    assert "Ana" in text_of(chat[-1])


def test_a_pdf_as_an_openai_file_part(app_server, tmp_path):
    data = "data:application/pdf;base64," + base64.b64encode(memo(tmp_path).read_bytes()).decode()
    api = openai.OpenAI(base_url=app_server.url + "v1", api_key="unused-on-loopback")
    done = api.chat.completions.create(model="qwen2.5-0.5b", temperature=0, messages=[
        {"role": "user", "content": [{"type": "text", "text": "What is the code word in the document?"},
                                     {"type": "file", "file": {"filename": "memo.pdf", "file_data": data}}]}])
    assert "marmalade" in done.choices[0].message.content.lower(), done.choices[0].message.content


@pytest.mark.parametrize("size", list(SIZES))
def test_pdfs_uploaded_in_the_browser_are_answered(browser, app_server, tmp_path, size):
    width, height = SIZES[size]
    context = browser.new_context(viewport={"width": width, "height": height})
    try:
        page = context.new_page()
        page.goto(app_server.url, wait_until="load")
        expect(page.locator("#message-box")).to_be_visible(timeout=30_000)
        reply = browser_send(page, "What is the code word in the document?", [memo(tmp_path)])
        assert "marmalade" in reply.lower(), reply
        reply = browser_send(page, "What is the code word in this scanned document?", [scan(tmp_path)])
        assert "pelican" in reply.lower(), reply
        expect(page.get_by_test_id("user").filter(has_text="Document 2: scan.pdf")).to_have_count(1)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"documents-{size}.png"), full_page=True)
    finally:
        context.close()
