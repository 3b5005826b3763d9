"""How tests talk to the running app: through gradio_client (API) or Chromium (browser)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

import psutil
from gradio_client import Client, handle_file
from playwright.sync_api import Page, expect

REPLY_TIMEOUT_MS = 180_000


# -- API ----------------------------------------------------------------------------------
def text_of(message: dict) -> str:
    """Gradio 6 message content is a list of typed parts; join the text ones."""
    content = message["content"]
    if isinstance(content, str):
        return content
    return " ".join(part.get("text", "") for part in content if part.get("type") == "text")


def files_of(message: dict) -> list[str]:
    """Local paths of the files in a message (gradio_client downloads them)."""
    files = [part["file"] for part in message["content"] if isinstance(part, dict) and part.get("type") == "file"]
    return [f if isinstance(f, str) else f["path"] for f in files]


def api_send(client: Client, text: str, files: tuple[Path | str, ...] = ()) -> list[dict]:
    """One chat turn through the `/chat` endpoint; returns the whole conversation as shown."""
    chat, *_ = client.predict({"text": text, "files": [handle_file(str(f)) for f in files]}, api_name="/chat")
    return chat


def keyed_client(server, key: str) -> Client:
    """An API client that owns the conversations of `key` (what a browser keeps in local storage)."""
    client = Client(server.url, verbose=False)
    client.predict(key, api_name="/use_key")
    return client


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def cpu_rate(pid: int, seconds: float) -> float:
    """CPU seconds per wall second the process used over the next `seconds` (all its threads)."""
    start_cpu, start = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return (cpu_seconds(pid) - start_cpu) / (time.monotonic() - start)


# -- browser --------------------------------------------------------------------------------
@contextmanager
def open_page(browser, url: str):
    """A fresh browser context (its own local storage) with the app loaded."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.goto(url, wait_until="load")
    try:
        yield page
    finally:
        context.close()


def message_box(page: Page):
    """The chat input's text area (the side panel has text boxes too)."""
    return page.locator("#message-box").get_by_test_id("textbox")


def turns(page: Page, role: str):
    """The chat's turns of one role ("user" or "bot"), one per turn.

    Gradio draws each part of a message (a recording's player, its transcript, the words) as its
    own `data-testid` element, so a voice turn has two; the row around them is the turn.
    """
    return page.locator(f"#chat .message-row.{role}-row")


def wait_for_reply(page: Page, bots_before: int, seen: list[str] | None = None) -> str:
    """Wait for a new bot message and for it to finish streaming; optionally record partial states."""
    bots = page.get_by_test_id("bot")
    expect(bots).to_have_count(bots_before + 1, timeout=REPLY_TIMEOUT_MS)
    box = message_box(page)
    deadline = time.monotonic() + REPLY_TIMEOUT_MS / 1000
    # The input is locked while the reply streams.
    while box.is_disabled() and time.monotonic() < deadline:
        if seen is not None:
            seen.append(bots.last.inner_text())
        time.sleep(0.05)
    expect(box).to_be_enabled()
    return bots.last.inner_text()


def browser_send(page: Page, text: str, files: tuple[Path | str, ...] = ()) -> str:
    """Type (and attach), press Enter, return the finished reply."""
    before = page.get_by_test_id("bot").count()
    if files:
        page.get_by_test_id("file-upload").set_input_files([str(f) for f in files])
        expect(page.locator(".thumbnail-item, .thumbnails img, [data-testid='file-preview']").first).to_be_visible()
    box = message_box(page)
    box.fill(text)
    box.press("Enter")
    return wait_for_reply(page, before)


def browser_record(page: Page, seconds: float) -> None:
    """Record from the (fake) microphone through the chat box and attach the recording."""
    page.get_by_test_id("microphone-button").click()
    page.get_by_role("button", name="Start recording").click()
    time.sleep(seconds)
    page.get_by_role("button", name="Stop recording").click()
    page.get_by_role("button", name="Attach audio").click()
