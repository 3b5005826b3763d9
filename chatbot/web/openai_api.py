"""The OpenAI chat protocol, served beside the page: `/v1/chat/completions` and `/v1/models`.

A thin layer: it checks a request, turns its messages into `IncomingMessage`s
(attached media written to a temporary folder, from `data:` URLs only: the app
makes no network calls) and hands them to `ChatService.answer`, which maps the
history onto a stored conversation and encodes photos and recordings through the
same multimodal encoder as the page. Errors have OpenAI's shape:
`{"error": {"message", "type", "code"}}`.

Who may call: with API keys configured, a request needs `Authorization: Bearer <key>`
and the key names its owner (`name:key` gives the owner of the signed-in user
`name`, so the page and the API share that user's conversations). Without keys
and without `--auth`, only this machine (loopback) may call.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import os
import re
import secrets
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from chatbot.conversation.owners import resolve_owner
from chatbot.conversation.service import ChatService, IncomingMessage
from chatbot.errors import UserFacingError
from chatbot.generation.base import GenerationSettings
from chatbot.state import Role

API_KEYS_VARIABLE = "CHATBOT_API_KEYS"
MAX_REQUEST_BYTES = 64 * 2**20  # a few photos or a recording as base64; the encoder limits each file
LOCAL_OWNER = "api:local"
_IMAGE_TYPES = {"image/png": ".png", "image/jpeg": ".jpg", "image/jpg": ".jpg", "image/webp": ".webp",
                "image/gif": ".gif", "image/bmp": ".bmp"}
_AUDIO_FORMATS = {"wav": ".wav", "mp3": ".mp3"}
_DATA_URL = re.compile(r"data:(?P<type>[\w.+-]+/[\w.+-]+)(?:;[^,]*)?;base64,(?P<data>.*)", re.DOTALL)


class ApiError(Exception):
    """A request refused, as OpenAI reports it."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.code, self.param = status, kind, code, param

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": str(self), "type": self.kind, "code": self.code,
                                       "param": self.param}}, status_code=self.status)


@dataclass(frozen=True)
class ApiKeys:
    """API keys and the owner each one names."""

    owners: dict[str, str]

    @classmethod
    def load(cls, path: Path | None) -> ApiKeys:
        """Keys from `path` (one `name:key` per line, # comments) and $CHATBOT_API_KEYS (comma-separated)."""
        entries = [line for line in Path(path).read_text().splitlines()] if path else []
        entries += os.environ.get(API_KEYS_VARIABLE, "").split(",")
        owners: dict[str, str] = {}
        for entry in (e.strip() for e in entries):
            if not entry or entry.startswith("#"):
                continue
            name, sep, key = entry.partition(":")
            if not sep or not name or len(key) < 16:
                raise UserFacingError(f"API keys are written NAME:KEY with a key of at least 16 characters "
                                      f"(got {name or entry[:8]!r}...).")
            owners[key] = resolve_owner(user=name)
        return cls(owners)

    def owner(self, key: str) -> str | None:
        return next((owner for known, owner in self.owners.items() if secrets.compare_digest(known, key)), None)


def _owner(request: Request, keys: ApiKeys, signed_in: bool) -> str:
    header = request.headers.get("authorization", "")
    token = header[7:].strip() if header.lower().startswith("bearer ") else ""
    if keys.owners:
        owner = keys.owner(token) if token else None
        if owner is None:
            raise ApiError(401, "Invalid or missing API key (send Authorization: Bearer <key>).",
                           "authentication_error", "invalid_api_key")
        return owner
    host = request.client.host if request.client else ""
    try:
        local = ipaddress.ip_address(host).is_loopback
    except ValueError:
        local = False
    if signed_in or not local:
        raise ApiError(403, "This server has no API keys, so its API answers this machine only "
                       "(start it with --api-keys-file).", "permission_error", "api_keys_required")
    return LOCAL_OWNER


def _settings(body: dict, defaults: GenerationSettings) -> GenerationSettings:
    def number(name: str, low: float, high: float, default):
        value = body.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise ApiError(400, f"'{name}' must be a number from {low} to {high}.", param=name)
        return value

    limit = number("max_completion_tokens", 1, 8192, None) or number("max_tokens", 1, 8192, defaults.max_new_tokens)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "'stop' must be a string or a list of up to 4 non-empty strings.", param="stop")
    return GenerationSettings(max_new_tokens=int(limit), temperature=float(number("temperature", 0, 2,
                              defaults.temperature)), top_p=float(number("top_p", 0, 1, defaults.top_p)),
                              repetition_penalty=defaults.repetition_penalty, stop=tuple(stop))


def _messages(body: dict, folder: Path) -> list[IncomingMessage]:
    """The request's messages, with attached media written into `folder`."""
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "'messages' must be a non-empty list.", param="messages")
    messages = []
    for i, message in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ApiError(400, f"{where} must be an object.", param=where)
        try:
            role = Role({"developer": "system"}.get(message.get("role"), message.get("role")))
        except ValueError:
            raise ApiError(400, f"{where}.role must be system, user or assistant.", param=f"{where}.role") from None
        content = message.get("content")
        if content is None and role is Role.ASSISTANT:
            content = ""
        if isinstance(content, str):
            messages.append(IncomingMessage(role, content))
            continue
        if not isinstance(content, list):
            raise ApiError(400, f"{where}.content must be a string or a list of parts.", param=f"{where}.content")
        texts, files = [], []
        for j, part in enumerate(content):
            texts_or_file = _part(part, f"{where}.content[{j}]", role, folder / f"{i}-{j}")
            (files if isinstance(texts_or_file, Path) else texts).append(texts_or_file)
        messages.append(IncomingMessage(role, "\n".join(texts), tuple(files)))
    return messages


def _part(part, where: str, role: Role, stem: Path) -> str | Path:
    """A content part: its text, or the file its media was written to."""
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        return part["text"]
    if role is not Role.USER and kind in ("image_url", "input_audio", "file"):
        raise ApiError(400, f"{where}: only user messages may carry images, audio or files.", param=where)
    if kind == "image_url":
        url = (part.get("image_url") or {}).get("url") if isinstance(part.get("image_url"), dict) else None
        match = _DATA_URL.fullmatch(url or "")
        if not match:
            raise ApiError(400, f"{where}: images must be sent inline as data: URLs (base64); this server "
                           "fetches nothing from the network.", param=where, code="unsupported_image_url")
        suffix = _IMAGE_TYPES.get(match["type"].lower())
        if suffix is None:
            raise ApiError(400, f"{where}: unsupported image type {match['type']} "
                           f"(use {', '.join(sorted(_IMAGE_TYPES))}).", param=where)
        return _write(stem.with_suffix(suffix), match["data"], where)
    if kind == "input_audio":
        audio = part.get("input_audio") if isinstance(part.get("input_audio"), dict) else {}
        suffix = _AUDIO_FORMATS.get(str(audio.get("format", "")).lower())
        if suffix is None or not isinstance(audio.get("data"), str):
            raise ApiError(400, f"{where}: input_audio needs base64 'data' and a 'format' of wav or mp3.",
                           param=where)
        return _write(stem.with_suffix(suffix), audio["data"], where)
    if kind == "file":
        file = part.get("file") if isinstance(part.get("file"), dict) else {}
        match = _DATA_URL.fullmatch(file.get("file_data") or "") if isinstance(file.get("file_data"), str) else None
        if not match or match["type"].lower() != "application/pdf":
            raise ApiError(400, f"{where}: files must be PDFs sent inline as file_data "
                           "(data:application/pdf;base64,...); this server keeps no uploaded files (file_id).",
                           param=where)
        return _write(stem.with_suffix(".pdf"), match["data"], where)
    raise ApiError(400, f"{where}: unsupported content part (use text, image_url, input_audio or file).", param=where)


def _write(path: Path, encoded: str, where: str) -> Path:
    try:
        path.write_bytes(base64.b64decode(encoded, validate=True))
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{where}: the data is not valid base64.", param=where) from None
    return path


def _chunk(completion_id: str, created: int, model: str, delta: dict, finish: str | None = None) -> str:
    return "data: " + json.dumps({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                                  "model": model, "choices": [{"index": 0, "delta": delta,
                                                               "finish_reason": finish}]}) + "\n\n"


def openai_router(service: ChatService, keys: ApiKeys, signed_in: bool = False) -> APIRouter:
    """The routes; `signed_in` (--auth) means the API, too, must never be open without a key."""
    router = APIRouter(prefix="/v1")

    async def model_name() -> str:
        """The model's name; while the app loads the model, a request waits for it (off the event loop)."""
        try:
            return await anyio.to_thread.run_sync(lambda: service.generator.name)
        except UserFacingError as error:  # it failed to load
            raise ApiError(503, str(error), kind="server_error", code="model_not_loaded") from None

    @router.get("/models")
    async def models(request: Request):
        try:
            _owner(request, keys, signed_in)
            model = await model_name()
        except ApiError as error:
            return error.response()
        return {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "local"}]}

    @router.post("/chat/completions")
    async def chat_completions(request: Request):
        try:
            owner = _owner(request, keys, signed_in)
            if int(request.headers.get("content-length") or 0) > MAX_REQUEST_BYTES:
                raise ApiError(413, f"The request is larger than {MAX_REQUEST_BYTES // 2**20} MB.",
                               code="request_too_large")
            raw = await request.body()
            if len(raw) > MAX_REQUEST_BYTES:
                raise ApiError(413, f"The request is larger than {MAX_REQUEST_BYTES // 2**20} MB.",
                               code="request_too_large")
            try:
                body = json.loads(raw)
            except ValueError:
                raise ApiError(400, "The body is not JSON.") from None
            if not isinstance(body, dict):
                raise ApiError(400, "The body must be a JSON object.")
            model = await model_name()
            if body.get("model") != model:
                raise ApiError(404, f"The model {body.get('model')!r} does not exist; this server has {model!r}.",
                               code="model_not_found", param="model")
            if body.get("n", 1) != 1:
                raise ApiError(400, "Only n=1 is supported.", param="n")
            settings = _settings(body, service.settings)
            with tempfile.TemporaryDirectory(prefix="chatbot-api-") as folder:
                messages = _messages(body, Path(folder))
                # Encoding (OCR, speech) is slow: off the event loop. Files are copied to the media folder.
                answer = await anyio.to_thread.run_sync(service.answer, owner, messages, settings)
        except ApiError as error:
            return error.response()
        except UserFacingError as error:
            return ApiError(400, str(error), code="invalid_content").response()

        completion_id, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        count = service.generator.count_tokens

        def finish(reply: str) -> str:
            # Once the reply has ended, its turn says whether the token limit cut it (FinishReason.LENGTH).
            last = answer.conversation.turns[-1]
            return "length" if last.role is Role.ASSISTANT and last.cut else "stop"

        def usage(reply: str) -> dict:
            done = count(reply)
            return {"prompt_tokens": answer.prompt_tokens, "completion_tokens": done,
                    "total_tokens": answer.prompt_tokens + done}

        if not body.get("stream"):
            replies = await anyio.to_thread.run_sync(list, answer.replies)
            reply = (replies[-1] if replies else "").strip()
            return {"id": completion_id, "object": "chat.completion", "created": created, "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                                 "finish_reason": finish(reply), "logprobs": None}],
                    "usage": usage(reply)}

        with_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        async def events() -> AsyncIterator[str]:
            sent = ""
            replies = answer.replies
            try:
                yield _chunk(completion_id, created, model, {"role": "assistant", "content": ""})
                while True:
                    reply = await anyio.to_thread.run_sync(next, replies, None)
                    if reply is None:
                        break
                    if len(reply) > len(sent) and reply.startswith(sent):
                        yield _chunk(completion_id, created, model, {"content": reply[len(sent):]})
                        sent = reply
                yield _chunk(completion_id, created, model, {}, finish(sent))
                if with_usage:
                    yield "data: " + json.dumps({"id": completion_id, "object": "chat.completion.chunk",
                                                 "created": created, "model": model, "choices": [],
                                                 "usage": usage(sent)}) + "\n\n"
                yield "data: [DONE]\n\n"
            finally:
                # The client went away (or all was sent): stop the model and keep what was said.
                service.stop(owner, answer.conversation.id)
                replies.close()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return router
