"""This process's memory footprint: the C heap's arenas and free pages, and library pages it never runs.

glibc gives threads their own malloc arenas (up to 8 per core) and keeps freed memory for reuse:
after a photo's OCR or a recording's transcription, the pages of their temporary buffers stayed
counted as this process's memory. torch's PyPI wheel links its CUDA libraries even on a machine
without a GPU; loading them maps ≈130 MB of their code and constants that never run again.
Outside Linux with glibc these calls do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import re
from pathlib import Path

_M_ARENA_MAX = -8  # mallopt parameter, from glibc's malloc.h
_MADV_DONTNEED = 4
# The CUDA libraries of torch's wheel (nvidia-* packages, torch's own CUDA parts).
_CUDA_LIBRARY = re.compile(r"/nvidia/|/lib(torch_cuda|c10_cuda|caffe2_nvrtc|torch_nvshmem)[^/]*\.so")


@functools.cache
def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    if not all(hasattr(libc, name) for name in ("malloc_trim", "mallopt", "madvise")):
        return None
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def limit_arenas(arenas: int = 2) -> None:
    """At most `arenas` malloc arenas for threads started from now on (the app's model and request threads)."""
    if (libc := _libc()) is not None:
        libc.mallopt(_M_ARENA_MAX, arenas)


def give_back() -> None:
    """Return the heap's free pages to the system (after a photo or recording was analysed)."""
    if (libc := _libc()) is not None:
        libc.malloc_trim(0)


def drop_cuda_library_pages() -> int:
    """Unmap the pages of torch's CUDA libraries that only their start-up touched; the bytes dropped.

    Only read-only file pages are dropped (code and constants, none the process changed): should any
    of it run after all, the kernel reads it back from the file. Call it after `import torch`.
    """
    libc, smaps = _libc(), Path("/proc/self/smaps")
    if libc is None or not smaps.exists():
        return 0
    dropped = 0
    for start, end, perms, path, resident_kb, changed_kb in _mappings(smaps):
        if _CUDA_LIBRARY.search(path) and "w" not in perms and changed_kb == 0 and resident_kb:
            if libc.madvise(start, end - start, _MADV_DONTNEED) == 0:
                dropped += resident_kb * 1024
    return dropped


def _mappings(smaps: Path) -> list[tuple[int, int, str, str, int, int]]:
    """(start, end, permissions, file, resident kB, privately changed kB) for each mapping in `smaps`."""
    found: list[list] = []
    for line in smaps.read_text().splitlines():
        fields = line.split()
        if re.fullmatch(r"[0-9a-f]+-[0-9a-f]+", fields[0]):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            found.append([start, end, fields[1], fields[5] if len(fields) > 5 else "", 0, 0])
        elif fields[0] == "Rss:":
            found[-1][4] = int(fields[1])
        elif fields[0] == "Anonymous:":
            found[-1][5] = int(fields[1])
    return [tuple(m) for m in found]
