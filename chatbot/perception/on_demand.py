"""Models loaded at their first use and let go after a while unused.

Whisper and the photo models hold ≈0.25 GB and take seconds to load, for turns many chats never
have (or have once): loading them at start made every start slower and every chat bigger. An
`OnDemand` loads its model when a turn first needs it (concurrent first uses wait for the one
load), and drops it once `release_after` seconds pass with no use, so a long text-only stretch
of a chat does not carry them. Models of different groups (the photo models, Whisper) are not kept
side by side: loading one group first drops the others that are idle, since a photo's or a
recording's working memory on top of both made the app's peak.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

from chatbot import footprint

log = logging.getLogger(__name__)

T = TypeVar("T")

_EVERY: weakref.WeakSet[OnDemand] = weakref.WeakSet()  # each OnDemand alive, so a load can drop other groups' idle models


class OnDemand(Generic[T]):
    """`load()` run at the first `use()`; the result shared by every user and released when idle.

    `release_after`: seconds without use after which the model is dropped (the next use loads it
    again); None keeps it once loaded. A load that fails keeps nothing: the next use tries again.
    `group`: models used together (a photo's analysers); loading this one drops idle models of other groups.
    """

    def __init__(self, load: Callable[[], T], *, name: str, release_after: float | None = None,
                 group: str | None = None) -> None:
        self.name = name
        self.group = group or name
        self._load = load
        self.release_after = release_after
        self._model: T | None = None
        self._users = 0
        self._last_use = 0.0
        self._timer: threading.Timer | None = None
        self._state = threading.Lock()  # guards the fields above; never held while loading
        self._loading = threading.Lock()  # one load at a time: concurrent first uses wait for it
        self.loads = 0  # how many times the model was loaded (the log and tests read it)
        _EVERY.add(self)

    @property
    def loaded(self) -> bool:
        return self._model is not None

    @contextmanager
    def use(self) -> Iterator[T]:
        """The model, loaded if it is not; it is not released while any `use` is open."""
        model = self._acquire()
        try:
            yield model
        finally:
            self._finished()

    def _acquire(self) -> T:
        with self._loading:
            with self._state:
                if self._model is not None:
                    self._users += 1
                    return self._model
            for other in list(_EVERY):
                if other.group != self.group:
                    other.release()  # only if idle: one in use stays
            start = time.perf_counter()
            model = self._load()
            with self._state:
                self._model, self.loads = model, self.loads + 1
                self._users += 1
            log.info("Loaded %s on first use (%.1f s)", self.name, time.perf_counter() - start)
            return model

    def _finished(self) -> None:
        with self._state:
            self._users -= 1
            self._last_use = time.monotonic()
            if self._users or self.release_after is None:
                return
            if self._timer is not None:
                self._timer.cancel()
            # A daemon thread: a pending release must not keep the process from exiting.
            self._timer = threading.Timer(self.release_after, self._expire)
            self._timer.daemon = True
            self._timer.start()

    def _expire(self) -> None:
        # A use that began and ended since this timer started re-armed a later one: this one then does nothing.
        self.release(unused_for=self.release_after)

    def release(self, unused_for: float = 0.0) -> bool:
        """Drop the model if nobody uses it and nobody did for `unused_for` seconds; whether it was dropped."""
        with self._state:
            if self._model is None or self._users or time.monotonic() - self._last_use < unused_for:
                return False
            self._model = None
        gc.collect()  # model objects can sit in reference cycles (torch modules): free them now, not later
        footprint.give_back()
        log.info("Released %s (the next use loads it again)", self.name)
        return True
