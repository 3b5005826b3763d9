"""Beyond one process: app B writes its replies with app A over the OpenAI protocol; two copies share
one PostgreSQL database; and (when installed) llama.cpp's own server as the reply server.

App A runs the small bundled model (SmolLM2-135M): these tests check what travels between the
processes (the photo's notes, the history, a stop), not the answers' quality. B loads no chat model.
"""

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest
from gradio_client import Client

from chatbot.conversation.store import ConversationStore
from chatbot.web.page import CUT_MARK
from chatbot.weights import CHAT_MODELS
from harness.server import AppServer, free_port
from tests.support.drivers import api_send as send
from tests.support.drivers import files_of, text_of

ROOT = Path(__file__).resolve().parents[2]
SIGN = ROOT / "assets" / "examples" / "sign.png"
SMALL = "smollm2-135m"
LONG_PROMPT = "Write a very long story (at least 1000 words) about a dragon who learns to cook."


@pytest.fixture(scope="module")
def app_a(tmp_path_factory):
    with AppServer(tmp_path_factory.mktemp("app-a"), "--text-model", SMALL, "--speech-model", "none",
                   "--quantize", "none") as app:
        yield app


def remote_app(data_dir: Path, base_url: str, model: str, *extra: str) -> AppServer:
    return AppServer(data_dir, "--text-backend", "openai", "--base-url", base_url, "--remote-model", model,
                     "--speech-model", "none", "--max-new-tokens", "160", *extra)


def a_conversations(app: AppServer):
    """What A stored for its API callers (no keys: the local owner), newest first."""
    store = ConversationStore(app.data_dir)
    try:
        return [store.load("api:local", c.id) for c in store.list("api:local")]
    finally:
        store.close()


def keyed(app: AppServer, key: str) -> Client:
    client = Client(app.url, verbose=False)
    client.predict(key, api_name="/use_key")
    return client


def test_b_chats_with_a_photo_through_a_and_its_stop_stops_a(app_a, tmp_path):
    with remote_app(tmp_path / "b", app_a.url + "v1", SMALL) as app_b:
        client = Client(app_b.url, verbose=False)
        send(client, "Hi! My name is Ana and I live in Lisbon.")
        send(client, "What does the sign say?", [SIGN])
        chat = send(client, "What is my name?")
        assert [m["role"] for m in chat] == ["user", "assistant"] * 3
        assert all(text_of(m).strip() for m in chat[1::2]), "every reply came back from A"
        # A received the whole history each turn, the photo as B's notes on it, and kept one conversation.
        [conv] = a_conversations(app_a)
        users = [t.text for t in conv.turns if t.role.value == "user"]
        assert len(users) == 3 and "HARBOR ROAD" in users[1].upper() and "Ana" in users[0]
        # B shows a reply A cut at the token limit with the mark that offers Continue.
        assert [t.text for t in conv.turns if t.role.value == "assistant"] == [
            text_of(m).removesuffix(CUT_MARK) for m in chat[1::2]]

        # A long reply, stopped in B: A's generation ends too (A keeps the reply, marked interrupted).
        job = client.submit({"text": LONG_PROMPT, "files": []}, api_name="/chat")
        deadline = time.monotonic() + 120
        while not (job.outputs() and len(text_of(job.outputs()[-1][0][-1])) > 20):
            assert time.monotonic() < deadline and not job.done(), "the long reply did not stream"
            time.sleep(0.05)
        client.predict(api_name="/stop")
        chat, _box = job.result()
        assert "(stopped)" in text_of(chat[-1])
        deadline = time.monotonic() + 30
        while True:
            last = a_conversations(app_a)[0].turns[-1]
            if last.role.value == "assistant":
                break
            assert time.monotonic() < deadline, "A never finished the stopped reply"
            time.sleep(0.2)
        assert last.interrupted and len(last.text) < 1000, "A should stop when B closes the stream"


def test_an_unreachable_reply_server_is_a_message_and_the_conversation_stays(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    with remote_app(tmp_path / "b", dead, SMALL) as app_b:
        client = Client(app_b.url, verbose=False)
        chat = send(client, "Hello, are you there?")
        assert "cannot be reached" in text_of(chat[-1]) and text_of(chat[0]) == "Hello, are you there?"
        chat = send(client, "Still nobody?")
        assert [text_of(m) for m in chat[0::2]] == ["Hello, are you there?", "Still nobody?"]


def test_two_copies_on_one_postgresql_database_share_an_owners_conversations(app_a, postgres_url, tmp_path):
    shared = tmp_path / "shared"  # the attachments' folder, shared like the database
    key = "ana-owner-key-0123456789"
    with remote_app(shared, app_a.url + "v1", SMALL, "--database", postgres_url) as one, \
            remote_app(shared, app_a.url + "v1", SMALL, "--database", postgres_url) as two:
        chat = send(keyed(one, key), "What does the sign say?", [SIGN])
        reply = text_of(chat[-1])
        assert reply.strip()
        other = keyed(two, key)
        [listed] = other.predict(api_name="/conversations")
        assert listed["turns"] == 2
        shown = other.predict(listed["id"], api_name="/open")
        assert text_of(shown[-1]) == reply
        assert [Path(f).read_bytes() for f in files_of(shown[0])] == [SIGN.read_bytes()]  # from the shared folder
        # And the other way round: a reply finished on copy two is there on copy one.
        chat = send(other, "Thanks! And what is 2 plus 2?")
        reopened = keyed(one, key).predict(listed["id"], api_name="/open")
        assert [text_of(m) for m in reopened] == [text_of(m) for m in chat]
        assert keyed(two, "someone-else-0123456789").predict(api_name="/conversations") == []


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python[server] is not installed (python -m bench.llama_cpp_peer install)")
def test_llama_cpp_server_as_the_reply_server(tmp_path):
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(CHAT_MODELS[SMALL].gguf_path()),
                               "--host", "127.0.0.1", "--port", str(port), "--model_alias", SMALL, "--n_ctx", "2048"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with remote_app(tmp_path / "b", f"http://127.0.0.1:{port}/v1", SMALL) as app_b:
            client = Client(app_b.url, verbose=False)
            deadline = time.monotonic() + 120
            while "cannot be reached" in text_of((chat := send(client, "Say hello."))[-1]):
                assert time.monotonic() < deadline, "llama.cpp's server did not start"
                time.sleep(1)
            chat = send(client, "What does the sign say?", [SIGN])
            assert text_of(chat[-1]).strip() and "cannot be reached" not in text_of(chat[-1])
    finally:
        server.terminate()
        server.wait(timeout=30)
