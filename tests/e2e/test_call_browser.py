"""Hands-free call mode in Chromium, with a fake microphone that plays a committed recording.

One server for the module (the bundled models; longer replies than the other e2e tests so
that a barge-in lands while the bot is still writing) and one browser per recording.
"""

import shutil
import time
from pathlib import Path

import pytest
from playwright.sync_api import expect

from harness.server import AppServer
from tests.conftest import CHROMIUM_FLAGS

DATA = Path(__file__).resolve().parents[1] / "data"
PLAYED = """() => Array.from(document.querySelectorAll('#voice-player audio')).map(a => ({
    time: a.currentTime, ended: a.ended, stopped: a.dataset.stopped === '1', blocked: a.dataset.blocked === '1'}))"""


@pytest.fixture(scope="module")
def call_server(tmp_path_factory):
    with AppServer(tmp_path_factory.mktemp("call-data"),
                   settings=("--temperature", "0", "--max-new-tokens", "200")) as server:
        yield server


def call_page(shared, server, recording: str):
    """A browser of its own (its fake microphone plays `recording`), from the suite's one Playwright."""
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    browser = shared.browser_type.launch(executable_path=chromium, args=CHROMIUM_FLAGS + [
        f"--use-file-for-fake-audio-capture={DATA / recording}"])
    page = browser.new_page()
    page.goto(server.url, wait_until="load")
    return browser, page


# Known open: with the bundled models the first question of the fake-microphone recording became two
# user turns (the utterance split), and barge-in was only seen working by hand. Kept running, so
# the day they pass shows in the summary (XPASS); the issue stays open until they do.
CALL_MODE_OPEN = pytest.mark.xfail(strict=False, reason="call mode not yet verified end to end in Chromium")


@CALL_MODE_OPEN
def test_call_mode_answers_two_questions_aloud_and_ignores_silence(browser, call_server):
    # call_browser.wav: 1 s quiet, a question, 25 s quiet, a second question, 35 s quiet (then it loops).
    own, page = call_page(browser, call_server, "call_browser.wav")
    try:
        page.get_by_role("button", name="📞 Start call").click()
        started = time.monotonic()
        users, bots = page.get_by_test_id("user"), page.get_by_test_id("bot")
        expect(users).to_have_count(1, timeout=20_000)
        expect(bots.first.locator("audio")).to_have_count(1, timeout=40_000)  # the spoken reply, kept
        expect(users).to_have_count(2, timeout=30_000)
        expect(bots.nth(1).locator("audio")).to_have_count(1, timeout=40_000)
        time.sleep(max(0.0, 58 - (time.monotonic() - started)))  # the long silence at the end
        expect(users).to_have_count(2)
        expect(bots).to_have_count(2)
        assert "France" in users.first.inner_text() or "france" in users.first.inner_text().lower()
        assert "Paris" in bots.first.inner_text()
        played = page.evaluate(PLAYED)
        assert len(played) >= 2 and all(c["ended"] for c in played), played  # every clip played to its end
        assert not any(c["blocked"] or c["stopped"] for c in played), played
        page.get_by_role("button", name="End call").click()
    finally:
        own.close()


@CALL_MODE_OPEN
def test_speaking_while_the_bot_talks_stops_its_voice_and_its_reply(browser, call_server):
    # call_barge_in.wav: asks for a long story, then 5 s later says "Stop. What is the capital of Italy?"
    own, page = call_page(browser, call_server, "call_barge_in.wav")
    try:
        page.get_by_role("button", name="📞 Start call").click()
        users, bots = page.get_by_test_id("user"), page.get_by_test_id("bot")
        expect(users).to_have_count(2, timeout=40_000)
        expect(bots.first).to_contain_text("(stopped)", timeout=20_000)  # generation was cut short
        played = page.evaluate(PLAYED)
        assert any(c["stopped"] and 0 < c["time"] for c in played), played  # playback cut mid-clip
        expect(bots.nth(1)).to_contain_text("Rome", timeout=60_000)
        page.get_by_role("button", name="End call").click()
    finally:
        own.close()
