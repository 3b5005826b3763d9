"""The tracked dialogue state: what the user has told the bot, kept beside the turn history.

Small models lose a fact said in passing twenty turns ago, even when it is still in the prompt,
and answer "my name is Ana" when asked "what is my name?". So every user turn updates a compact
record, and the part of it that relates to the newest message is rendered next to that message
(a 0.5B model copies whatever the block holds into its answer: shown beside "Recommend a warm-up
before running", the facts came back as "Matilda should eat breakfast before her bike ride"):
- facts the user stated about themselves and their world ("my daughter's name is Matilda and
  she is seven"), rewritten to address the user ("Your daughter's name is Matilda ..."); a later
  statement about the same thing ("my name is ...") replaces the earlier one;
- every photo, recording and document with what its notes say, retrievable by label ("Photo 2",
  "the second photo", "my recording", "Document 1") and by content ("the sign", "the invoice");
  rendered only once its message is no longer in the prompt (the history says it until then);
- the earlier messages that no longer fit the prompt, the ones most relevant to the newest
  message first (`Relevance`, e.g. a sentence embedder; word overlap without one), unless a
  message still in the prompt (or one recalled already) says the same.

Nothing here is stored: the state is derived from the turns, so saved conversations need no
new fields. Torch-free: the relevance scorer is passed in.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol


class Relevance(Protocol):
    """Scores each candidate text's relevance to a query, one float per candidate (higher: more)."""

    threshold: float  # below it a candidate is unrelated (unrelated old chatter only costs prompt time)
    # Below it a tracked fact or attachment is unrelated to the message and stays out of the block.
    fact_threshold: float
    # At or above it a message says what another says (the same request again): recalling it adds nothing.
    duplicate_threshold: float

    def __call__(self, query: str, candidates: Sequence[str]) -> list[float]: ...


@dataclass(frozen=True)
class Fact:
    key: str  # what it is about ("name", "daughter's name"); a newer fact with the same key replaces it
    text: str  # addressed to the user: "Your name is Ana."
    turn: int


@dataclass(frozen=True)
class Item:
    """A photo, recording or document the user sent, and what its notes say."""

    label: str  # "Photo 1"
    names: tuple[str, ...]  # other ways a user refers to it: "first photo", "second recording"
    note: str  # the notes, as one line
    turn: int
    kind_names: tuple[str, ...] = ()  # words for its kind ("photo", "recording"): they name it when nothing else does


@dataclass(frozen=True)
class Said:
    """A user message that was condensed out of the prompt."""

    text: str
    turn: int


@dataclass
class TrackedState:
    facts: list[Fact] = field(default_factory=list)
    items: list[Item] = field(default_factory=list)

    def update(self, turn: int, text: str, items: Sequence[Item] = ()) -> None:
        """Take in one user turn: its stated facts and its attachments."""
        for fact in facts_in(text, turn):
            self.facts = [f for f in self.facts if f.key != fact.key] + [fact]
        self.items += list(items)

    def render(self, query: str, dropped: Sequence[Said], count_tokens: Callable[[str], int], room: int,
               relevance: Relevance | None = None, window: Sequence[Said] = ()) -> str:
        """The state as a bracketed note for the newest message, within `room` tokens.

        Facts and attachments related to `query` come first (all of those when they fit, else the
        most relevant); the rest of the room goes to the condensed-out messages most relevant to it.
        Nothing related: no facts, no attachments (an empty string when nothing else is recalled).
        `window`: the user messages the prompt still holds. The block recalls what they no longer say:
        not the attachments sent with them, nor a condensed-out message one of them repeats.
        """
        score = relevance or WordOverlap()
        sections: list[tuple[str, list[str]]] = []
        # All the facts when any relates (they tell things apart: shown "Your dog is called Biscuit" alone, the
        # model answered "Your dog is called Matilda"); none when none does. The most related first: the 0.5B
        # model answers from the top of a list.
        scores = score(query, [f.text for f in self.facts]) if self.facts else []
        if any(v >= score.fact_threshold for v in scores):
            ranked = sorted(zip(scores, self.facts, strict=True), key=lambda p: -p[0])
            sections.append(("What the user told you earlier (in your words to them):", [f.text for _, f in ranked]))
        # An attachment whose message is still in the prompt has its notes there. Repeated right before the
        # question, the 0.5B model echoed the question back ("Which road was on the sign I showed you?" got "The
        # road was on the sign I showed you."; with the notes only in the history: "The road was the HARBOR ROAD").
        # Named by its label ("Document 1", "the second photo"), it is repeated all the same: which of several is
        # meant is what the small model cannot work out from the history ("What was the code word in Document 1?"
        # got "Internal memo.", the title).
        shown = {said.turn for said in window}
        kept = [(item, n) for item in self.items
                if (n := mentions(query, item)) == BY_LABEL or item.turn not in shown]
        items = [item for item, _ in kept]
        if items:
            # The ones the message names, in full; when it names none, those its notes relate to, shortened.
            # Listing the others beside a named photo made the 0.5B model answer from the wrong one (bench.quality).
            most = max(n for _, n in kept)
            wanted = [item for item, n in kept if n and n == most]
            related = [] if wanted else [item for item, ok in zip(items, _related(query, [i.note for i in items], score),
                                                                  strict=True) if ok]
            if wanted or related:
                sections.append(("Photos, recordings and documents the user sent (from their notes):",
                                 [_item_line(item, full=bool(wanted)) for item in wanted or related]))
        lines = _fit(sections, query, score, count_tokens, room)
        candidates = [d for d in dropped if d.text.strip()]
        if candidates:
            scores = score(query, [d.text for d in candidates])
            ranked = sorted(zip(scores, candidates, strict=True), key=lambda p: -p[0])
            recalled = ["Earlier messages related to this one (most related first):"]
            # What the window still says, or a message already recalled says, is not recalled again: each recalled
            # line is read anew every turn (a chat that comes back to a topic recalled its earlier mentions beside
            # the latest one still in the window, 96-166 prompt tokens a turn instead of ~30).
            said_already = [s.text for s in window if s.text.strip()]
            for _, said in [p for p in ranked if p[0] >= score.threshold]:
                if len(recalled) > MAX_RECALLED:
                    break
                if said_already and max(score(said.text, said_already)) >= score.duplicate_threshold:
                    continue
                line = f'- The user said: "{_shorten(said.text, 160)}"'
                if count_tokens(_wrap(lines + recalled + [line])) > room:
                    break
                recalled.append(line)
                said_already.append(said.text)
            lines += recalled if len(recalled) > 1 else []
        return _wrap(lines) if lines else ""


def _related(query: str, texts: list[str], score: Relevance) -> list[bool]:
    """Whether each of `texts` (tracked facts, attachment notes) relates to `query`."""
    return [v >= score.fact_threshold for v in score(query, texts)] if texts else []


# Condensed-out messages recalled per turn: each costs prompt time at every turn.
MAX_RECALLED = 2


def _wrap(lines: list[str]) -> str:
    return "[Notes for you (not written by the user):\n" + "\n".join(lines) + "]"


def _fit(sections: list[tuple[str, list[str]]], query: str, score: Relevance,
         count_tokens: Callable[[str], int], room: int) -> list[str]:
    """All sections' lines if they fit in `room`, else each section's most relevant lines (in their order)."""
    lines = [line for header, body in sections for line in [header] + [f"- {b}" for b in body]]
    if not lines or count_tokens(_wrap(lines)) <= room:
        return lines
    ranked = []  # (score, section index, line index)
    for s, (_, body) in enumerate(sections):
        ranked += [(v, s, i) for i, v in enumerate(score(query, body))]
    keep: set[tuple[int, int]] = set()
    for _, s, i in sorted(ranked, key=lambda r: -r[0]):
        trial = keep | {(s, i)}
        if count_tokens(_wrap(_lines(sections, trial))) <= room:
            keep = trial
    return _lines(sections, keep)


def _lines(sections: list[tuple[str, list[str]]], keep: set[tuple[int, int]]) -> list[str]:
    out = []
    for s, (header, body) in enumerate(sections):
        kept = [f"- {b}" for i, b in enumerate(body) if (s, i) in keep]
        out += [header] + kept if kept else []
    return out


def _item_line(item: Item, full: bool) -> str:
    return f"{item.label} ({item.names[0]}): {item.note if full else _shorten(item.note, 200)}"


# -- facts ------------------------------------------------------------------------------------------
_FIRST_PERSON = re.compile(r"\b(i|my|me|mine|our|ours|we|us|myself)\b", re.I)
# Sentences that ask or instruct rather than tell.
_REQUEST = re.compile(r"^\s*(please|can|could|would|will|should|shall|do|does|did|is|are|was|were|what|how|why|"
                      r"where|when|who|whom|which|tell|give|help|show|look|see|check|let|suggest|recommend|"
                      r"write|explain|describe|translate|list|reply|answer|make|find|name|remind|hi|hello|hey|"
                      r"thanks|thank)\b", re.I)
# Sentences that hand something over ("Here is a photo I took"): about the attachment, which is tracked apart.
_PRESENTING = re.compile(r"^\s*(here|here's|attached)\b", re.I)
_SWAPS = {"i": "you", "i'm": "you're", "i've": "you've", "i'd": "you'd", "i'll": "you'll", "my": "your",
          "me": "you", "mine": "yours", "our": "your", "ours": "yours", "we": "you", "we're": "you're",
          "us": "you", "myself": "yourself", "am": "are", "was": "were"}
_KEY = re.compile(r"\b(?:my|our)\s+((?:[\w'-]+\s+){0,3}?[\w'-]+)\s+(?:is|are|was|were)\b", re.I)


def facts_in(text: str, turn: int) -> list[Fact]:
    """Statements about the user or their world in `text`, addressed back to the user."""
    facts = []
    for sentence in _sentences(text):
        words = sentence.split()
        if len(words) < 3 or not _FIRST_PERSON.search(sentence) or _REQUEST.match(sentence) \
                or _PRESENTING.match(sentence):
            continue
        key_match = _KEY.search(sentence)
        key = key_match.group(1).lower() if key_match else " ".join(w.lower() for w in words)
        facts.append(Fact(key, _second_person(sentence), turn))
    return facts


def _sentences(text: str) -> list[str]:
    """Statements only: sentences ending in "?" are questions; ";", ":" and newlines also end one."""
    parts = re.findall(r"[^.!?;:\n]+[.!?;:\n]?", text)
    return [p.strip(" ;:\n") for p in parts if p.strip() and not p.rstrip().endswith("?")]


def _second_person(sentence: str) -> str:
    def swap(match: re.Match) -> str:
        return _SWAPS[match.group(0).lower()]  # the sentence's first letter is capitalised below

    # "am"/"was" only change after "I" ("I am" -> "you are"; "the bus was late" stays).
    text = re.sub(r"\bI (am|was)\b", lambda m: "you " + _SWAPS[m.group(1)], sentence)
    text = re.sub(r"\b(i'm|i've|i'd|i'll|i|myself|mine|my|me|ours|our|we're|we|us)\b", swap, text.replace("’", "'"),
                  flags=re.I)
    text = text.rstrip(".!")
    return text[:1].upper() + text[1:] + "."


# -- attachments ------------------------------------------------------------------------------------
BY_LABEL = 3  # `mentions` of an item named by its label or another name for it


def mentions(query: str, item: Item) -> int:
    """How plainly `query` names this item: 3 (`BY_LABEL`) by its label or another name for it ("Photo 2",
    "the second photo"), 2 by a word its notes hold ("the sign to Lisbon"), 1 only by its kind ("my photo"),
    else 0."""
    q = query.lower()

    def said(names) -> bool:
        return any(re.search(rf"\b{re.escape(name.lower())}", q) for name in names)

    if said((item.label, *item.names)):
        return BY_LABEL
    note_words = {w for w in re.findall(r"[a-z]{4,}", item.note.lower())} - _COMMON
    if note_words & set(re.findall(r"[a-z]{4,}", q)):
        return 2
    return int(said(item.kind_names))


_COMMON = {"photo", "image", "text", "read", "from", "with", "that", "this", "what", "there", "about",
           "voice", "message", "recording", "said", "user", "their", "colours", "colors", "size", "pixels",
           "brightness", "bright", "dark", "detected", "language", "english", "speech",
           "document", "page", "pages", "characters", "scanned", "titled", "begins"}


# -- relevance without an embedder ----------------------------------------------------------------
class WordOverlap:
    """The share of the query's content words each candidate holds (the fallback for an embedder)."""

    threshold = 0.2
    fact_threshold = 0.2
    # The same request again scored 0.9-1.0, different ones (even on one template) at most 0.6 (tests/unit/test_memory.py).
    duplicate_threshold = 0.75

    def __call__(self, query: str, candidates: Sequence[str]) -> list[float]:
        words = _content_words(query)
        if not words:
            return [0.0] * len(candidates)
        return [len(words & _content_words(c)) / len(words) for c in candidates]


_STOP = set("the a an and or but of to in on at for with is are was were be been it this that what which who how "
            "why when where do does did i you my your me we our us he she they them his her its can could would "
            "should will please tell give about from as by so if not no yes".split())


def _content_words(text: str) -> set[str]:
    words = (w.removesuffix("'s") for w in re.findall(r"[a-z0-9']+", text.lower().replace("’", "'")))
    return {w for w in words if w not in _STOP}  # "daughter's" is about the daughter


def _shorten(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"
