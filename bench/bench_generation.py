"""Generation speed of the reply model: transformers (fp32 and each quantize mode) against llama.cpp.

    python -m bench.bench_generation [--model qwen2.5-0.5b] [--runtimes none,int8,int4,llama.cpp]

Every runtime gets the same chat-templated prompt as the same token ids, greedy
decoding of exactly N new tokens (end-of-sequence is ignored so all runs do the
same work), the same thread count, and a fresh process so that load time and
peak RSS belong to that runtime alone. Tokens/s is the decode rate after the
first token; time to first token covers the prompt. The table is printed and
written as JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers.generation.streamers import BaseStreamer

from bench import llama_cpp_peer
from chatbot.weights import CHAT_MODELS

LLAMA_CPP = "llama.cpp"
TORCH_RUNTIMES = ("none", "int8", "int4")  # quantize() modes
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


class _TokenClock(BaseStreamer):
    """Records when each generated token arrives (generate first hands over the prompt; skipped)."""

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


def _timed_generate(model, ids: torch.Tensor, max_new_tokens: int) -> tuple[float, float]:
    clock = _TokenClock()
    start = time.perf_counter()
    with torch.inference_mode():
        # eos_token_id=None rather than min_new_tokens: the latter masks the whole vocabulary every step.
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, eos_token_id=None,
                       do_sample=False, temperature=None, top_p=None, top_k=None,
                       pad_token_id=model.generation_config.pad_token_id or 0, streamer=clock)
    stamps = clock.stamps
    return stamps[0] - start, (len(stamps) - 1) / (stamps[-1] - stamps[0])


def measure_transformers(model_key: str, mode: str, ids: list[int], max_new_tokens: int, threads: int,
                         repeats: int) -> dict:
    """Load the converted checkpoint, quantize it with `mode`, and time greedy `generate`."""
    from transformers import AutoModelForCausalLM

    from chatbot.generation import decode_step
    from chatbot.generation.quantize import quantize

    torch.set_num_threads(threads)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(CHAT_MODELS[model_key].checkpoint_dir(), dtype=torch.float32)
    loaded = time.perf_counter()
    model = quantize(model.eval(), mode)
    if mode != "none":  # the app's path; "none" stays plain transformers, the baseline
        decode_step.attach(model)
    load_s = time.perf_counter() - start
    batch = torch.tensor([ids])
    runs = [_timed_generate(model, batch, max_new_tokens) for _ in range(repeats)]
    return {"load_s": load_s, "quantize_s": load_s - (loaded - start),
            "ttft_s": [r[0] for r in runs], "tok_s": [r[1] for r in runs]}


def measure(runtime: str, model_key: str, ids: list[int], max_new_tokens: int, threads: int, repeats: int) -> dict:
    """Time one runtime in this process; adds the process's peak RSS."""
    if runtime == LLAMA_CPP:
        result = llama_cpp_peer.measure(CHAT_MODELS[model_key].gguf_path(), ids, max_new_tokens, threads, repeats)
    else:
        result = measure_transformers(model_key, runtime, ids, max_new_tokens, threads, repeats)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    return result


def measure_in_subprocess(runtime: str, model_key: str, ids: list[int], max_new_tokens: int, threads: int,
                          repeats: int) -> dict:
    """`measure` in a fresh interpreter, so load time and peak memory are not shared between runtimes."""
    job = {"runtime": runtime, "model_key": model_key, "ids": ids, "max_new_tokens": max_new_tokens,
           "threads": threads, "repeats": repeats}
    done = subprocess.run([sys.executable, "-m", "bench.bench_generation", "--worker"], input=json.dumps(job),
                          capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parent.parent)
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(runtime: str, raw: dict) -> dict:
    label = {LLAMA_CPP: LLAMA_CPP, "none": "transformers fp32"}.get(runtime, f"ours, {runtime}")
    return {"runtime": label, "mode": runtime,
            "load_s": raw["load_s"], "ttft_s": statistics.median(raw["ttft_s"]),
            "tok_s": statistics.median(raw["tok_s"]), "peak_rss_mb": raw["peak_rss_mb"], "raw": raw}


def add_ratios(rows: list[dict]) -> None:
    """Tokens/s of each row relative to llama.cpp's (None when llama.cpp was not run)."""
    peer = next((r["tok_s"] for r in rows if r["runtime"] == LLAMA_CPP), None)
    for row in rows:
        row["vs_llama_cpp"] = row["tok_s"] / peer if peer else None


def format_table(rows: list[dict]) -> str:
    header = f"{'runtime':<22} {'load s':>7} {'TTFT ms':>8} {'tok/s':>7} {'vs llama.cpp':>13} {'peak RSS MB':>12}"
    lines = [header, "-" * len(header)]
    for r in rows:
        ratio = f"{r['vs_llama_cpp']:.2f}x" if r["vs_llama_cpp"] else "-"
        lines.append(f"{r['runtime']:<22} {r['load_s']:>7.1f} {r['ttft_s'] * 1e3:>8.0f} {r['tok_s']:>7.1f} "
                     f"{ratio:>13} {r['peak_rss_mb']:>12.0f}")
    return "\n".join(lines)


def run(runtimes: list[str], model_key: str, prompt: str, max_new_tokens: int, threads: int,
        repeats: int) -> list[dict]:
    ids = prompt_ids(model_key, PROMPTS[prompt])
    rows = []
    for runtime in runtimes:
        print(f"... {runtime}", file=sys.stderr, flush=True)
        rows.append(summarise(runtime, measure_in_subprocess(runtime, model_key, ids, max_new_tokens, threads,
                                                             repeats)))
    add_ratios(rows)
    return rows


def write_results(rows: list[dict], settings: dict) -> Path:
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"generation-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"settings": settings, "torch": torch.__version__, "rows": rows}, indent=2))
    return path


def _worker() -> None:
    job = json.loads(sys.stdin.read())
    print(json.dumps(measure(**job)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-0.5b", choices=sorted(CHAT_MODELS))
    parser.add_argument("--runtimes", default=",".join((*TORCH_RUNTIMES, LLAMA_CPP)),
                        help="comma-separated: quantize modes and/or llama.cpp")
    parser.add_argument("--prompt", default="short", choices=sorted(PROMPTS),
                        help="short: one question; long: the same question after 30 earlier turns")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker()
    settings = {"model": args.model, "prompt": args.prompt, "max_new_tokens": args.max_new_tokens,
                "threads": args.threads, "repeats": args.repeats, "load_average": os.getloadavg()}
    rows = run(args.runtimes.split(","), args.model, args.prompt, args.max_new_tokens, args.threads, args.repeats)
    print(format_table(rows))
    print(f"written to {write_results(rows, settings)}")


if __name__ == "__main__":
    main()
