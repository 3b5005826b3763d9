"""Voice turns end to end on the real app: the bundled Whisper hears, the bundled LM answers."""

import re
import time
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
    turns,
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


def test_push_to_talk_one_tap_to_record_one_to_stop_then_correct_and_send(page: Page):
    talk = page.locator("#push-to-talk")
    talk.get_by_role("button", name="Record").click()  # tap 1 (the fake microphone asks "What is the capital...")
    time.sleep(3.0)
    talk.get_by_role("button", name="Stop").click()  # tap 2: the words and the recording wait in the box
    box = message_box(page)
    expect(box).to_have_value(re.compile("capital", re.IGNORECASE), timeout=60_000)
    expect(page.locator("#message-box").get_by_test_id("file-preview").or_(
        page.locator("#message-box .thumbnail-item")).first).to_be_visible()
    box.fill("What is the capital of Italy?")  # the user corrects what Whisper heard
    before = page.get_by_test_id("bot").count()
    box.press("Enter")
    reply = wait_for_reply(page, before)
    user = turns(page, "user").last
    expect(user.locator("audio")).to_have_count(1)  # the recording is kept with the turn...
    expect(user).to_contain_text("What is the capital of Italy?")  # ...with the corrected words, once
    assert user.inner_text().count("capital") == 1, user.inner_text()
    duration = user.locator("audio").evaluate(
        "a => new Promise(r => a.readyState >= 1 ? r(a.duration) : a.addEventListener('loadedmetadata', () => r(a.duration)))")
    assert duration > 2.0  # playable: the whole recording
    assert "rome" in reply.lower()  # the model answered the corrected words
