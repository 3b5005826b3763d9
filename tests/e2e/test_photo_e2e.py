"""Photo turns end to end on the real app: OCR and detectors describe, the bundled LM answers."""


import pytest
from gradio_client import Client
from playwright.sync_api import Page, expect

from harness.pictures import sign
from tests.support.drivers import api_send, browser_send, files_of, text_of


@pytest.fixture
def client(app_server):
    return Client(app_server.url, verbose=False)


def test_the_bot_reads_a_sign_and_remembers_it_two_turns_later(client, tmp_path):
    photo = sign(tmp_path / "street.jpg", "BAKERY", "OPEN 7 DAYS")
    chat = api_send(client, "What does the sign say?", [photo])
    assert files_of(chat[0])  # the photo is shown in the chat
    assert "bakery" in text_of(chat[-1]).lower()
    api_send(client, "Thanks! What is 12 plus 30?")
    chat = api_send(client, "What did the sign in my first photo say?")
    assert "bakery" in text_of(chat[-1]).lower()


def test_several_photos_are_numbered(client, tmp_path):
    first = sign(tmp_path / "a.png", "EXIT")
    second = sign(tmp_path / "b.png", "LIBRARY")
    chat = api_send(client, "Here are two photos.", [first, second])
    assert len(files_of(chat[0])) == 2
    chat = api_send(client, "What word is written in Photo 2?")
    assert "library" in text_of(chat[-1]).lower()


def test_a_broken_photo_gets_a_friendly_message_and_history_stays(client, tmp_path):
    api_send(client, "Hi! My name is Ana.")
    broken = tmp_path / "holiday.jpg"
    broken.write_bytes(sign(tmp_path / "ok.jpg", "HELLO").read_bytes()[:2000])  # truncated JPEG
    chat = api_send(client, "What is in this photo?", [broken])
    assert "Traceback" not in text_of(chat[-1]) and "image" in text_of(chat[-1]).lower()
    chat = api_send(client, "What is my name?")
    assert "Ana" in text_of(chat[-1])


def test_upload_a_photo_mid_conversation_in_the_browser(page: Page, tmp_path):
    browser_send(page, "Hi! I am going to show you a sign.")
    photo = sign(tmp_path / "sign.png", "HARBOR ROAD")
    reply = browser_send(page, "What does the sign say?", [photo])
    expect(page.get_by_test_id("user").locator("img")).to_have_count(1)  # the thumbnail in the chat
    assert "harbor" in reply.lower()
