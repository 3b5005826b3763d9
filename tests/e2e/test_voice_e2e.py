"""Voice turns end to end on the real app: the bundled Whisper hears, the bundled LM answers."""

from pathlib import Path

import pytest
from gradio_client import Client
from playwright.sync_api import Page, expect

from tests.support.drivers import (
    api_send,
    browser_record,
    files_of,
    message_box,
    text_of,
    wait_for_reply,
)

DATA = Path(__file__).resolve().parents[1] / "data"
CAPITAL = DATA / "capital_of_france.wav"


@pytest.fixture
def client(app_server):
    return Client(app_server.url, verbose=False)


def test_spoken_question_is_transcribed_and_answered_over_the_api(client):
    chat = api_send(client, "", [CAPITAL])
    user, reply = chat[-2], chat[-1]
    assert files_of(user) and files_of(user)[0].endswith(".wav")  # the recording stays playable
    assert "capital" in text_of(user).lower() and "france" in text_of(user).lower()
    assert "paris" in text_of(reply).lower()


def test_later_turns_can_refer_to_what_was_said(client):
    api_send(client, "", [CAPITAL])
    chat = api_send(client, "Which country did I ask about in my voice message?")
    assert "france" in text_of(chat[-1]).lower()


def test_voice_and_typed_text_together_are_one_turn(client):
    chat = api_send(client, "Please answer in one word.", [CAPITAL])
    assert [m["role"] for m in chat] == ["user", "assistant"]
    assert "one word" in text_of(chat[0]) and "france" in text_of(chat[0]).lower()


def test_a_silent_recording_gets_a_friendly_message(client, tmp_path):
    import wave

    silent = tmp_path / "audio.wav"
    with wave.open(str(silent), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(44100)
        w.writeframes(bytes(44100 * 2 * 2))
    api_send(client, "Hello, I am Ana.")
    chat = api_send(client, "", [silent])
    assert "Traceback" not in text_of(chat[-1]) and len(text_of(chat[-1])) > 10
    chat = api_send(client, "What is my name?")
    assert "Ana" in text_of(chat[-1])


def test_microphone_in_the_browser(page: Page):
    before = page.get_by_test_id("bot").count()
    browser_record(page, seconds=3.0)
    message_box(page).press("Enter")
    reply = wait_for_reply(page, before)
    users = page.get_by_test_id("user")
    expect(users.last).to_contain_text("capital", ignore_case=True)
    expect(users.locator("audio")).to_have_count(1)  # the recording stays playable
    assert "paris" in reply.lower()
