"""Keeping torch's OpenMP threads spinning: libgomp's state is process-wide.

libgomp (torch's OpenMP runtime, loaded for the whole process) spins at its barriers only while it manages
no more threads than there are CPUs; past that it sleeps and wakes at each one, and the reply model decoded
≈45 % slower (README, "Replies after a recording, and through the page"). Two things gave it more threads:
a thread that ran a parallel torch op and lives on (each keeps an OpenMP worker), and CTranslate2 (Whisper)
running its own team on torch's libgomp.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

_P = ParamSpec("_P")
_R = TypeVar("_R")


def in_passing_thread(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """`fn` run in a thread that ends with each call: for torch work off the reply model's thread.

    A web server's request threads live on, and so would the OpenMP worker such work leaves behind.
    """
    @functools.wraps(fn)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with ThreadPoolExecutor(1, thread_name_prefix=fn.__name__) as thread:
            return thread.submit(fn, *args, **kwargs).result()

    return run


_importing = threading.Lock()


@functools.cache
def import_ctranslate2() -> bool:
    """Import CTranslate2 so that it runs on the OpenMP runtime its wheel bundles; whether it does.

    Loaded as usual on Linux, its OpenMP calls bind to torch's libgomp, already in the process's global
    scope; loaded with RTLD_DEEPBIND, it looks in its own libraries first. The dlopen flags are the whole
    process's, hence the lock. False when CTranslate2 was imported before (run it on one thread then).
    Side effect of DEEPBIND: a malloc swapped in through LD_PRELOAD is bypassed inside CTranslate2.
    """
    if not sys.platform.startswith("linux"):
        return True  # other platforms bind each library to its own dependencies
    with _importing:
        if "ctranslate2" in sys.modules:
            return False
        flags = sys.getdlopenflags()
        sys.setdlopenflags(flags | os.RTLD_DEEPBIND)
        try:
            import ctranslate2  # noqa: F401
        finally:
            sys.setdlopenflags(flags)
        return True
