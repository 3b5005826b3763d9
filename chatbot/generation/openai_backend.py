"""Replies from any OpenAI-compatible server: vLLM, TGI, Ollama, llama.cpp's server, LM Studio,
or another copy of this app (`--text-backend openai --base-url URL --remote-model NAME`).

The dialogue state is rendered here as for a local model (within `--max-context`
tokens, counted with a cheap estimate: the server's tokenizer is not ours to call)
and sent as chat messages; the reply streams back. Stopping closes the HTTP
stream, which is how these servers learn to stop generating. No torch here.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Generator
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import openai

from chatbot.errors import UserFacingError
from chatbot.generation.base import FinishReason, GenerationSettings, done, prompt_budget
from chatbot.state import Message

if TYPE_CHECKING:
    from chatbot.config import Config

# Tokenizers of current chat models average ~4 characters per token in English; 3 overestimates,
# so the rendered history stays within the server's context for most text.
CHARS_PER_TOKEN = 3
CONNECT_SECONDS = 10.0
READ_SECONDS = 300.0  # a busy server may queue a request for a while before its first token


class OpenAIGenerator:
    """A `ReplyGenerator` backed by a remote OpenAI-compatible chat completions endpoint."""

    reads_notes = False  # the server sees the history as the conversation has it (see base.ReplyGenerator)

    def __init__(self, base_url: str, model: str, api_key: str | None = None, context_tokens: int = 2048):
        self.name = model
        self.base_url = base_url
        self.context_tokens = context_tokens
        # No retries: a failure becomes a message in the chat at once, and the user decides.
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or "none", max_retries=0,
                                    timeout=httpx.Timeout(READ_SECONDS, connect=CONNECT_SECONDS))

    @classmethod
    def from_config(cls, config: Config) -> OpenAIGenerator:
        key = None
        if config.api_key_file:
            try:
                key = Path(config.api_key_file).read_text().strip()
            except OSError as error:
                raise UserFacingError(f"Cannot read the API key file {config.api_key_file}: {error}") from error
        return cls(config.base_url, config.remote_model, key, config.max_context)

    def count_tokens(self, text: str) -> int:
        return math.ceil(len(text) / CHARS_PER_TOKEN)

    def prompt_budget(self, settings: GenerationSettings) -> int:
        return prompt_budget(self.context_tokens, settings)

    def prefill(self, messages: list[Message], conversation: str | None = None) -> Future:
        return done()  # the server keeps its own caches

    def stream(self, messages: list[Message], settings: GenerationSettings, stop: threading.Event | None = None,
               conversation: str | None = None) -> Generator[str, None, FinishReason | None]:
        sampling = {"temperature": settings.temperature}
        if settings.temperature > 0:
            sampling["top_p"] = settings.top_p
        try:
            response = self.client.chat.completions.create(
                model=self.name, messages=[{"role": m.role.value, "content": m.content} for m in messages],
                max_tokens=settings.max_new_tokens, stop=list(settings.stop) or None, stream=True, **sampling)
            finish = None
            with response:  # leaving it (stop, or the consumer gone) closes the HTTP stream
                for chunk in response:
                    if stop is not None and stop.is_set():
                        return FinishReason.STOP
                    for choice in chunk.choices:
                        if choice.delta and choice.delta.content:
                            yield choice.delta.content
                        finish = choice.finish_reason or finish
            # "length": the server hit max_tokens, so the reply is cut and may be continued.
            return FinishReason.LENGTH if finish == "length" else FinishReason.STOP if finish else None
        except openai.APIConnectionError as error:
            raise UserFacingError(f"The reply server at {self.base_url} cannot be reached ({error}). "
                                  "Your conversation is safe; try again when it is back.") from error
        except openai.APIStatusError as error:
            raise UserFacingError(f"The reply server at {self.base_url} refused the request "
                                  f"({error.status_code}: {_message(error)}). Your conversation is safe.") from error


def _message(error: openai.APIStatusError) -> str:
    body = error.body if isinstance(error.body, dict) else {}
    inner = body.get("error", body) if isinstance(body.get("error", body), dict) else body
    return str(inner.get("message") or error.message)
