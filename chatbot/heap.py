"""The C heap (glibc malloc) of this process: fewer arenas, and free memory handed back after big transient work.

glibc gives threads their own malloc arenas (up to 8 per core) and keeps freed memory for reuse:
after a photo's OCR or a recording's transcription, the pages of their temporary buffers stayed
counted as this process's memory. Elsewhere than glibc (musl, macOS) these calls do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

_M_ARENA_MAX = -8  # mallopt parameter, from glibc's malloc.h


@functools.cache
def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


def limit_arenas(arenas: int = 2) -> None:
    """At most `arenas` malloc arenas for threads started from now on (the app's model and request threads)."""
    if (libc := _libc()) is not None:
        libc.mallopt(_M_ARENA_MAX, arenas)


def give_back() -> None:
    """Return the heap's free pages to the system (after a photo or recording was analysed)."""
    if (libc := _libc()) is not None:
        libc.malloc_trim(0)
