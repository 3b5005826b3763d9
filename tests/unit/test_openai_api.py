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
