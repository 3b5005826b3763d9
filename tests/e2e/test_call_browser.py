"""Hands-free call mode in Chromium, with microphones that play committed recordings.

One server for the module (the bundled models; longer replies than the other e2e tests so
that a barge-in lands while the bot is still writing). The two-question test uses Chromium's
fake microphone (a browser of its own plays the recording from the start); the barge-in test
speaks through a scripted microphone at the moment the bot is heard talking.
"""

import base64
import shutil
import time
from pathlib import Path

import pytest
from playwright.sync_api import expect

from harness.server import AppServer
from tests.conftest import CHROMIUM_FLAGS
from tests.support.drivers import turns

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


def test_call_mode_answers_two_questions_aloud_and_ignores_silence(browser, call_server):
    # call_browser.wav: 1 s quiet, a question, 25 s quiet, a second question, 35 s quiet (then it loops).
    own, page = call_page(browser, call_server, "call_browser.wav")
    try:
        page.get_by_role("button", name="📞 Start call").click()
        started = time.monotonic()
        users, bots = turns(page, "user"), turns(page, "bot")
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


# A microphone the test speaks into when it chooses (a user interrupts when they hear the bot talk,
# whatever the machine's load): getUserMedia gives a Web Audio stream that is silent until `say`.
SCRIPTED_MIC = """(() => {
  const ctx = new AudioContext(), out = ctx.createMediaStreamDestination();
  window.testMic = {async say(b64) {
    await ctx.resume();
    const buffer = await ctx.decodeAudioData(Uint8Array.from(atob(b64), c => c.charCodeAt(0)).buffer);
    const source = ctx.createBufferSource();
    source.buffer = buffer; source.connect(out); source.start();
  }};
  navigator.mediaDevices.getUserMedia = async () => out.stream;
})();"""


def say(page, recording: str) -> None:
    page.evaluate("b64 => window.testMic.say(b64)", base64.b64encode((DATA / recording).read_bytes()).decode())


def test_speaking_while_the_bot_talks_stops_its_voice_and_its_reply(browser, call_server):
    context = browser.new_context()
    context.add_init_script(SCRIPTED_MIC)
    page = context.new_page()
    page.goto(call_server.url, wait_until="load")
    try:
        page.get_by_role("button", name="📞 Start call").click()
        say(page, "call_bread.wav")  # "Explain how bread is made, in ten detailed steps." (a long answer)
        users, bots = turns(page, "user"), turns(page, "bot")
        deadline = time.monotonic() + 120
        while not any(c["time"] > 0.3 and not c["ended"] for c in page.evaluate(PLAYED)):  # the bot is talking
            assert time.monotonic() < deadline, page.evaluate(PLAYED)
            time.sleep(0.1)
        expect(bots.first).not_to_contain_text("(stopped)")  # still writing its reply
        say(page, "call_stop.wav")  # "Stop. What is the capital of Italy?"
        expect(users).to_have_count(2, timeout=60_000)
        expect(bots.first).to_contain_text("(stopped)", timeout=20_000)  # generation was cut short
        played = page.evaluate(PLAYED)
        assert any(c["stopped"] and 0 < c["time"] for c in played), played  # playback cut mid-clip
        expect(bots.nth(1)).to_contain_text("Rome", timeout=60_000)
        page.get_by_role("button", name="End call").click()
    finally:
        context.close()
