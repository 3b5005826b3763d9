"""The app as a user meets it: first and later starts, text turns early and late in a chat, photo and voice turns, memory.

    python -m bench.bench_app [--turns 40] [--repeat 1] [--chat-turns 40] [--no-first-start]

Starts, photo/voice latency and memory are measured on the real server process
(`app.py`, default settings) through gradio_client: the first start on a fresh
machine (empty cache folders: join, convert and quantize the bundled model) up to
the first reply, then a later start (cache filled) up to the page and the first
reply, then a chat of --chat-turns turns with 3 photos and 2 voice turns; resident
memory is read after the start, after the first photo (OCR session) and after the
first voice turn (Whisper), and the peak at the end; it is also sampled every 0.2 s, labelled
with the turn running, so the turn that makes the peak is named. Time to first token
at turn 2 vs turn N is measured in-process through the app's ChatService on the
default reply model, with and without reuse of the KV cache across turns; --repeat runs that chat several
times and reports the median of the runs' turn-40 / turn-2 ratios (one run's ratio moves by ±0.15 on this
CPU). Prints tables; writes JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

from chatbot.config import Config
from chatbot.conversation.relevance import MiniLMRelevance
from chatbot.conversation.service import ChatService
from chatbot.conversation.store import ConversationStore
from chatbot.generation.transformers_backend import (
    GenerationSettings,
    load_generator,
    wait_idle,
)
from chatbot.perception.encoder import MultimodalEncoder
from chatbot.state import Conversation, Role, Turn

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent

# A long, varied chat: facts early on, questions later (the history passes the token budget).
_TOPICS = ["my cat Miso", "hiking in the Alps", "a Python script that renames photos", "baking sourdough",
           "learning Portuguese", "my trip to Lisbon", "a birthday gift for my sister", "running a 10k race"]


def user_message(i: int, topic_of: int | None = None) -> str:
    """Turn i+1's message; on the topic of turn `topic_of`+1 if given. Numbers have two digits (one token each)."""
    topic = _TOPICS[(i if topic_of is None else topic_of) % len(_TOPICS)]
    return f"Turn {i + 1:02d}: tell me one short tip about {topic}, in two sentences."


# -- text turns: time to first token early vs late in a conversation -------------------------------
def turn_timings(turns: int, reuse_cache: bool, max_new_tokens: int = 32) -> list[dict]:
    """Text turns through the app's ChatService (default model), as a user who reads each reply before typing.

    After each turn the model thread is left to finish what it queued (reading ahead a window the next
    turns will move to); how long that took is reported, as the pause a user must take for it to pay.
    """
    config = Config()
    generator = load_generator(config.text_model, quantization=config.quantize, max_context=config.max_context)
    if not reuse_cache:
        generator.prefix_cache = None
    settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=0)
    with tempfile.TemporaryDirectory() as tmp:
        store = ConversationStore(Path(tmp))
        service = ChatService(MultimodalEncoder(store.media_dir), generator, store, settings,
                              relevance=MiniLMRelevance().load())  # as the app: the tracked state's retrieval
        wait_idle_after(generator.prefill(service.new_conversation().render(generator.count_tokens, 10**6)[:1]))
        conv = service.new_conversation()
        rows = []
        # Prompt tokens the model reads for a turn (load-independent, unlike TTFT): every token its forward
        # pass gets before the reply's first token (later calls are decoding steps or reading ahead).
        read = {"tokens": 0, "counting": False}

        def count_read(_module, args, kwargs) -> None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            if read["counting"] and ids is not None:
                read["tokens"] += ids.shape[-1]

        generator.model.register_forward_pre_hook(count_read, with_kwargs=True)
        for i in range(turns):
            # The last turn asks turn 2's question (its own number, as many digits): the two read the same
            # tokens, so their TTFTs differ by the history before them alone (turn 40 read 31 against 27).
            message = user_message(i, topic_of=1 if i == turns - 1 > 1 else None)
            asked = Conversation.from_dict(conv.to_dict())
            asked.add_user_turn(Turn(role=Role.USER, text=message))
            start = time.perf_counter()
            first = None
            reply = ""
            read.update(tokens=0, counting=True)
            for reply in service.respond("key:bench", conv, message):
                if reply and first is None:
                    first = time.perf_counter()
                    read["counting"] = False
            end = time.perf_counter()
            idle = wait_idle_after()
            new_tokens = generator.count_tokens(reply)
            read["counting"] = False
            prompt = service.prompt(asked)  # after the turn: asked before, it would take the retrieval out of TTFT
            rows.append({"turn": i + 1, "prompt_tokens": generator.encode_prompt(prompt)["input_ids"].shape[1],
                         "prompt_tokens_read": read["tokens"],
                         "ttft_s": (first or end) - start, "new_tokens": new_tokens, "read_ahead_s": idle,
                         "tokens_per_s": (new_tokens - 1) / (end - first) if first and new_tokens > 1 and end > first
                         else 0.0})
    return rows


def wait_idle_after(*futures) -> float:
    """Seconds until the reply-model thread is idle (it may be reading ahead)."""
    start = time.perf_counter()
    for future in futures:
        future.result()
    wait_idle()
    return time.perf_counter() - start


# -- the server: starts, photo and voice turns, memory -----------------------------------------------
PHOTO_TURNS, VOICE_TURNS = (5, 15, 25), (10, 30)  # 1-based turn numbers in the long chat


def first_start() -> dict:
    """A first start on a fresh machine: empty cache folders, so the bundled weights are joined, converted
    and quantized before the first reply."""
    from gradio_client import Client

    from harness.server import AppServer

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fresh = {name: str(tmp / name) for name in ("CHATBOT_CACHE_DIR", "XDG_CACHE_HOME", "HF_HOME")}
        saved = {name: os.environ.get(name) for name in fresh}
        os.environ.update(fresh)  # the server process inherits them
        start = time.perf_counter()
        try:
            server = AppServer(tmp / "data", settings=()).start(wait_for_model=False)
        finally:
            for name, value in saved.items():
                os.environ.pop(name) if value is None else os.environ.__setitem__(name, value)
        try:
            served, served_cpu = time.perf_counter() - start, _cpu_seconds(server.process.pid)
            Client(server.url, verbose=False).predict({"text": "Hello!", "files": []}, api_name="/chat")
            return {"page_served_s": served, "page_served_cpu_s": served_cpu,
                    "first_reply_s": time.perf_counter() - start,
                    "peak_rss_mb": _memory_mb(server.process.pid, "VmHWM")}
        finally:
            server.stop()


def server_timings(chat_turns: int) -> dict:
    """A later start (weights cached), then a long chat with photos and voice turns, as one user."""
    import skimage.data
    from gradio_client import Client, handle_file
    from PIL import Image

    from harness.server import AppServer

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        server = AppServer(tmp / "data", settings=()).start(wait_for_model=False)  # the app's default settings
        served = time.perf_counter() - start
        try:
            pid = server.process.pid
            served_cpu = _cpu_seconds(pid)
            client = Client(server.url, verbose=False)
            trace = RssTrace(pid)
            with trace:
                trace.step = "turn 1 (after the page: the models load)"
                client.predict({"text": "Hello!", "files": []}, api_name="/chat")
                first_reply = time.perf_counter() - start
                memory = {"after_start_mb": _memory_mb(pid, "VmRSS")}
                photo_s, voice_s = [], []
                for turn in range(2, chat_turns + 1):
                    t = time.perf_counter()
                    if turn in PHOTO_TURNS:
                        trace.step = f"turn {turn} (photo)"
                        # Real photos (scikit-image's samples) under neutral names, a plain question.
                        sample = ("chelsea", "coffee", "astronaut")[len(photo_s) % 3]
                        photo = tmp / f"IMG_{turn:04d}.jpg"
                        Image.fromarray(getattr(skimage.data, sample)()).convert("RGB").save(photo, quality=90)
                        client.predict({"text": "What is in this photo?", "files": [handle_file(str(photo))]},
                                       api_name="/chat")
                        photo_s.append(time.perf_counter() - t)
                        memory.setdefault("after_first_photo_mb", _memory_mb(pid, "VmRSS"))
                    elif turn in VOICE_TURNS:
                        trace.step = f"turn {turn} (voice)"
                        client.predict({"text": "", "files": [handle_file(str(ROOT / "tests/data/capital_of_france.wav"))]},
                                       api_name="/chat")
                        voice_s.append(time.perf_counter() - t)
                        memory.setdefault("after_first_voice_mb", _memory_mb(pid, "VmRSS"))
                    else:
                        trace.step = f"turn {turn}"
                        client.predict({"text": user_message(turn), "files": []}, api_name="/chat")
            memory["end_mb"] = _memory_mb(pid, "VmRSS")
            peak_rss = _memory_mb(pid, "VmHWM")
        finally:
            server.stop()
    peaks = trace.peaks()
    peak_step = max(peaks, key=peaks.get) if peaks else None
    return {"page_served_s": served, "page_served_cpu_s": served_cpu, "first_reply_s": first_reply,
            "chat_turns": chat_turns,
            "photo_turn_s": statistics.median(photo_s) if photo_s else None,
            "voice_turn_s": statistics.median(voice_s) if voice_s else None,
            "memory": memory, "peak_rss_mb": peak_rss, "peak_step": peak_step,
            "rss_peak_by_step_mb": peaks, "rss_trace": trace.samples}


class RssTrace:
    """The server's resident memory every `interval` seconds, each sample labelled with the step running then.

    VmHWM gives the peak but not its moment; this says which turn (text, photo, voice) reached it.
    """

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid, self.interval = pid, interval
        self.step = ""
        self.samples: list[tuple[float, str, float]] = []  # (seconds since start, step, RSS MB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssTrace:
        self._began = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                rss = _memory_mb(self.pid, "VmRSS")
            except OSError:  # the server ended
                return
            self.samples.append((time.perf_counter() - self._began, self.step, rss))

    def peaks(self) -> dict[str, float]:
        """The highest sample of each step, in the order the steps ran."""
        found: dict[str, float] = {}
        for _, step, rss in self.samples:
            found[step] = max(found.get(step, 0.0), rss)
        return found


def _cpu_seconds(pid: int) -> float:
    """CPU time the process used so far (all its threads, user + system): what a start costs whatever else runs."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)


def _memory_mb(pid: int, field: str) -> float:
    """A /proc status field in MB: VmRSS (resident now) or VmHWM (peak resident)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# -- report ----------------------------------------------------------------------------------------------
def summarise_turns(rows: list[dict], early: int = 2) -> dict:
    late = rows[-1]["turn"]
    pick = lambda t: next(r for r in rows if r["turn"] == t)  # noqa: E731
    # Medians over three turns around each point smooth out a noisy shared CPU.
    around = lambda t: [r for r in rows if abs(r["turn"] - t) <= 1]  # noqa: E731
    return {
        "early_turn": early, "late_turn": late,
        "ttft_early_s": pick(early)["ttft_s"], "ttft_late_s": pick(late)["ttft_s"],
        "ttft_early_median3_s": statistics.median(r["ttft_s"] for r in around(early)),
        "ttft_late_median3_s": statistics.median(r["ttft_s"] for r in around(late - 1)),
        "prompt_tokens_late": pick(late)["prompt_tokens"],
        "read_early": pick(early)["prompt_tokens_read"], "read_late": pick(late)["prompt_tokens_read"],
        "read_median": statistics.median(r["prompt_tokens_read"] for r in rows[early:]),
        "read_max": max(r["prompt_tokens_read"] for r in rows[early:]),
        "tokens_per_s_early": pick(early)["tokens_per_s"], "tokens_per_s_late": pick(late)["tokens_per_s"],
        "ttft_late_over_early": pick(late)["ttft_s"] / pick(early)["ttft_s"],
        "ttft_max_s": max(r["ttft_s"] for r in rows),
        "read_ahead_max_s": max(r["read_ahead_s"] for r in rows),
    }


def format_tables(server: dict | None, turns: dict[str, dict], first: dict | None = None) -> str:
    lines = []
    if first:
        lines += ["| first start (empty caches) → page served | CPU time to page | → first reply | peak RSS |",
                  "|---|---|---|---|",
                  f"| {first['page_served_s']:.1f} s | {first['page_served_cpu_s']:.1f} s | {first['first_reply_s']:.1f} s "
                  f"| {first['peak_rss_mb']:.0f} MB |", ""]
    if server:
        m = server["memory"]
        seconds = lambda v: f"{v:.1f} s" if v is not None else "-"  # noqa: E731
        megabytes = lambda key: f"{m[key]:.0f} MB" if key in m else "-"  # noqa: E731
        lines += ["| later start → page served | CPU time to page | → first reply | photo turn | voice turn "
                  "| RSS after start | after 1st photo (OCR) | after 1st voice (Whisper) | RSS at end | peak RSS "
                  f"({server['chat_turns']} turns) |", "|---|---|---|---|---|---|---|---|---|---|",
                  f"| {server['page_served_s']:.1f} s | {server['page_served_cpu_s']:.1f} s "
                  f"| {server['first_reply_s']:.1f} s "
                  f"| {seconds(server['photo_turn_s'])} | {seconds(server['voice_turn_s'])} "
                  f"| {megabytes('after_start_mb')} | {megabytes('after_first_photo_mb')} "
                  f"| {megabytes('after_first_voice_mb')} | {megabytes('end_mb')} | {server['peak_rss_mb']:.0f} MB |", ""]
        if server.get("peak_step"):
            top = sorted(server["rss_peak_by_step_mb"].items(), key=lambda item: -item[1])[:5]
            lines += ["Highest RSS sampled (every 0.2 s) by step: "
                      + ", ".join(f"{step} {mb:.0f} MB" for step, mb in top), ""]
    lines += ["| text turns | TTFT turn 2 | TTFT last turn | last / 2 | median TTFT 1-3 | median TTFT last 3 "
              "| worst TTFT | prompt tokens (last) | read turn 2 / last / median / max after 2 | tok/s turn 2 "
              "| tok/s last | longest read-ahead |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in turns.items():
        runs = s.get("ratio_runs", [])
        spread = (f" (median of {len(runs)} runs: {min(runs):.2f}–{max(runs):.2f}×)" if len(runs) > 1 else "")
        lines.append(f"| {name} (turn {s['late_turn']}) | {s['ttft_early_s']:.2f} s | {s['ttft_late_s']:.2f} s "
                     f"| {s['ttft_late_over_early']:.2f}×{spread} | {s['ttft_early_median3_s']:.2f} s "
                     f"| {s['ttft_late_median3_s']:.2f} s | {s['ttft_max_s']:.2f} s | {s['prompt_tokens_late']} "
                     f"| {s['read_early']} / {s['read_late']} / {s['read_median']:.0f} / {s['read_max']} "
                     f"| {s['tokens_per_s_early']:.1f} | {s['tokens_per_s_late']:.1f} | {s['read_ahead_max_s']:.1f} s |")
    return "\n".join(lines)


def run(turns: int = 40, with_server: bool = True, without_cache: bool = True, chat_turns: int = 40,
        with_first_start: bool = True, repeat: int = 1) -> dict:
    results: dict = {"first_start": first_start() if with_server and with_first_start else None,
                     "server": server_timings(chat_turns) if with_server else None, "turns": {}, "raw_turns": {}}
    variants = [("prefix cache (default)", True)] + ([("no prefix cache", False)] if without_cache else [])
    for name, reuse in variants if turns else []:
        runs = [summarise_turns(rows) | {"rows": rows} for rows in (turn_timings(turns, reuse) for _ in range(repeat))]
        # The run whose ratio is the median stands for all (its turns shown); every run's ratio is kept.
        runs.sort(key=lambda summary: summary["ttft_late_over_early"])
        middle = runs[(len(runs) - 1) // 2]
        results["raw_turns"][name] = middle.pop("rows")
        results["turns"][name] = middle | {"ratio_runs": [summary["ttft_late_over_early"] for summary in runs]}
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--turns", type=int, default=40, help="in-process text turns for TTFT (0: skip)")
    parser.add_argument("--chat-turns", type=int, default=40, help="turns of the server chat (3 photos, 2 voice)")
    parser.add_argument("--no-server", action="store_true", help="skip starts / photo / voice / memory")
    parser.add_argument("--no-first-start", action="store_true", help="skip the first start with empty caches")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run without KV-cache reuse")
    parser.add_argument("--repeat", type=int, default=1, help="runs of the in-process chat (median ratio reported)")
    args = parser.parse_args(argv)
    results = run(args.turns, not args.no_server, not args.no_baseline, args.chat_turns, not args.no_first_start,
                  max(1, args.repeat))
    print(format_tables(results["server"], results["turns"], results["first_start"]))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "bench_app.json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
