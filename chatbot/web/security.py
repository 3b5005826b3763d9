"""HTTP hardening around the whole web app, independent of its routes (Gradio's or any API's).

- Served files (`/file=...`, Gradio's only file route) carry `nosniff`, a CSP
  that runs nothing, and `Content-Disposition: attachment` unless they are an
  image or audio type: a file someone imported can never become a page on this
  origin (stored XSS that would read the owner key from local storage).
- The server never fetches a remote URL for a client: Gradio's `/file=<url>`
  and `/proxy=` routes, and file payloads whose path is a URL, are refused.
- Wrong passwords (Gradio's `/login`) are throttled per client.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from starlette.middleware import Middleware

FILE_CSP = "default-src 'none'; img-src 'self'; media-src 'self'; style-src 'unsafe-inline'; sandbox"
_SERVED_FILE = re.compile(r"/file=")
_PROXY = re.compile(r"/proxy=")
_URL = re.compile(r"\s*(?:[A-Za-z][A-Za-z0-9+.-]*:|[/\\]{2})")  # scheme: or //host
_INLINE_TYPES = (b"image/", b"audio/")
MAX_JSON_BODY = 64 * 2**20  # JSON requests are read whole to look for file URLs: bounded

Scope = dict
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


@dataclass
class Throttle:
    """Per-client backoff after failed attempts: free ones first, then doubling waits up to a cap."""

    free: int = 5
    base_seconds: float = 1.0
    max_seconds: float = 60.0
    forget_after: float = 3600.0
    _failures: dict[str, tuple[int, float]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def wait(self, client: str) -> float:
        """Seconds `client` must wait before its next attempt (0: go ahead)."""
        with self._lock:
            count, last = self._failures.get(client, (0, 0.0))
            if count < self.free or time.monotonic() - last > self.forget_after:
                return 0.0
            delay = min(self.max_seconds, self.base_seconds * 2 ** (count - self.free))
            return max(0.0, last + delay - time.monotonic())

    def failed(self, client: str) -> None:
        with self._lock:
            count, last = self._failures.get(client, (0, 0.0))
            if time.monotonic() - last > self.forget_after:
                count = 0
            self._failures[client] = (count + 1, time.monotonic())
            if len(self._failures) > 100_000:  # a flood of addresses must not grow memory without bound
                self._failures.pop(next(iter(self._failures)))

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._failures.pop(client, None)


def client_of(scope: Scope) -> str:
    client = scope.get("client")
    return client[0] if client else "unknown"


class Hardening:
    """Pure ASGI middleware (works for any app mounted on the same server)."""

    def __init__(self, app, login_throttle: Throttle | None = None):
        self.app = app
        self.login_throttle = login_throttle or Throttle()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path: str = scope["path"]
        if _PROXY.search(path) or _fetches_url(path):
            return await _respond(send, 403, "This server does not fetch remote URLs.", "url_fetch_refused")
        if scope["method"] == "POST" and _is_json(scope):
            body = await _read_body(receive)
            if body is None:
                return await _respond(send, 413, "Request too large.", "request_too_large")
            if _names_remote_file(body):
                return await _respond(send, 400, "Files must be uploaded; this server does not fetch URLs.",
                                      "url_fetch_refused")
            receive = _replay(body, receive)
        login = scope["method"] == "POST" and path.rstrip("/").endswith("/login")
        client = client_of(scope)
        if login:
            wait = self.login_throttle.wait(client)
            if wait > 0:
                return await _respond(send, 429, f"Too many wrong passwords; try again in {wait:.0f} s.",
                                      "too_many_attempts", [(b"retry-after", str(int(wait) + 1).encode())])
        served_file = bool(_SERVED_FILE.search(path))

        async def guarded_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", [])]
                headers.append((b"x-content-type-options", b"nosniff"))
                if served_file:
                    headers = _file_headers(headers)
                message = {**message, "headers": headers}
                if login:
                    status = message["status"]
                    if status < 300:
                        self.login_throttle.succeeded(client)
                    elif status in (400, 401, 403):
                        self.login_throttle.failed(client)
            await send(message)

        await self.app(scope, receive, guarded_send)


def middleware(login_throttle: Throttle | None = None) -> list[Middleware]:
    """For `FastAPI(middleware=...)` (e.g. Gradio's `launch(app_kwargs={"middleware": ...})`)."""
    return [Middleware(Hardening, login_throttle=login_throttle)]


def _fetches_url(path: str) -> bool:
    _, found, target = path.partition("/file=")
    return bool(found) and bool(_URL.match(target))


def _file_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    kept = [(k, v) for k, v in headers
            if k.lower() not in (b"content-security-policy", b"content-disposition")]
    kept.append((b"content-security-policy", FILE_CSP.encode()))
    kind = next((v.lower() for k, v in headers if k.lower() == b"content-type"), b"")
    inline = kind.startswith(_INLINE_TYPES) and b"svg" not in kind  # SVG is a document that runs scripts
    if not inline:
        kept.append((b"content-disposition", b"attachment"))
    return kept


def _is_json(scope: Scope) -> bool:
    kind = next((v for k, v in scope.get("headers", []) if k == b"content-type"), b"")
    return kind.split(b";")[0].strip().lower() == b"application/json"


async def _read_body(receive: Receive) -> bytes | None:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_JSON_BODY:
            return None
        chunks.append(chunk)
        if not message.get("more_body"):
            break
    return b"".join(chunks)


def _replay(body: bytes, original: Receive) -> Receive:
    """The body read already, then the client's own messages: a streamed response (e.g. the API's
    server-sent events) listens for the real disconnect, not an invented one that would end it at once."""
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await original()
    return receive


def _names_remote_file(body: bytes) -> bool:
    """Whether a JSON payload holds a file whose path is a URL (Gradio would download it)."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return False  # not JSON after all: the route refuses it itself
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            path = item.get("path")
            if isinstance(path, str) and _URL.match(path):
                return True
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


async def _respond(send: Send, status: int, text: str, code: str,
                   extra: list[tuple[bytes, bytes]] = ()) -> None:
    """A refusal in the error shape of the OpenAI-compatible API (/v1), which any client can read."""
    kind = {403: "permission_error", 429: "rate_limit_error"}.get(status, "invalid_request_error")
    body = json.dumps({"error": {"message": text, "type": kind, "code": code, "param": None}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"x-content-type-options", b"nosniff"), *extra]})
    await send({"type": "http.response.body", "body": body})
