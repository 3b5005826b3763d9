"""How good the replies are: fixed scripted conversations through the app's ChatService, scored automatically.

    python -m bench.quality [--models qwen2.5-0.5b,smollm2-135m] [--quantize int4] [--settings app,greedy]
                            [--label NAME]

Each bundled model x quantization x generation setting is one row:
- recall of facts stated in passing (a name, an age, a job, a pet, a price, a preference) after 3, 10
  and 25 turns (the 25-turn history passes the token budget, so condensation is exercised);
- recall of what a photo's notes said (assets/examples/sign.png, read by OCR) and what was said in a
  voice turn (tests/data/elephant_giraffe.wav), 10 turns later;
- a small factual / instruction set; answering in the user's language; perspective (the bot says
  "your name is", not "my name is");
- repetition (share of word 4-grams that repeat an earlier one in the same reply) and replies cut
  mid-sentence (they reached the token limit and do not end a sentence), over every reply;
- generation speed, and what building the prompt (rendering, tracked state, retrieval) costs per turn.

Every turn but the long set's is capped at 64 new tokens (a sentence or two is asked for).
The service is built by the app's own `build_service` (all models, the app's defaults) in a temporary
data folder. Probes are asked on copies of the conversation, so asking does not remind the model.
Sampling settings are seeded. Writes bench/results/quality-*.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
_SYSTEM_TEMP = tempfile.gettempdir()
ROOT = Path(__file__).resolve().parent.parent
OWNER = "key:quality-bench"

# -- the scripts --------------------------------------------------------------------------------------
# Facts are stated in passing, inside questions about something else.
FACT_TURNS = [
    "Hi! My name is Ana, I work as a nurse and I'm trying to plan a busy week. Any quick tip?",
    "My daughter's name is Matilda and she is seven. Her school play is on Friday; what should she eat before it?",
    "Our dog is called Biscuit, and I paid 340 euros for my new bike last month. I hate coffee but I love "
    "green tea. How often should a dog see the vet?",
]
# (question, pattern a correct answer matches)
FACT_PROBES = [
    ("What is my name?", r"\bAna\b"),
    ("What is my job?", r"\bnurse\b"),
    ("What is my daughter's name?", r"\bMatilda\b"),
    ("How old is my daughter?", r"\b(seven|7)\b"),
    ("What is my dog called?", r"\bBiscuit\b"),
    ("How much did my new bike cost?", r"\b340\b"),
    ("Which drink do I love?", r"\bgreen tea\b"),
]
# The bot speaking as if it were the user.
WRONG_PERSPECTIVE = re.compile(r"\bmy (name|daughter|dog|job|bike)\b|\bI(?: am|'m) (?:Ana|a nurse)\b", re.I)

FILLER = [
    "Give me one idea for a rainy Saturday, in one sentence.",
    "What is a good stretch after a long day?",
    "Suggest a quick vegetarian dinner.",
    "How do I keep basil alive on a windowsill?",
    "What is a polite way to decline a meeting?",
    "Recommend a board game for a family evening.",
    "How can I fall asleep faster?",
    "What should I pack for a day at the beach?",
    "Give me a short tip for learning a new language.",
    "How do I clean a cast iron pan?",
    "What is a simple way to save money on groceries?",
    "Suggest a name for a book club.",
    "How long should I boil an egg for a soft yolk?",
    "What is a fun fact about octopuses?",
    "How do I fix a squeaky door?",
    "Recommend a warm-up before running.",
    "What is a good houseplant for a dark room?",
    "How do I make my emails shorter?",
    "Suggest a weekend day trip idea.",
    "What should I do if my bike chain keeps slipping?",
    "Give me a two-line poem about autumn.",
    "How do I remove a coffee stain from a shirt?",
]
CHECKPOINTS = (3, 10, 25)

PHOTO = ROOT / "assets" / "examples" / "sign.png"
VOICE = ROOT / "tests" / "data" / "elephant_giraffe.wav"
# (question, words a correct answer contains: score is the share found)
MEDIA_PROBES = {
    "photo": [
        ("What did the sign in my photo say?", ["harbor", "lisbon", "12"]),
        ("What was written in my first photo?", ["harbor", "lisbon", "12"]),
        ("How far was Lisbon according to the sign?", ["12"]),
        ("Which road was on the sign I showed you?", ["harbor"]),
    ],
    "voice": [
        ("Which animals did I mention in my voice message?", ["elephant", "giraffe"]),
        ("Where did the animals in my voice message drink water?", ["river"]),
    ],
}
MEDIA_LATER = 10
SHORT_TOKENS = 64  # the reply limit of every turn but the long set's

_REFUSAL = r"\b(can't|cannot|unable to) (assist|help)\b"
# (question, must match, must not match)
FACTS = [
    ("What is the capital of Italy?", r"\bRome\b", r"\bFlorence\b"),
    ("Are honey bees insects or birds?", r"\binsects?\b", r"\bbees are birds\b"),
    ("Is an octopus a fish, a bird or a mollusc?", r"\bmollus[ck]", r"\b(is|are) (a )?(fish|bird)"),
    ("What is 12 times 3?", r"\b36\b", None),
    ("How many legs does a spider have?", r"\b(eight|8)\b", None),
    ("Who wrote Romeo and Juliet?", r"\bShakespeare\b", None),
    ("What gas do plants take in from the air to make food?", r"\b(carbon dioxide|CO2|CO₂)\b", None),
    ("Translate 'thank you' into French.", r"\bmerci\b", None),
    ("Reply with only the word yes.", r"^\W*yes\W*$", None),
    # Harmless requests a small model must not refuse (a system-prompt line once made it refuse this one).
    ("Write a long story about a dragon who learns to cook.", r"\bdragon\b", _REFUSAL),
    ("Write a short poem about the sea.", r"\bsea\b", _REFUSAL),
    ("List three primary colours, separated by commas.", r"(?=.*\bred\b)(?=.*\bblue\b)(?=.*\byellow\b)", None),
]
LONG = [
    "Write a paragraph about coral reefs.",
    "Explain how a bicycle works.",
    "Tell me about the history of Lisbon.",
    "Describe a good morning routine.",
]
LANGUAGE = [
    ("¿Cuál es la capital de España?", "es"),
    ("Quelle est la couleur du ciel par beau temps ?", "fr"),
    ("Wie viele Tage hat eine Woche?", "de"),
    ("Qual é a melhor época para visitar Lisboa?", "pt"),
]
_STOPWORDS = {
    "en": "the is are and of to in it you a an this that with for on be".split(),
    "es": "el la los las es son y de que en un una del por para con se".split(),
    "fr": "le la les est sont et de des que un une du pour avec en il ce".split(),
    "de": "der die das ist sind und ein eine hat mit für zu den dem nicht es".split(),
    "pt": "o a os as é são e de que um uma do da para com em não".split(),
}


def language_of(text: str) -> str:
    words = re.findall(r"[^\W\d_]+", text.lower())
    scores = {lang: sum(w in stop for w in words) for lang, stop in _STOPWORDS.items()}
    return max(scores, key=scores.get) if any(scores.values()) else "?"


def repeated_ngrams(text: str, n: int = 4) -> tuple[int, int]:
    """(n-grams that repeat an earlier one in the same text, all n-grams)."""
    words = re.findall(r"\w+", text.lower())
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    seen, repeats = set(), 0
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return repeats, len(grams)


_SENTENCE_END = re.compile(r"[.!?…:;)\]\"'`*]\s*$|^\W*\w+\W*$")


@dataclass
class Reply:
    task: str
    question: str
    text: str
    tokens: int
    seconds: float
    first_token_s: float
    prompt_s: float  # building the prompt (rendering, tracked state, retrieval)
    hit_limit: bool
    marked: bool  # the reply says it was cut at the limit

    @property
    def cut_mid_sentence(self) -> bool:
        return self.hit_limit and not _SENTENCE_END.search(self.text.strip())


class Runner:
    def __init__(self, service, settings, seed: int = 0):
        self.service, self.settings, self.seed = service, settings, seed
        # Most turns need a sentence or two; capping them keeps a row to minutes on a shared 2-core machine.
        short = {"max_new_tokens": min(settings.max_new_tokens, SHORT_TOKENS)}
        if hasattr(settings, "sentence_tail"):
            short["sentence_tail"] = min(settings.sentence_tail, SHORT_TOKENS // 4)
        self.short = replace(settings, **short)
        self.replies: list[Reply] = []

    def ask(self, conv, text: str, files=(), task: str = "filler", short: bool = True) -> Reply:
        """A turn through the service; `short` caps the reply (the long set alone uses the full limit)."""
        import torch

        torch.manual_seed(self.seed)
        settings = self.short if short else self.settings
        service, generator = self.service, self.service.generator
        start = time.perf_counter()
        first = None
        reply = ""
        prompt_s = 0.0
        for reply in service.respond(OWNER, conv, text, list(files), settings):
            if not reply and first is None:
                # The user's turn is in the state: time what building the prompt costs (the service does it next).
                t = time.perf_counter()
                _prompt(service, conv, settings)
                prompt_s = time.perf_counter() - t
            if reply and first is None:
                first = time.perf_counter()
        end = time.perf_counter()
        last = conv.turns[-1]
        tokens = generator.count_tokens(reply)
        marked = bool(getattr(last, "cut", False))
        row = Reply(task, text, reply, tokens, end - (first or end), (first or end) - start - prompt_s, prompt_s,
                    tokens >= settings.max_new_tokens - 1 or marked, marked)
        self.replies.append(row)
        return row

    def probe(self, conv, text: str, task: str) -> Reply:
        """Ask on a copy (a new id, so the store keeps both): the probe does not become history."""
        from chatbot.state import Conversation, new_id

        copy = Conversation.from_dict({**conv.to_dict(), "id": new_id()})
        return self.ask(copy, text, task=task)


def _prompt(service, conv, settings):
    """The messages the service will send (its own method once it has one)."""
    if hasattr(service, "prompt"):
        return service.prompt(conv, settings)
    return conv.render(service.generator.count_tokens, service.generator.prompt_budget(settings))


PARTS = ("recall", "media", "single")


def run_scripts(runner: Runner, parts=PARTS) -> dict:
    result: dict = {}
    if "recall" in parts:
        _recall(runner, result)
    if "media" in parts:
        _media(runner, result)
    if "single" in parts:
        _single(runner, result)
    return result


def _recall(runner: Runner, result: dict) -> None:
    service = runner.service
    # Facts after 3, 10, 25 turns.
    conv = service.new_conversation()
    recall, perspective = {}, []
    for i in range(max(CHECKPOINTS)):
        text = FACT_TURNS[i] if i < len(FACT_TURNS) else FILLER[(i - len(FACT_TURNS)) % len(FILLER)]
        runner.ask(conv, text)
        if i + 1 in CHECKPOINTS:
            hits = []
            for question, pattern in FACT_PROBES:
                r = runner.probe(conv, question, f"recall@{i + 1}")
                hits.append(bool(re.search(pattern, r.text, re.I)))
                perspective.append(not WRONG_PERSPECTIVE.search(r.text))
            recall[i + 1] = sum(hits) / len(hits)
    result["recall"] = recall
    result["perspective"] = sum(perspective) / len(perspective)


def _media(runner: Runner, result: dict) -> None:
    service = runner.service
    # A photo and a voice message, asked about 10 turns later.
    conv = service.new_conversation()
    runner.ask(conv, "Look at this sign I saw today.", [PHOTO], task="photo-turn")
    runner.ask(conv, "", [VOICE], task="voice-turn")
    for i in range(MEDIA_LATER):
        runner.ask(conv, FILLER[i % len(FILLER)])
    for kind, probes in MEDIA_PROBES.items():
        scores = []
        for question, words in probes:
            r = runner.probe(conv, question, kind)
            scores.append(sum(w in r.text.lower() for w in words) / len(words))
        result[kind] = sum(scores) / len(scores)


def _single(runner: Runner, result: dict) -> None:
    service = runner.service
    # Single-turn sets, each in a fresh conversation.
    hits = []
    for question, good, bad in FACTS:
        r = runner.ask(service.new_conversation(), question, task="facts")
        hits.append(bool(re.search(good, r.text, re.I | re.S)) and not (bad and re.search(bad, r.text, re.I)))
    result["facts"] = sum(hits) / len(hits)
    hits = []
    for question, lang in LANGUAGE:
        r = runner.ask(service.new_conversation(), question, task="language")
        hits.append(language_of(r.text) == lang)
    result["language"] = sum(hits) / len(hits)
    for question in LONG:
        runner.ask(service.new_conversation(), question, task="long", short=False)


def summarise(result: dict, replies: list[Reply]) -> dict:
    repeats = sum(repeated_ngrams(r.text)[0] for r in replies)
    grams = sum(repeated_ngrams(r.text)[1] for r in replies)
    long = [r for r in replies if r.task == "long"]
    timed = [r for r in replies if r.tokens > 8 and r.seconds > 0]
    return {
        **result,
        "repetition": repeats / max(grams, 1),
        "repetition_long": sum(repeated_ngrams(r.text)[0] for r in long)
        / max(sum(repeated_ngrams(r.text)[1] for r in long), 1),
        "hit_limit": sum(r.hit_limit for r in replies),
        "cut_mid_sentence": sum(r.cut_mid_sentence for r in replies),
        "cut_unmarked": sum(r.cut_mid_sentence and not r.marked for r in replies),
        "replies": len(replies),
        "tokens_per_s": statistics.median(r.tokens / r.seconds for r in timed) if timed else 0.0,
        "prompt_ms_median": 1000 * statistics.median(r.prompt_s for r in replies),
        "prompt_ms_max": 1000 * max(r.prompt_s for r in replies),
    }


# "app" is the app's defaults as they are in the build measured; the others override them.
SETTINGS = {"app": {}, "greedy": {"temperature": 0.0}, "sampling": {"temperature": 0.7, "top_p": 0.9}}


def run(model: str, quantize: str, setting_names: list[str], label: str, parts=PARTS) -> list[dict]:
    import app
    from chatbot.config import Config

    rows = []
    # The app points `tempfile` at a folder inside its data dir; the next model's run must not start there.
    with tempfile.TemporaryDirectory(dir=_SYSTEM_TEMP) as tmp:
        config = Config(text_model=model, quantize=quantize, data_dir=Path(tmp))
        app.configure_environment(config)
        service = app.build_service(config)
        app.load_models(service)  # the app loads them once its page is served
        for name in setting_names:
            settings = replace(service.settings, **SETTINGS[name])
            runner = Runner(service, settings)
            started = time.perf_counter()
            result = run_scripts(runner, parts)
            row = {"model": model, "quantize": quantize, "setting": name, "label": label, "commit": _commit(),
                   "settings": settings.__dict__, "minutes": (time.perf_counter() - started) / 60,
                   **summarise(result, runner.replies)}
            rows.append(row)
            RESULTS_DIR.mkdir(exist_ok=True)
            out = RESULTS_DIR / f"quality-{model}-{quantize}-{name}-{label}.json"
            out.write_text(json.dumps({"row": row, "replies": [r.__dict__ for r in runner.replies]}, indent=1,
                                      ensure_ascii=False))
            print(table([row]), flush=True)
    return rows


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip()
    except OSError:
        return ""


def table(rows: list[dict]) -> str:
    head = ("| model | quant | setting | build | recall @3 / @10 / @25 | photo @10 | voice @10 | facts | language "
            "| perspective | repeated 4-grams (long replies) | cut mid-sentence (unmarked) / replies | tok/s "
            "| prompt ms (median / max) |\n|" + " --- |" * 14)
    lines = [head]
    def pct(value) -> str:
        return "–" if value is None else f"{value:.0%}"

    for r in rows:
        r = {k: r.get(k) for k in ("photo", "voice", "facts", "language", "perspective")} | r  # parts not run: –
        rec = " / ".join(pct(v) for _, v in sorted((r.get("recall") or {}).items(), key=lambda kv: int(kv[0])))
        lines.append(
            f"| {r['model']} | {r['quantize']} | {r['setting']} | {r['label']} ({r['commit']}) | {rec} "
            f"| {pct(r['photo'])} | {pct(r['voice'])} | {pct(r['facts'])} | {pct(r['language'])} "
            f"| {pct(r['perspective'])} | {r['repetition']:.1%} ({r['repetition_long']:.1%}) "
            f"| {r['cut_mid_sentence']} ({r['cut_unmarked']}) / {r['replies']} | {r['tokens_per_s']:.1f} "
            f"| {r['prompt_ms_median']:.1f} / {r['prompt_ms_max']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n")[0])
    p.add_argument("--models", default="qwen2.5-0.5b,smollm2-135m", help="comma-separated bundled models")
    p.add_argument("--quantize", default="int4", help="comma-separated quantize modes")
    p.add_argument("--settings", default="app,greedy", help="comma-separated: " + ", ".join(SETTINGS))
    p.add_argument("--label", default="current", help="names the build in the table and the JSON file")
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated: " + ", ".join(PARTS))
    args = p.parse_args(argv)
    rows = []
    for model in args.models.split(","):
        for quantize in args.quantize.split(","):
            rows += run(model, quantize, args.settings.split(","), args.label, args.parts.split(","))
    print("\n" + table(rows))


if __name__ == "__main__":
    main()
