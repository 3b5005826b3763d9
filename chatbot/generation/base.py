"""What the conversation layer needs from a reply model, and the registry that picks one.

The service only ever talks to a `ReplyGenerator`: it renders the dialogue state
into messages, asks how many tokens they cost, and streams a reply. Nothing here
imports torch, so a remote backend (any OpenAI-compatible server) or a test
double is one class registered in `BACKENDS`, exactly like the built-in
transformers one.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Callable, Generator
from concurrent.futures import Future
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from chatbot.errors import UserFacingError
from chatbot.state import Message

if TYPE_CHECKING:
    from chatbot.config import Config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationSettings:
    # Defaults chosen on `python -m bench.quality` (README): greedy recalled facts reliably where
    # sampling at 0.7 made a 0.5B model forget them now and then.
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 means greedy decoding
    top_p: float = 0.9
    repetition_penalty: float = 1.1
    # The DRY penalty over the reply's own tokens (0 turns it off): a token that would extend a copy of an
    # earlier run of n >= dry_allowed_length reply tokens loses dry_multiplier * dry_base ** (n - allowed).
    dry_multiplier: float = 0.8
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    # Strings that end a reply where they appear (not included); the service cuts at them for every
    # backend, a remote backend also hands them to its server.
    stop: tuple[str, ...] = ()
    # Within this many tokens of the limit (at most its last quarter), the reply ends at the first sentence end.
    sentence_tail: int = 48

    def generate_kwargs(self) -> dict:
        """The settings as transformers' `generate` takes them."""
        sampling = self.temperature > 0
        kwargs = dict(max_new_tokens=self.max_new_tokens, do_sample=sampling,
                      repetition_penalty=self.repetition_penalty)
        if sampling:
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        else:
            # Explicitly unset sampling knobs a checkpoint's generation_config may carry.
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs


class FinishReason(str, Enum):
    """Why a reply ended; `stream` returns it as its generator's value (None: the backend cannot tell)."""

    STOP = "stop"  # the model ended it (or the caller's stop event did)
    LENGTH = "length"  # it reached max_new_tokens: the reply is cut and may be continued


@runtime_checkable
class ReplyGenerator(Protocol):
    """A loaded language model that streams replies to a list of messages."""

    name: str
    context_tokens: int  # prompt plus reply must fit in this many tokens
    # Whether the newest message may carry the tracked-state notes. A block that changes every turn
    # makes a remote server see an edited history each time (this app then starts a new
    # conversation; vLLM/llama.cpp lose their prefix cache), so remote backends say False.
    reads_notes: bool

    def count_tokens(self, text: str) -> int:
        """Tokens `text` costs in a prompt (used to fit the conversation into the budget)."""

    def prompt_budget(self, settings: GenerationSettings) -> int:
        """How many tokens the rendered conversation may take, leaving room for the reply."""

    def stream(self, messages: list[Message], settings: GenerationSettings, stop: threading.Event | None = None,
               conversation: str | None = None) -> Generator[str, None, FinishReason | None]:
        """Yield the reply in pieces as it is generated; setting `stop` ends it at the next token.

        When `messages` end with an assistant message, continue that message (no new reply header).
        Return the FinishReason (the generator's return value). `conversation` names the conversation
        the messages come from (backends that keep caches per conversation use it).
        """

    def prefill(self, messages: list[Message], conversation: str | None = None) -> Future:
        """Start reading a prompt prefix ahead of time (backends without a cache do nothing)."""


def prompt_budget(context_tokens: int, settings: GenerationSettings) -> int:
    """The usual budget: the context less the reply's room (never below a short prompt)."""
    return max(64, context_tokens - settings.max_new_tokens)


def done() -> Future:
    """An already finished future, for backends with nothing to read ahead."""
    future: Future = Future()
    future.set_result(None)
    return future


class Backend(Protocol):
    """A class that can build a generator from the app's settings."""

    @classmethod
    def from_config(cls, config: Config) -> ReplyGenerator: ...


# The one place backends are named. Values are "module:Class" strings, imported only when chosen,
# so choosing a remote backend never imports torch; tests and plugins add classes with `register`.
BACKENDS: dict[str, str | type] = {
    "transformers": "chatbot.generation.transformers_backend:TransformersGenerator",
    "openai": "chatbot.generation.openai_backend:OpenAIGenerator",
}


def register(name: str, backend: type) -> None:
    BACKENDS[name] = backend


def backend(name: str) -> type:
    """The backend class registered as `name`."""
    try:
        entry = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown text backend {name!r}; choose one of {', '.join(sorted(BACKENDS))}") from None
    if isinstance(entry, str):
        module, _, cls = entry.partition(":")
        entry = BACKENDS[name] = getattr(importlib.import_module(module), cls)
    return entry


def load_generator(config: Config) -> ReplyGenerator:
    return backend(config.text_backend).from_config(config)


class LoadingGenerator:
    """A reply model that loads in a background thread; every use waits until it is loaded.

    The app serves its page while the model (and torch, transformers) load: a message sent
    meanwhile is stored at once and its reply waits, as an API request does. Attributes and
    methods are the loaded generator's (reading one waits for it).
    """

    def __init__(self, load: Callable[[], ReplyGenerator]) -> None:
        self._load = load
        self._loaded = threading.Event()
        self._generator: ReplyGenerator | None = None
        self._error: UserFacingError | None = None

    @property
    def ready(self) -> bool:
        """Whether loading ended (loaded or failed): uses no longer wait."""
        return self._loaded.is_set()

    def load(self) -> ReplyGenerator | None:
        """Load the model (in the thread that is to wait for it); None, and each use says why, if it failed."""
        try:
            self._generator = self._load()
        except UserFacingError as error:
            self._error = error
        except Exception as error:  # noqa: BLE001 - shown to whoever waits, not lost in a thread
            log.exception("Loading the text model failed")
            self._error = UserFacingError(f"The text model could not be loaded ({type(error).__name__}: {error}).")
        finally:
            self._loaded.set()
        return self._generator

    @property
    def error(self) -> UserFacingError | None:
        return self._error

    def wait(self) -> ReplyGenerator:
        """The loaded generator, once it is (UserFacingError if loading failed)."""
        self._loaded.wait()
        if self._generator is None:
            raise UserFacingError(str(self._error))
        return self._generator

    def __getattr__(self, name: str):
        if name.startswith("_"):  # private fields (copy/pickle probe them before __init__): never wait
            raise AttributeError(name)
        return getattr(self.wait(), name)


def loading(generator: ReplyGenerator) -> bool:
    """Whether replies from `generator` still wait for its model to load."""
    return isinstance(generator, LoadingGenerator) and not generator.ready
