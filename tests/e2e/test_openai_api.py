"""The OpenAI-compatible API (/v1) of the real app and bundled models, driven by the official `openai` client."""

import base64
from pathlib import Path

import httpx
import openai
import pytest

from chatbot.conversation.store import ConversationStore
from harness.server import AppServer

ROOT = Path(__file__).resolve().parents[2]
SIGN = ROOT / "assets" / "examples" / "sign.png"
VOICE = ROOT / "tests" / "data" / "capital_of_france.wav"
MODEL = "qwen2.5-0.5b"
KEYS = {"alice": "alice-key-0123456789abcdef", "bob": "bob-key-0123456789abcdefgh"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("api-data")
    keys = data.parent / f"{data.name}-keys.txt"
    keys.write_text("# name:key\n" + "\n".join(f"{n}:{k}" for n, k in KEYS.items()) + "\n")
    with AppServer(data, "--api-keys-file", str(keys)) as app:
        yield app


def client(server: AppServer, name: str = "alice", key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "v1", api_key=key or KEYS[name], max_retries=0, timeout=300)


def data_url(path: Path, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def stored(server: AppServer, name: str):
    """The conversations the app stored for the API key's owner (read straight from its database)."""
    store = ConversationStore(server.data_dir)
    try:
        return [store.load(f"user:{name}", c.id) for c in store.list(f"user:{name}")]
    finally:
        store.close()


def test_models_and_a_plain_completion_with_usage(server):
    alice = client(server)
    assert [m.id for m in alice.models.list().data] == [MODEL]
    done = alice.chat.completions.create(model=MODEL, temperature=0, max_tokens=16, messages=[
        {"role": "user", "content": "What is the capital of France? Answer in one word."}])
    assert done.object == "chat.completion" and done.choices[0].message.role == "assistant"
    assert "Paris" in done.choices[0].message.content
    assert done.choices[0].finish_reason in ("stop", "length")
    usage = done.usage
    assert usage.prompt_tokens > 10 and 0 < usage.completion_tokens <= 16
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_streaming_stop_and_max_tokens(server):
    alice = client(server)
    pieces, finish, usage = [], None, None
    for chunk in alice.chat.completions.create(
            model=MODEL, temperature=0, stream=True, stream_options={"include_usage": True}, messages=[
                {"role": "user", "content": "List the numbers from 1 to 10, one per line."}], stop=["6"]):
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    reply = "".join(pieces)
    assert len([p for p in pieces if p]) > 2, "the reply should arrive in pieces"
    assert "4" in reply and "5" in reply and "6" not in reply and finish == "stop", reply
    assert usage and usage.completion_tokens > 0
    short = alice.chat.completions.create(model=MODEL, temperature=0, max_tokens=5, messages=[
        {"role": "user", "content": "Write a long story about a dragon."}])
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens <= 6


def test_a_photo_part_is_read_and_remembered_over_a_stateless_history(server):
    bob = client(server, "bob")
    ask = {"role": "user", "content": [
        {"type": "text", "text": "What does the sign say?"},
        {"type": "image_url", "image_url": {"url": data_url(SIGN, "image/png")}}]}
    first = bob.chat.completions.create(model=MODEL, temperature=0, messages=[ask])
    reply = first.choices[0].message.content
    assert "HARBOR" in reply.upper() or "LISBON" in reply.upper(), reply
    # The whole history again, as OpenAI clients send it: one conversation, the photo not stored twice.
    follow = bob.chat.completions.create(model=MODEL, temperature=0, messages=[
        ask, {"role": "assistant", "content": reply},
        {"role": "user", "content": "Which city does the sign point to?"}])
    assert "LISBON" in follow.choices[0].message.content.upper()
    [conv] = stored(server, "bob")
    assert [t.role.value for t in conv.turns] == ["user", "assistant"] * 2
    assert len(conv.attachments()) == 1 and "HARBOR" in conv.turns[0].model_text().upper()


def test_an_audio_part_is_transcribed_and_answered(server):
    done = client(server).chat.completions.create(model=MODEL, temperature=0, messages=[
        {"role": "user", "content": [{"type": "input_audio", "input_audio": {
            "data": base64.b64encode(VOICE.read_bytes()).decode(), "format": "wav"}}]}])
    assert "Paris" in done.choices[0].message.content


def test_bad_input_gets_openai_style_errors(server):
    alice = client(server)
    with pytest.raises(openai.NotFoundError) as error:
        alice.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert error.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as error:
        alice.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}])
    assert error.value.body["type"] == "invalid_request_error" and "data: URL" in error.value.message
    with pytest.raises(openai.BadRequestError):
        alice.chat.completions.create(model=MODEL, messages=[])
    with pytest.raises(openai.BadRequestError):
        alice.chat.completions.create(model=MODEL, temperature=7, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as error:  # not an image: the encoder's own explanation
        alice.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(
                b"this is not a picture").decode()}}]}])
    assert "image" in error.value.message.lower()
    oversize = httpx.post(server.url + "v1/chat/completions", content=b"x" * (65 * 2**20), timeout=60,
                          headers={"Authorization": f"Bearer {KEYS['alice']}", "Content-Type": "application/json"})
    assert oversize.status_code == 413 and oversize.json()["error"]["code"] == "request_too_large"


def test_keys_separate_owners_and_a_wrong_key_is_refused(server):
    secret = "My locker code is 4417."
    client(server, "alice").chat.completions.create(model=MODEL, max_tokens=8, messages=[
        {"role": "user", "content": secret}])
    assert any(secret in t.text for c in stored(server, "alice") for t in c.turns)
    assert not any(secret in t.text for c in stored(server, "bob") for t in c.turns)
    with pytest.raises(openai.AuthenticationError):
        client(server, key="not-a-key-of-this-server").models.list()
    anonymous = httpx.get(server.url + "v1/models")
    assert anonymous.status_code == 401 and anonymous.json()["error"]["type"] == "authentication_error"
