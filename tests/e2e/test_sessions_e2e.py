"""Durable, private conversations end to end: the real app and bundled models, driven through the
Gradio API (gradio_client) and Chromium. Restarts (also SIGKILL mid-reply), stop freeing the CPU,
export/import, chat controls, and eight concurrent users with their own sign-in."""

import json
import signal
import threading
import time
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from gradio_client.utils import Status
from playwright.sync_api import expect

from harness.server import AppServer
from tests.support.drivers import api_send as send
from tests.support.drivers import browser_send, cpu_rate, files_of, keyed_client, open_page, text_of

ROOT = Path(__file__).resolve().parents[2]
SIGN = ROOT / "assets" / "examples" / "sign.png"
VOICE = ROOT / "tests" / "data" / "capital_of_france.wav"
# With greedy decoding this runs to the token limit (≈12 s): long enough to stop or kill mid-way.
LONG_PROMPT = "Describe 50 different fruits, one sentence each."  # long, in words (the streamer flushes at spaces)
SHORT = "Answer with one word."


def start_long_reply(client: Client):
    """Submit the long prompt and return the job once the reply is streaming."""
    job = client.submit({"text": LONG_PROMPT, "files": []}, api_name="/chat")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        chat = job.outputs()[-1][0] if job.outputs() else []
        if len(chat) >= 2 and text_of(chat[-2]) == LONG_PROMPT and len(text_of(chat[-1])) > 10:
            return job
        assert not job.done(), "the long reply ended before it could be interrupted"
        time.sleep(0.05)
    raise TimeoutError("the long reply did not start streaming")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # Long enough that LONG_PROMPT still runs when we stop or kill it.
    with AppServer(tmp_path_factory.mktemp("e2e-data"), "--max-new-tokens", "256") as app:
        yield app


@pytest.fixture
def page(browser, server):
    with open_page(browser, server.url) as tab:
        yield tab


def side_panel_entry(page, title: str):
    return page.locator("#conversation-list").get_by_text(title, exact=False)


def test_restarts_and_a_kill_mid_reply_lose_no_completed_turn(server, page):
    key = "api-user-key-for-the-restart-test"
    client = keyed_client(server, key)
    send(client, "What do these say? " + SHORT, (SIGN, VOICE))
    before = send(client, "Thanks! " + SHORT)
    assert len(before) == 4 and len(files_of(before[0])) == 2
    assert "chat-icon-mic" in text_of(before[0]) and "france" in text_of(before[0]).lower()  # the transcript is shown
    browser_send(page, "My favourite colour is teal. " + SHORT)

    # A clean restart, then a kill while a reply streams.
    server.restart()
    client = keyed_client(server, key)
    [summary] = client.predict(api_name="/conversations")
    assert summary["turns"] == 4 and summary["title"].startswith("What do these say?")
    assert client.predict(summary["id"], api_name="/open") == before
    start_long_reply(client)
    server.restart(signal.SIGKILL)

    client = keyed_client(server, key)
    [summary] = client.predict(api_name="/conversations")
    reopened = client.predict(summary["id"], api_name="/open")
    assert reopened[:4] == before  # every completed turn, with its image, recording and transcript
    for path, original in zip(files_of(reopened[0]), (SIGN, VOICE)):
        assert Path(path).read_bytes() == original.read_bytes()
    assert text_of(reopened[4]) == LONG_PROMPT
    assert "(stopped)" in text_of(reopened[5])  # the cut-off reply is marked, not half-written
    chat, _box = client.predict(api_name="/retry")  # and can be answered again
    assert len(chat) == 6 and "(stopped)" not in text_of(chat[5]) and text_of(chat[5]).strip()

    # The browser finds its own conversation (and only that one) in the side panel after a reload.
    page.reload(wait_until="load")
    entry = side_panel_entry(page, "My favourite colour is teal.")
    expect(entry).to_be_visible(timeout=30_000)
    expect(side_panel_entry(page, "What do these say?")).to_have_count(0)
    entry.click()
    expect(page.get_by_test_id("user")).to_have_count(1, timeout=30_000)
    expect(page.get_by_test_id("user").first).to_contain_text("teal")
    expect(page.get_by_test_id("bot")).to_have_count(1)


def test_stop_frees_the_cpu_within_a_second_and_only_for_that_user(server):
    alice, bob = keyed_client(server, "alice-key-0123456789"), keyed_client(server, "bob-key-0123456789xx")
    job = start_long_reply(alice)
    generating = cpu_rate(server.pid, 1.0)
    assert generating > 0.5, "the model should keep at least half a core busy while it generates"
    stopped_at = time.monotonic()
    alice.predict(api_name="/stop")
    time.sleep(max(0.0, 1.0 - (time.monotonic() - stopped_at)))
    after = cpu_rate(server.pid, 1.0)  # from one to two seconds after the stop
    assert after < 0.2 * generating, f"CPU after stop {after:.2f}/s vs {generating:.2f}/s while generating"
    chat, _box = job.result()
    assert "(stopped)" in text_of(chat[-1])

    # Bob's reply waits in the queue behind Alice's (he sees it queued); her stop leaves his alone.
    job = start_long_reply(alice)
    waiting = bob.submit({"text": "Hello! " + SHORT, "files": []}, api_name="/chat")
    deadline = time.monotonic() + 30
    while waiting.status().code is not Status.IN_QUEUE and time.monotonic() < deadline:
        time.sleep(0.05)
    assert waiting.status().code is Status.IN_QUEUE
    assert waiting.status().rank is not None
    alice.predict(api_name="/stop")
    assert "(stopped)" in text_of(job.result()[0][-1])
    bob_chat, _box = waiting.result()
    assert len(bob_chat) == 2 and "(stopped)" not in text_of(bob_chat[-1])
    assert all("50 different fruits" not in text_of(m) for m in bob_chat)


def test_export_then_import_is_exact_and_private(server, tmp_path):
    owner = keyed_client(server, "exporter-key-0123456789")
    send(owner, "Look at this sign. " + SHORT, (SIGN,))
    exported = Path(owner.predict(api_name="/export")).read_bytes()
    [summary] = owner.predict(api_name="/conversations")

    stranger = keyed_client(server, "stranger-key-0123456789")
    with pytest.raises(Exception, match="does not exist"):
        stranger.predict(summary["id"], api_name="/open")
    assert stranger.predict(api_name="/conversations") == []

    owner.predict(api_name="/delete")
    assert owner.predict(api_name="/conversations") == []
    copy = tmp_path / "conversation.json"
    copy.write_bytes(exported)
    chat = owner.predict(handle_file(str(copy)), api_name="/import")
    assert len(chat) == 2 and len(files_of(chat[0])) == 1
    # Identical but for the ids: an import always gets fresh ones (a document never picks a stored id).
    assert without_ids(Path(owner.predict(api_name="/export")).read_bytes()) == without_ids(exported)


def without_ids(exported: bytes) -> dict:
    document = json.loads(exported)
    document["conversation"]["id"] = None
    for turn in document["conversation"]["turns"]:
        turn["id"] = None
    return document


def test_chat_controls_through_the_api(server):
    client = keyed_client(server, "controls-key-0123456789")
    send(client, "My name is Ana. " + SHORT)
    chat = send(client, "What is 2 plus 2? " + SHORT)
    chat, _box = client.predict(api_name="/retry")
    assert len(chat) == 4 and "4" in text_of(chat[3])
    chat, _box = client.predict(2, "What is 3 plus 3? " + SHORT, api_name="/edit")
    assert len(chat) == 4 and text_of(chat[2]).startswith("What is 3 plus 3?") and "6" in text_of(chat[3])
    assert len(client.predict(api_name="/undo")) == 2
    client.predict("Ana's chat", api_name="/rename")
    assert [c["title"] for c in client.predict(api_name="/conversations")] == ["Ana's chat"]
    chat, _box = client.predict(api_name="/clear")
    assert chat == [] and client.predict(api_name="/conversations") == []


USERS = 8
TURNS = 10


@pytest.fixture(scope="module")
def signed_in_server(tmp_path_factory):
    users = [arg for n in range(USERS) for arg in ("--auth", f"user{n}:password{n}")]
    with AppServer(tmp_path_factory.mktemp("isolation-data"), "--max-new-tokens", "8", "--speech-model", "none",
                   *users) as app:
        yield app


def test_eight_signed_in_users_chat_at_once_and_see_only_their_own(signed_in_server):
    with pytest.raises(Exception):  # noqa: B017 - gradio_client raises several kinds
        Client(signed_in_server.url, verbose=False)  # signing in is required
    failures: list[BaseException] = []

    def user(n: int) -> None:
        try:
            client = Client(signed_in_server.url, auth=(f"user{n}", f"password{n}"), verbose=False)
            sent = []
            for turn in range(TURNS):
                sent.append(f"User {n} says note {n}-{turn}.")
                chat = send(client, sent[-1])
                assert [text_of(m) for m in chat if m["role"] == "user"] == sent
            [summary] = client.predict(api_name="/conversations")
            assert summary["turns"] == 2 * TURNS
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            failures.append(error)

    threads = [threading.Thread(target=user, args=(n,)) for n in range(USERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
