"""chatbot.footprint: memory the app no longer needs goes back to the system, not kept in the process."""

import subprocess
import sys
from pathlib import Path

import pytest

from chatbot import footprint

pytestmark = pytest.mark.skipif(footprint._libc() is None, reason="Linux with glibc only")


def _resident_kb(field: str = "VmRSS") -> int:
    return int(next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(f"{field}:")).split()[1])


def test_freed_heap_memory_is_given_back():
    blocks = [bytes(2000) + bytes([i % 256]) for i in range(100_000)]  # ≈200 MB of small heap blocks
    keep = blocks[-1]  # a live block at the top: malloc alone never returns the freed pages under it
    del blocks
    before = _resident_kb()
    footprint.give_back()
    assert before - _resident_kb() > 100 * 1024
    assert keep[-1] == 99_999 % 256


def test_the_cuda_libraries_pages_are_dropped_and_torch_still_works():
    import torch

    def cuda_resident_kb() -> int:
        return sum(m[4] for m in footprint._mappings(Path("/proc/self/smaps")) if footprint._CUDA_LIBRARY.search(m[3])
                   and "w" not in m[2] and m[5] == 0)

    if cuda_resident_kb() == 0:
        pytest.skip("no CUDA library pages resident (a CPU-only torch, or dropped already)")
    assert footprint.drop_cuda_library_pages() > 0
    assert cuda_resident_kb() < 8 * 1024  # a few pages may come back (another thread, torch.cuda queries)
    assert torch.equal(torch.ones(64, 64) @ torch.ones(64, 64), torch.full((64, 64), 64.0))
    assert torch.cuda.is_available() in (True, False)


def test_the_reply_backend_keeps_triton_out():
    """Triton (GPU kernels, 50 MB) is marked absent before anything imports torch's compiler stack."""
    code = ("import sys, chatbot.generation.transformers_backend, chatbot.generation.decode_step; "
            "print(sys.modules.get('triton', 'never imported'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.split()[-1] == "None", out.stdout
