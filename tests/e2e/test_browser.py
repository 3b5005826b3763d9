"""The chat page in a real browser (Chromium) against the real app and bundled models."""

from playwright.sync_api import Page, expect

from tests.support.drivers import browser_send, message_box, wait_for_reply


def test_three_turn_conversation_streams_and_remembers(page: Page):
    browser_send(page, "Hi! My name is Ana and I live in Lisbon.")
    bots_before = page.get_by_test_id("bot").count()
    box = message_box(page)
    box.fill("Explain how bread is made, step by step.")  # a reply long enough to watch it stream
    box.press("Enter")
    seen: list[str] = []
    reply = wait_for_reply(page, bots_before, seen)
    partial = {s for s in seen if s and s != reply}
    assert partial, "the reply should appear piece by piece before it is complete"
    assert "Ana" in browser_send(page, "Remind me, what is my name?")
    expect(page.get_by_test_id("user")).to_have_count(3)


def test_new_chat_starts_a_fresh_conversation(page: Page):
    browser_send(page, "My favourite colour is teal.")
    page.get_by_role("button", name="New chat").click()
    expect(page.get_by_test_id("bot")).to_have_count(0)
    reply = browser_send(page, "Hello! Which colour did I say was my favourite?")
    assert "teal" not in reply.lower()
