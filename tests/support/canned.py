"""A reply generator with no model: it streams canned words. Registered as the `canned` backend,
it shows that a new generator is one class registered in one place, and runs the service and
page tests in milliseconds."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import Future

from chatbot.generation.base import GenerationSettings, done, prompt_budget, register
from chatbot.state import Message, Role

WORDS = "thanks for your message about".split()


class CannedGenerator:
    """Each reply: a few fixed words, then the last user message's words over and over, one per token."""

    name = "canned"

    def __init__(self, context_tokens: int = 512):
        self.context_tokens = context_tokens
        self.prompts: list[list[Message]] = []  # what it was asked, for tests to check

    @classmethod
    def from_config(cls, config) -> CannedGenerator:
        return cls(config.max_context)

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def prompt_budget(self, settings: GenerationSettings) -> int:
        return prompt_budget(self.context_tokens, settings)

    def stream(self, messages: list[Message], settings: GenerationSettings,
               stop: threading.Event | None = None) -> Iterator[str]:
        self.prompts.append(list(messages))
        asked = next((m.content.split() for m in reversed(messages) if m.role is Role.USER), []) or ["nothing"]
        for i in range(settings.max_new_tokens):
            if stop is not None and stop.is_set():
                return
            word = WORDS[i] if i < len(WORDS) else asked[(i - len(WORDS)) % len(asked)]
            yield word if i == 0 else " " + word

    def prefill(self, messages: list[Message]) -> Future:
        return done()


register("canned", CannedGenerator)
