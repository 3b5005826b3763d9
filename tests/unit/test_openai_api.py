"""Who may call the OpenAI-compatible API: keys name owners; without keys only this machine may call."""

import pytest
from starlette.requests import Request

from chatbot.errors import UserFacingError
from chatbot.web.openai_api import LOCAL_OWNER, ApiError, ApiKeys, _owner


def request(host: str, key: str | None = None) -> Request:
    headers = [(b"authorization", f"Bearer {key}".encode())] if key else []
    return Request({"type": "http", "method": "GET", "path": "/v1/models", "headers": headers,
                    "client": (host, 50000)})


def test_without_keys_only_loopback_callers_are_served():
    none = ApiKeys({})
    assert _owner(request("127.0.0.1"), none, signed_in=False) == LOCAL_OWNER
    assert _owner(request("::1"), none, signed_in=False) == LOCAL_OWNER
    for host in ("192.168.1.20", "10.0.0.5", "testclient"):
        with pytest.raises(ApiError) as error:
            _owner(request(host), none, signed_in=False)
        assert error.value.status == 403
    with pytest.raises(ApiError):  # --auth without API keys: the API is closed, even locally
        _owner(request("127.0.0.1"), none, signed_in=True)


def test_keys_name_owners_from_a_file_and_the_environment(tmp_path, monkeypatch):
    path = tmp_path / "keys"
    path.write_text("# comment\nalice:alice-key-0123456789abcdef\n\n")
    monkeypatch.setenv("CHATBOT_API_KEYS", "bob:bob-key-0123456789abcdefgh")
    keys = ApiKeys.load(path)
    assert _owner(request("10.0.0.5", "alice-key-0123456789abcdef"), keys, False) == "user:alice"
    assert _owner(request("127.0.0.1", "bob-key-0123456789abcdefgh"), keys, False) == "user:bob"
    for key in (None, "alice-key-0123456789abcdeX"):
        with pytest.raises(ApiError) as error:
            _owner(request("127.0.0.1", key), keys, False)
        assert error.value.status == 401
    path.write_text("carol:short\n")
    with pytest.raises(UserFacingError):
        ApiKeys.load(path)


# -- the openai backend against a real server: this app's /v1 on uvicorn, replies from the canned generator --
@pytest.fixture
def remote(tmp_path):
    """A real HTTP server on a free local port serving the API; yields its /v1 root."""
    import threading

    import uvicorn
    from fastapi import FastAPI

    from chatbot.conversation.service import ChatService
    from chatbot.conversation.store import ConversationStore
    from chatbot.perception.encoder import MultimodalEncoder
    from chatbot.web import security
    from chatbot.web.openai_api import openai_router
    from harness.server import free_port
    from tests.support.canned import CannedGenerator

    store = ConversationStore(tmp_path / "remote")
    service = ChatService(MultimodalEncoder(store.media_dir), CannedGenerator(), store)
    app = FastAPI(middleware=security.middleware())
    app.include_router(openai_router(service, ApiKeys({})))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        thread.join(0.05)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(10)


def test_the_openai_backend_returns_why_the_server_ended_the_reply(remote):
    from chatbot.generation.base import FinishReason, GenerationSettings
    from chatbot.generation.openai_backend import OpenAIGenerator
    from chatbot.state import Message, Role

    generator = OpenAIGenerator(remote, "canned")
    ask = [Message(Role.USER, "tell me a story")]

    def run(tokens: int) -> tuple[str, FinishReason | None]:
        pieces, stream = [], generator.stream(ask, GenerationSettings(max_new_tokens=tokens))
        while True:
            try:
                pieces.append(next(stream))
            except StopIteration as end:
                return "".join(pieces), end.value

    cut, why = run(2)  # the server reports finish_reason "length"
    assert cut == "thanks for" and why is FinishReason.LENGTH
    whole, why = run(50)
    assert whole == "thanks for your message about tell me a story" and why is FinishReason.STOP
