"""Generation speed and memory of the reply model at matched precision: ours (torch) against llama.cpp.

    python -m bench.bench_generation [--model qwen2.5-0.5b] [--rounds 3]
        [--runtimes int4,llama.cpp-Q4_0,int8,llama.cpp-Q8_0,llama.cpp-shipped]

Ours int4 is compared with llama.cpp on a Q4_0 requantization of the bundled GGUF,
ours int8 with a Q8_0 one (both made once by llama.cpp and cached); the GGUF as
shipped (a Q5_0/Q6_K/Q4_K/Q8_0 mix) and fp32 transformers ("none") are extra rows.
Every runtime gets the same chat-templated prompt as the same token ids, greedy
decoding of exactly N new tokens (end-of-sequence ignored, so all runs do the same
work), the same thread count. Each measurement is a fresh process (load time and
peak RSS belong to that runtime alone), and runtimes alternate round by round
(A B C A B C ...) so a busy neighbour on the shared CPU hits all of them alike;
the table shows medians over the rounds. Our rows load and read the prompt the way
the app does (the cached quantized checkpoint; 64-token chunks into a KV cache, where
llama.cpp reads it in its default 512-token batches). Tokens/s is the decode rate after the first token;
time to first token covers the prompt. The table is printed and written as JSON
under bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench import llama_cpp_peer
from chatbot.weights import CHAT_MODELS

LLAMA_CPP = "llama.cpp-"  # + a FILE_TYPES key, or "shipped" for the bundled file as it is
SHIPPED = "shipped"
# Which llama.cpp file each of our modes is held against (the ratio that counts).
MATCHED = {"int4": LLAMA_CPP + "Q4_0", "int8": LLAMA_CPP + "Q8_0"}
DEFAULT_RUNTIMES = ("int4", LLAMA_CPP + "Q4_0", "int8", LLAMA_CPP + "Q8_0", LLAMA_CPP + SHIPPED)
RESULTS_DIR = Path(__file__).resolve().parent / "results"
QUESTION = {"role": "user", "content": "Write a Python function that checks whether a string is a palindrome, "
                                      "and explain how it works."}


def _long_chat(turns: int = 30) -> list[dict]:
    """A late-conversation prompt (≈1,600 tokens): decoding then also pays for attention over the history."""
    history = []
    for i in range(turns):
        history += [{"role": "user", "content": f"Note {i}: the parcel for customer {i} leaves on day {i % 7 + 1} "
                                                f"from warehouse {chr(65 + i % 5)}. Please confirm."},
                    {"role": "assistant", "content": f"Confirmed: customer {i}'s parcel leaves warehouse "
                                                     f"{chr(65 + i % 5)} on day {i % 7 + 1}. Anything else?"}]
    return history + [QUESTION]


PROMPTS = {"short": [QUESTION], "long": _long_chat()}


class _TokenClock:
    """A `generate` streamer recording when each token arrives (generate first hands over the prompt; skipped)."""

    def __init__(self):
        self.stamps: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if self._prompt_seen:
            self.stamps.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass


def prompt_ids(model_key: str, messages: list[dict]) -> list[int]:
    """The chat-templated prompt as token ids, shared by every runtime."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(CHAT_MODELS[model_key].checkpoint_dir())
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"])


def _timed_generate(model, ids, max_new_tokens: int) -> tuple[float, float]:
    """Read the prompt as the app does (chunks into a KV cache; `generate` reads the last), then decode."""
    import torch

    from chatbot.generation.decode_step import new_cache
    from chatbot.generation.transformers_backend import PREFILL_CHUNK, read_in_chunks

    clock = _TokenClock()
    start = time.perf_counter()
    with torch.inference_mode():
        cache = new_cache(model.config)
        read_in_chunks(model, ids[0, :-PREFILL_CHUNK], cache)
        # eos_token_id=None rather than min_new_tokens: the latter masks the whole vocabulary every step.
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, eos_token_id=None,
                       do_sample=False, temperature=None, top_p=None, top_k=None, past_key_values=cache,
                       pad_token_id=model.generation_config.pad_token_id or 0, streamer=clock)
    stamps = clock.stamps
    return stamps[0] - start, (len(stamps) - 1) / (stamps[-1] - stamps[0])


def measure_transformers(model_key: str, mode: str, ids: list[int], max_new_tokens: int, threads: int,
                         repeats: int) -> dict:
    """Load the model as the app does (quantized checkpoint; fp32 for "none") and time greedy `generate`."""
    import torch
    from transformers import AutoModelForCausalLM

    from chatbot.generation import decode_step
    from chatbot.generation.transformers_backend import load_bundled

    torch.set_num_threads(threads)
    start = time.perf_counter()
    if mode == "none":  # plain transformers, the baseline
        model = AutoModelForCausalLM.from_pretrained(CHAT_MODELS[model_key].checkpoint_dir(), dtype=torch.float32)
    else:
        model = load_bundled(model_key, mode)
        decode_step.attach(model)
    load_s = time.perf_counter() - start
    batch = torch.tensor([ids])
    _timed_generate(model, batch, 4)  # warm-up: first-call costs are not decoding speed
    runs = [_timed_generate(model, batch, max_new_tokens) for _ in range(repeats)]
    return {"load_s": load_s, "ttft_s": [r[0] for r in runs], "tok_s": [r[1] for r in runs]}


def gguf_file(model_key: str, variant: str) -> Path:
    shipped = CHAT_MODELS[model_key].gguf_path()
    return shipped if variant == SHIPPED else llama_cpp_peer.requantized(shipped, variant)


def measure(runtime: str, model_key: str, ids: list[int], max_new_tokens: int, threads: int, repeats: int) -> dict:
    """Time one runtime in this process; adds the process's peak RSS."""
    if runtime.startswith(LLAMA_CPP):
        path = gguf_file(model_key, runtime.removeprefix(LLAMA_CPP))
        result = llama_cpp_peer.measure(path, ids, max_new_tokens, threads, repeats)
        result["file_mb"] = path.stat().st_size / 1e6
    else:
        result = measure_transformers(model_key, runtime, ids, max_new_tokens, threads, repeats)
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def peak_rss_mb() -> float:
    """This process's peak resident memory since it started (VmHWM). Not getrusage's ru_maxrss: a child
    process inherits its parent's peak through fork and exec, so every worker reported the parent's."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure_in_subprocess(runtime: str, model_key: str, ids: list[int], max_new_tokens: int, threads: int,
                          repeats: int) -> dict:
    """`measure` in a fresh interpreter, so load time and peak memory are not shared between runtimes."""
    job = {"runtime": runtime, "model_key": model_key, "ids": ids, "max_new_tokens": max_new_tokens,
           "threads": threads, "repeats": repeats}
    done = subprocess.run([sys.executable, "-m", "bench.bench_generation", "--worker"], input=json.dumps(job),
                          capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parent.parent)
    return json.loads(done.stdout.strip().splitlines()[-1])


def label(runtime: str) -> str:
    if runtime.startswith(LLAMA_CPP):
        variant = runtime.removeprefix(LLAMA_CPP)
        return f"llama.cpp, {'GGUF as shipped' if variant == SHIPPED else variant}"
    return "transformers fp32" if runtime == "none" else f"ours, {runtime}"


def summarise(runtime: str, rounds: list[dict]) -> dict:
    """Medians over the rounds (each round: one fresh process; its own runs' median first)."""
    med = lambda key: statistics.median(statistics.median(r[key]) if isinstance(r[key], list) else r[key]  # noqa: E731
                                        for r in rounds)
    return {"runtime": label(runtime), "mode": runtime, "rounds": len(rounds), "load_s": med("load_s"),
            "ttft_s": med("ttft_s"), "tok_s": med("tok_s"), "tok_s_each": [statistics.median(r["tok_s"]) for r in rounds],
            "peak_rss_mb": med("peak_rss_mb"), "raw": rounds}


def add_ratios(rows: list[dict]) -> None:
    """Each of our rows against its matched-precision llama.cpp row: tokens/s and peak RSS (None if not run)."""
    by_mode = {r["mode"]: r for r in rows}
    for row in rows:
        peer = by_mode.get(MATCHED.get(row["mode"], ""))
        row["matched_peer"] = peer["runtime"] if peer else None
        row["tok_s_vs_peer"] = row["tok_s"] / peer["tok_s"] if peer else None
        row["rss_vs_peer"] = row["peak_rss_mb"] / peer["peak_rss_mb"] if peer else None


def format_table(rows: list[dict]) -> str:
    header = (f"{'runtime':<26} {'load s':>7} {'TTFT ms':>8} {'tok/s':>7} {'peak RSS MB':>12} "
              f"{'tok/s vs matched llama.cpp':>27} {'RSS vs matched':>15}")
    lines = [header, "-" * len(header)]
    for r in rows:
        speed = f"{r['tok_s_vs_peer']:.2f}x" if r["tok_s_vs_peer"] else "-"
        memory = f"{r['rss_vs_peer']:.2f}x" if r["rss_vs_peer"] else "-"
        lines.append(f"{r['runtime']:<26} {r['load_s']:>7.1f} {r['ttft_s'] * 1e3:>8.0f} {r['tok_s']:>7.1f} "
                     f"{r['peak_rss_mb']:>12.0f} {speed:>27} {memory:>15}")
    return "\n".join(lines)


def run(runtimes: list[str], model_key: str, prompt: str, max_new_tokens: int, threads: int,
        rounds: int, repeats: int) -> list[dict]:
    ids = prompt_ids(model_key, PROMPTS[prompt])
    for runtime in runtimes:  # made once and cached, outside the timed rounds
        if runtime.startswith(LLAMA_CPP):
            gguf_file(model_key, runtime.removeprefix(LLAMA_CPP))
        elif runtime != "none":
            measure_in_subprocess(runtime, model_key, ids, 2, threads, 1)  # first start: quantize once
    results: dict[str, list[dict]] = {r: [] for r in runtimes}
    for index in range(rounds):
        for runtime in runtimes:
            print(f"... round {index + 1}/{rounds}: {runtime}", file=sys.stderr, flush=True)
            results[runtime].append(measure_in_subprocess(runtime, model_key, ids, max_new_tokens, threads, repeats))
    rows = [summarise(runtime, results[runtime]) for runtime in runtimes]
    add_ratios(rows)
    return rows


def write_results(rows: list[dict], settings: dict) -> Path:
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"generation-{time.strftime('%Y%m%d-%H%M%S')}.json"
    from importlib.metadata import version

    path.write_text(json.dumps({"settings": settings, "torch": version("torch"), "rows": rows}, indent=2))
    return path


def _worker() -> None:
    job = json.loads(sys.stdin.read())
    print(json.dumps(measure(**job)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-0.5b", choices=sorted(CHAT_MODELS))
    parser.add_argument("--runtimes", default=",".join(DEFAULT_RUNTIMES),
                        help="comma-separated: quantize modes (none = fp32) and/or llama.cpp-Q4_0, llama.cpp-Q8_0, "
                             "llama.cpp-shipped")
    parser.add_argument("--prompt", default="short", choices=sorted(PROMPTS),
                        help="short: one question; long: the same question after 30 earlier turns")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per runtime, alternating")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs inside each process")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker()
    settings = {"model": args.model, "prompt": args.prompt, "max_new_tokens": args.max_new_tokens,
                "threads": args.threads, "rounds": args.rounds, "repeats": args.repeats,
                "load_average": os.getloadavg()}
    rows = run(args.runtimes.split(","), args.model, args.prompt, args.max_new_tokens, args.threads, args.rounds,
               args.repeats)
    settings["load_average_after"] = os.getloadavg()
    print(format_table(rows))
    print(f"load average before/after: {settings['load_average']} / {settings['load_average_after']}")
    print(f"written to {write_results(rows, settings)}")


if __name__ == "__main__":
    main()
