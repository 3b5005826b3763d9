"""The chat page in a real browser (Chromium) against the real app and bundled models."""

import time

from playwright.sync_api import Page, expect

REPLY_TIMEOUT_MS = 120_000


def message_box(page):
    """The message input (the sidebar has a text box too)."""
    return page.locator("#message-box").get_by_test_id("textbox")


def send(page: Page, text: str) -> str:
    """Type a message, press Enter, watch the reply stream in; return the finished reply."""
    bots = page.get_by_test_id("bot")
    before = bots.count()
    box = message_box(page)
    box.fill(text)
    box.press("Enter")
    return finished_reply(page, before)


def finished_reply(page: Page, bots_before: int, seen: list[str] | None = None) -> str:
    bots = page.get_by_test_id("bot")
    expect(bots).to_have_count(bots_before + 1, timeout=REPLY_TIMEOUT_MS)
    box = message_box(page)
    deadline = time.monotonic() + REPLY_TIMEOUT_MS / 1000
    # The input is locked while the reply streams; record what the reply looks like meanwhile.
    while box.is_disabled() and time.monotonic() < deadline:
        if seen is not None:
            seen.append(bots.last.inner_text())
        time.sleep(0.05)
    expect(box).to_be_enabled()
    return bots.last.inner_text()


def test_three_turn_conversation_streams_and_remembers(page: Page):
    send(page, "Hi! My name is Ana and I live in Lisbon.")
    bots_before = page.get_by_test_id("bot").count()
    box = message_box(page)
    box.fill("What is 12 plus 30?")
    box.press("Enter")
    seen: list[str] = []
    reply = finished_reply(page, bots_before, seen)
    assert "42" in reply
    partial = {s for s in seen if s and s != reply}
    assert partial, "the reply should appear piece by piece before it is complete"
    assert "Ana" in send(page, "Remind me, what is my name?")
    expect(page.get_by_test_id("user")).to_have_count(3)


def test_new_chat_starts_a_fresh_conversation(page: Page):
    send(page, "My favourite colour is teal.")
    page.get_by_role("button", name="New chat").click()
    expect(page.get_by_test_id("bot")).to_have_count(0)
    reply = send(page, "Hello! Which colour did I say was my favourite?")
    assert "teal" not in reply.lower()
