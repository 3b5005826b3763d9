"""llama.cpp as a benchmark peer: the speed our torch stack is measured against.

llama-cpp-python ships no CPU wheel for this platform on PyPI, so it is compiled
from its source release once (≈12 min on 2 cores) into a wheel cache, and
installed into the running environment only when a benchmark asks for it.
It is never a dependency of the app and is not in requirements.txt.

    python -m bench.llama_cpp_peer build     # compile the wheel (slow, once)
    python -m bench.llama_cpp_peer install   # build if needed, then pip install it
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from chatbot.weights import cache_root, prepared

VERSION = "0.3.36"
# Native SIMD (AVX-512/VNNI here) is what makes llama.cpp fast; the multimodal
# (mtmd) library is not needed to decode text and would double the compile time.
CMAKE_ARGS = "-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF"
_NICE = 10  # the build shares 2 cores with other people's work


def wheel_dir() -> Path:
    return cache_root() / "bench-wheels"


def find_wheel() -> Path | None:
    found = sorted(wheel_dir().glob(f"llama_cpp_python-{VERSION}-*.whl"))
    return found[-1] if found else None


def build_wheel() -> Path:
    """Compile llama-cpp-python from its PyPI source release once; returns the cached wheel."""
    if wheel := find_wheel():
        return wheel
    wheel_dir().mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, CMAKE_ARGS=CMAKE_ARGS, CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 1))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-binary", "llama-cpp-python",
         f"llama-cpp-python=={VERSION}", "-w", str(wheel_dir())],
        env=env, check=True, preexec_fn=lambda: os.nice(_NICE),
    )
    wheel = find_wheel()
    if wheel is None:
        raise RuntimeError(f"pip wheel finished but left no llama-cpp-python wheel in {wheel_dir()}")
    return wheel


def ensure_installed() -> None:
    """Make `import llama_cpp` work in this interpreter, building the wheel first if needed."""
    try:
        import llama_cpp  # noqa: F401
        return
    except ImportError:
        pass
    subprocess.run([sys.executable, "-m", "pip", "install", str(build_wheel())], check=True)


# GGUF file types to requantize the bundled model to, for comparisons at matched precision. The bundled file
# mixes Q5_0, Q6_K, Q4_K and Q8_0 tensors; Q4_K_M would fall back on most of them (896 columns are not a
# multiple of 256), so the plain block formats are the ones both runtimes can match.
FILE_TYPES = {"Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0"}


def requantized(source: Path, file_type: str) -> Path:
    """`source` requantized to `file_type` (a FILE_TYPES key) by llama.cpp itself, made once and cached."""
    import ctypes

    def build(folder: Path) -> None:
        ensure_installed()
        import llama_cpp

        folder.mkdir(parents=True)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, FILE_TYPES[file_type])
        params.allow_requantize = True
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(folder / source.name).encode(),
                                                ctypes.byref(params))
        if status != 0:
            raise RuntimeError(f"llama.cpp could not requantize {source.name} to {file_type} (status {status})")

    return prepared(cache_root() / f"bench-{source.stem}-{file_type}", build) / source.name


def _timed_greedy(llm, prompt_ids: list[int], max_new_tokens: int) -> tuple[float, float]:
    """(time to first token, decode tokens/s) for one greedy run that ignores end-of-sequence."""
    llm.reset()  # otherwise the previous run's KV cache makes the prompt free
    start = time.perf_counter()
    stamps = []
    for _ in llm.generate(prompt_ids, top_k=1, temp=0.0, reset=True):
        stamps.append(time.perf_counter())
        if len(stamps) == max_new_tokens:
            break
    return stamps[0] - start, (len(stamps) - 1) / (stamps[-1] - stamps[0])


def measure(gguf_path: Path, prompt_ids: list[int], max_new_tokens: int, n_threads: int,
            repeats: int) -> dict:
    """Load the GGUF and time greedy decoding of the given (already chat-templated) token ids.

    Taking token ids rather than text guarantees both runtimes see the very same prompt.
    Returns load_s plus per-repeat ttft_s and tok_s lists (after one short warm-up run).
    """
    ensure_installed()
    from llama_cpp import Llama

    start = time.perf_counter()
    llm = Llama(model_path=str(gguf_path), n_ctx=2048, n_threads=n_threads,
                n_threads_batch=n_threads, verbose=False)
    load_s = time.perf_counter() - start
    _timed_greedy(llm, prompt_ids, 4)
    runs = [_timed_greedy(llm, prompt_ids, max_new_tokens) for _ in range(repeats)]
    return {"load_s": load_s, "ttft_s": [r[0] for r in runs], "tok_s": [r[1] for r in runs]}


def main(argv: list[str] | None = None) -> None:
    command = (argv or sys.argv[1:] or ["build"])[0]
    if command == "build":
        print(build_wheel())
    elif command == "install":
        ensure_installed()
    else:
        raise SystemExit(f"usage: python -m bench.llama_cpp_peer [build|install], not {command!r}")


if __name__ == "__main__":
    main()
