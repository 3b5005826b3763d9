"""A reply generator with no model: it streams canned words. Registered as the `canned` backend,
it shows that a new generator is one class registered in one place, and runs the service and
page tests in milliseconds."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Generator
from concurrent.futures import Future

from chatbot.generation.base import FinishReason, GenerationSettings, done, prompt_budget, register
from chatbot.state import Message, Role

WORDS = "thanks for your message about".split()


class CannedGenerator:
    """Each reply: a few fixed words, then the last user message's words, one word per token.

    A trailing assistant message (a reply to continue) goes on from where it stopped."""

    reads_notes = True

    name = "canned"

    def __init__(self, context_tokens: int = 1024, seconds_per_token: float = 0.0):
        self.context_tokens = context_tokens
        self.seconds_per_token = seconds_per_token  # browser tests slow it down to watch a reply run
        self.prompts: list[list[Message]] = []  # what it was asked, for tests to check

    @classmethod
    def from_config(cls, config) -> CannedGenerator:
        return cls(config.max_context, float(os.environ.get("CANNED_SECONDS_PER_TOKEN", "0")))

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def prompt_budget(self, settings: GenerationSettings) -> int:
        return prompt_budget(self.context_tokens, settings)

    def stream(self, messages: list[Message], settings: GenerationSettings, stop: threading.Event | None = None,
               conversation: str | None = None) -> Generator[str, None, FinishReason]:
        self.prompts.append(list(messages))
        asked = next((m.content.split() for m in reversed(messages) if m.role is Role.USER), []) or ["nothing"]
        reply = WORDS + asked
        start = len(messages[-1].content.split()) if messages and messages[-1].role is Role.ASSISTANT else 0
        for i, word in enumerate(reply[start:start + settings.max_new_tokens]):
            if stop is not None and stop.is_set():
                return FinishReason.STOP
            time.sleep(self.seconds_per_token)
            yield word if i + start == 0 else " " + word
        return FinishReason.LENGTH if len(reply) - start > settings.max_new_tokens else FinishReason.STOP

    def prefill(self, messages: list[Message], conversation: str | None = None) -> Future:
        return done()


register("canned", CannedGenerator)
