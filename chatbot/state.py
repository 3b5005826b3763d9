"""The dialogue state: the single source of truth for one conversation.

A conversation is a list of typed turns. A user turn carries what was typed,
the files attached to it (photos, recordings) and the observations the
multimodal encoder derived from them (a transcript, the text in a photo...).
`Conversation.render` turns this into the plain messages a decoder reads,
within a token budget.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import Enum

from chatbot.memory import Item, Relevance, Said, TrackedState

# Worded on the quality bench (bench.quality) with the 0.5B default: each line here shifts what a small model does.
# A line about the "[Notes for you]" block (chatbot.memory) made it refuse harmless requests ("I'm sorry, but I
# can't assist with that request" to a story about a dragon); the block's own header says how to use it instead.
# A line "if a photo's notes say the models could not tell, say you cannot tell" made it say so of readable signs
# ("The sign says that the image models could not tell"; photo recall 50 % against 75 % without it). A photo's
# note itself says "The image models could not tell what it shows", which is enough for noise and blank photos.
DEFAULT_SYSTEM_PROMPT = (
    "You are a friendly, helpful assistant in a chat app. Users can type, attach photos and "
    "speak. You cannot see photos or hear audio directly: you get notes about each attachment "
    "in square brackets (text read from a photo, what was detected in it, a transcript of "
    "speech). Use those notes and everything said earlier in the conversation. When the user mentions a photo or "
    "recording, find it in the bracketed notes of earlier messages and answer from them. Answer briefly."
)


class Role(str, Enum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"


class AttachmentKind(str, Enum):
    IMAGE = "image"
    AUDIO = "audio"
    DOCUMENT = "document"  # a PDF


class ObservationKind(str, Enum):
    """What an encoder derived from an attachment (or the whole turn)."""

    TRANSCRIPT = "transcript"  # the words spoken in a recording: the user's own words
    LANGUAGE = "language"  # the language a recording was spoken in
    OCR = "ocr"  # text read in a photo
    CAPTION = "caption"  # a captioning / question-answering model's description
    LABELS = "labels"  # what the whole picture shows (an image classifier), with its probability
    OBJECTS = "objects"  # things found in the picture (an object detector), counted, with positions
    FACES = "faces"
    CATS = "cats"
    FACTS = "facts"  # size, colours, brightness, EXIF; a document's pages, title and scanned pages
    DOCUMENT = "document"  # a document's text: its beginning, and what was left out


# Notes that say what a photo shows (the rest, size and colours, do not).
_SEEN_IN_PHOTOS = {ObservationKind.LABELS, ObservationKind.OBJECTS, ObservationKind.CAPTION, ObservationKind.OCR,
                   ObservationKind.FACES, ObservationKind.CATS}

# What a user calls each kind of attachment; used for numbering ("Photo 2").
_KIND_LABEL = {AttachmentKind.IMAGE: "Photo", AttachmentKind.AUDIO: "Recording", AttachmentKind.DOCUMENT: "Document"}
# An assistant's own media (a spoken reply) are numbered apart from the user's.
_ASSISTANT_LABEL = {AttachmentKind.IMAGE: "Image", AttachmentKind.AUDIO: "Spoken reply",
                    AttachmentKind.DOCUMENT: "Document"}


def new_id() -> str:
    return uuid.uuid4().hex


@dataclass
class Attachment:
    """A file the user attached; `path` points at a copy the app owns."""

    kind: AttachmentKind
    path: str
    sha256: str
    name: str = ""
    label: str = ""  # "Photo 1", given by the conversation when the turn is added

    def __post_init__(self) -> None:
        self.kind = AttachmentKind(self.kind)


@dataclass
class Observation:
    """Something the encoder derived from an attachment, as text the decoder can read."""

    kind: ObservationKind
    text: str
    attachment: str = ""  # sha256 of the attachment it describes; "" for the whole turn
    source: str = ""  # which encoder produced it

    def __post_init__(self) -> None:
        self.kind = ObservationKind(self.kind)


@dataclass
class Turn:
    role: Role
    text: str = ""
    attachments: list[Attachment] = field(default_factory=list)
    observations: list[Observation] = field(default_factory=list)
    id: str = field(default_factory=new_id)
    created: float = field(default_factory=time.time)
    interrupted: bool = False  # an assistant reply stopped before it finished
    cut: bool = False  # an assistant reply that reached the token limit (max_new_tokens); it can be continued
    notice: bool = False  # shown in the chat but never sent to the model (e.g. a rejected upload)

    def __post_init__(self) -> None:
        self.role = Role(self.role)
        self.attachments = [a if isinstance(a, Attachment) else Attachment(**a) for a in self.attachments]
        self.observations = [o if isinstance(o, Observation) else Observation(**o) for o in self.observations]

    def notes_for(self, attachment: Attachment) -> list[Observation]:
        return [o for o in self.observations if o.attachment == attachment.sha256]

    def attachment_note(self, attachment: Attachment, brief: bool = False) -> str:
        """One bracketed line that tells the decoder what an attachment holds (`brief`: a document's
        text shortened, for the condensed note of dropped turns)."""
        notes = self.notes_for(attachment)
        if attachment.kind is AttachmentKind.DOCUMENT:
            about, text = _document_parts(notes)
            text = _shorten(text, _BRIEF_DOCUMENT_CHARS) if brief else text
            return (f"[{attachment.label}, the user's {_ordinal(attachment.label)} document ({about}). Its text:]\n"
                    f"{text or '(no text)'}\n[End of {attachment.label}.]")
        if attachment.kind is AttachmentKind.AUDIO:
            # The transcript is the user's own words: leave it unbracketed so the model answers it.
            spoken = " ".join(o.text for o in notes if o.kind is ObservationKind.TRANSCRIPT).strip()
            extra = "".join(f", {o.text}" for o in notes if o.kind is not ObservationKind.TRANSCRIPT)
            return f"[{attachment.label}: a voice message{extra}]\n" + (spoken or "(no recognisable speech)")
        details = _photo_details(notes)
        if details != _COULD_NOT_TELL:
            details = f"what the image models found in it: {details}"
        # Small models do not map "my first photo" to "Photo 1" by themselves. The file name stays
        # out: the model took "coffee.jpg" for what the photo shows. Worded on bench.quality: with
        # "[Photo 1, the user's first photo: text reads ...]" the 0.5B model answered "The sign is [Photo 1]".
        ordinal = _ordinal(attachment.label)
        return f"[{attachment.label} (the user's {ordinal} photo). {details[0].upper()}{details[1:]}]"

    def items(self, index: int) -> list[Item]:
        """The turn's attachments as the tracked state keeps them (labels, other names, notes)."""
        out = []
        for a in self.attachments:
            notes = self.notes_for(a)
            ordinal = _ordinal(a.label)
            if a.kind is AttachmentKind.AUDIO:
                spoken = " ".join(o.text for o in notes if o.kind is ObservationKind.TRANSCRIPT).strip()
                note = f'a voice message; the user said: "{spoken}"' if spoken else "a voice message without speech"
                names = (f"{ordinal} recording", f"{ordinal} voice message")
                kinds = ("voice message", "recording", "audio")
            elif a.kind is AttachmentKind.DOCUMENT:
                about, text = _document_parts(notes)
                note = f'{about}; it begins: "{_shorten(text, _ITEM_DOCUMENT_CHARS)}"'
                names = (f"{ordinal} document", f"{ordinal} pdf", f"{ordinal} file")
                kinds = ("document", "pdf")
            else:
                note = _photo_details(notes)
                names = (f"{ordinal} photo", f"{ordinal} picture", f"{ordinal} image")
                kinds = ("photo", "picture", "image", "pic")
            out.append(Item(a.label, names, note, index, kinds))
        return out

    def model_text(self) -> str:
        """The turn as the decoder reads it: attachment notes, then what was typed.

        A reply's own media (its spoken version) say nothing the text does not: they stay out.
        """
        if self.role is not Role.USER:
            return self.text
        lines = [self.attachment_note(a) for a in self.attachments]
        lines += [o.text for o in self.observations if not o.attachment]
        if self.text:
            lines.append(self.text)
        return "\n".join(lines)


@dataclass
class Message:
    """One message as handed to a decoder (chat-template style)."""

    role: Role
    content: str

    def __post_init__(self) -> None:
        self.role = Role(self.role)


@dataclass
class Conversation:
    id: str = field(default_factory=new_id)
    title: str = ""
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    turns: list[Turn] = field(default_factory=list)
    created: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.turns = [t if isinstance(t, Turn) else Turn(**t) for t in self.turns]

    # -- building -----------------------------------------------------------------
    def add_user_turn(self, turn: Turn) -> Turn:
        """Append a user turn, numbering its attachments per kind across the conversation."""
        self._number(turn, Role.USER, _KIND_LABEL)
        if not self.title:
            self.title = _title_from(turn)
        self.turns.append(turn)
        return turn

    def add_assistant_turn(self, text: str, interrupted: bool = False,
                           attachments: list[Attachment] = (), cut: bool = False) -> Turn:
        """Append a reply; its media (e.g. the reply spoken) are numbered apart from the user's."""
        turn = Turn(role=Role.ASSISTANT, text=text, interrupted=interrupted, attachments=list(attachments), cut=cut)
        self._number(turn, Role.ASSISTANT, _ASSISTANT_LABEL)
        self.turns.append(turn)
        return turn

    def _number(self, turn: Turn, role: Role, names: dict[AttachmentKind, str]) -> None:
        counts = {kind: 0 for kind in AttachmentKind}
        for a in self.attachments(role):
            counts[a.kind] += 1
        for a in turn.attachments:
            counts[a.kind] += 1
            a.label = a.label or f"{names[a.kind]} {counts[a.kind]}"

    def attachments(self, role: Role | None = Role.USER) -> list[Attachment]:
        """The attachments of `role`'s turns (the user's by default; None for all)."""
        return [a for t in self.turns if role is None or t.role is role for a in t.attachments]

    # -- rendering ----------------------------------------------------------------
    def render(self, count_tokens: Callable[[str], int], budget: int,
               relevance: Relevance | None = None, notes: bool = True) -> list[Message]:
        """Messages for the decoder whose total token count stays within `budget`.

        The system prompt and the newest turn always stay; a newest turn longer
        than the whole budget keeps its beginning and end. When the history is
        too long the oldest turns are dropped whole, and what they held is
        condensed into a note in the system message: every attachment's notes
        first (later turns often refer back to a photo or recording), then the
        user's own words, newest first, shortened if need be.

        The tracked state (`tracked`: facts the user stated, photos and recordings whose
        turns were dropped, the dropped messages most `relevance`-related to the newest one
        that the kept turns do not repeat) goes into
        the newest message: it changes every turn, so it must come after the
        history, whose rendering stays the same from turn to turn (the decoder
        reuses its cache for it). It gets a fixed share of the budget.

        `notes=False` leaves the tracked state out (for reply servers that map or cache
        histories by their text, see `ReplyGenerator.reads_notes`).
        """
        turns, messages, cost, base = self._costed(count_tokens)
        history = _history_budget(budget)
        first, note = self._window_start(turns, cost, base, history, count_tokens)
        window = self._window(messages, first, note)
        # The newest turn alone may be longer than the budget (a pasted document): keep what fits of it.
        over = count_tokens(window[0].content) + _MESSAGE_OVERHEAD + sum(cost[first:]) - history
        if over > 0 and len(window) > 1:
            newest = window[-1]
            window[-1] = Message(newest.role, _clipped(newest.content, count_tokens, cost[-1] - _MESSAGE_OVERHEAD - over))
        if notes and turns and turns[-1].role is Role.USER:
            dropped = [Said(t.text, i) for i, t in enumerate(turns[:first]) if t.role is Role.USER]
            kept = [Said(t.text, i) for i, t in enumerate(turns[first:-1], first) if t.role is Role.USER]
            block = self.tracked(turns[:-1]).render(turns[-1].text or window[-1].content, dropped, count_tokens,
                                                    budget - history, relevance, window=kept)
            if block:
                window[-1] = Message(Role.USER, f"{block}\n{window[-1].content}")
        return window

    def tracked(self, turns: list[Turn] | None = None) -> TrackedState:
        """The tracked state after `turns` (all turns by default), derived from them: nothing extra is stored."""
        state = TrackedState()
        for i, turn in enumerate(self.turns if turns is None else turns):
            if turn.role is Role.USER and not turn.notice:
                state.update(i, turn.text, turn.items(i))
        return state

    def render_ahead(self, count_tokens: Callable[[str], int], budget: int) -> list[Message] | None:
        """The history as `render` will give it once the window next moves, or None if that is not near.

        A move changes the start of the prompt, so the decoder must read the whole
        window again; reading it ahead of time, while the user reads the reply and
        types, keeps that turn as quick as the others. "Near" is within a quarter of
        the budget, a few turns ahead. Call it when the history ends with a reply.

        The next exchanges are simulated (each costing what the last one did), so the
        prediction is where `render` itself will move, not an estimate of it.
        """
        turns, messages, cost, base = self._costed(count_tokens)
        if not turns or turns[-1].role is not Role.ASSISTANT:
            return None
        budget = _history_budget(budget)
        current, _ = self._window_start(turns[:-1], cost[:-1], base, budget, count_tokens)  # the last prompt's
        asked = next(c for t, c in zip(reversed(turns), reversed(cost), strict=True) if t.role is Role.USER)
        future, future_cost, added = list(turns), list(cost), 0
        while added <= budget // 4:
            future.append(Turn(role=Role.USER))
            future_cost.append(asked)
            start, note = self._window_start(future, future_cost, base, budget, count_tokens)
            if start > current:
                # At len(turns) the window will hold only the next question: its start is still known.
                return self._window(messages, start, note) if start <= len(turns) else None
            future.append(Turn(role=Role.ASSISTANT))
            future_cost.append(cost[-1])
            added += asked + cost[-1]
        return None

    def _window_start(self, turns: list[Turn], cost: list[int], base: int, budget: int,
                      count_tokens: Callable[[str], int]) -> tuple[int, str]:
        """The first turn kept when the newest of `turns` is answered, and the note condensing those before it."""
        if base + sum(cost) <= budget:
            return 0, ""
        reserve = budget // 4  # room for the condensed note
        starts = self._window_starts(turns, cost, step=budget // 2)
        last = len(turns) - 1
        first = next(s for s in starts if s == last or base + reserve + sum(cost[s:]) <= budget)
        while True:
            note = self._condensed(turns[:first], count_tokens, reserve)
            if first >= last or base + count_tokens(note) + sum(cost[first:]) <= budget:
                return first, note
            first = next(s for s in starts if s > first)

    def _costed(self, count_tokens: Callable[[str], int]) -> tuple[list[Turn], list[Message], list[int], int]:
        """The turns the model reads, as messages, with their token costs and the system prompt's."""
        turns = [t for t in self.turns if not t.notice and (t.text or t.attachments or t.observations)]
        messages = [Message(t.role, t.model_text()) for t in turns]
        cost = [count_tokens(m.content) + _MESSAGE_OVERHEAD for m in messages]
        return turns, messages, cost, count_tokens(self.system_prompt) + _MESSAGE_OVERHEAD

    def _window(self, messages: list[Message], first: int, note: str) -> list[Message]:
        system = self.system_prompt + (f"\n\n{note}" if note else "")
        return [Message(Role.SYSTEM, system)] + messages[first:]

    @staticmethod
    def _window_starts(turns: list[Turn], cost: list[int], step: int) -> list[int]:
        """Where the kept window may begin: user turns at every `step` tokens of history.

        They depend only on earlier turns, so they do not move as the conversation
        grows; the rendered prefix then stays the same for many turns in a row and
        the decoder can reuse its cache for it. (A reply without its question
        confuses models, hence user turns.) The newest turn is always a candidate.
        """
        starts, seen, mark = [], 0, step
        for i, turn in enumerate(turns):
            if turn.role is Role.USER and seen >= mark:
                starts.append(i)
                mark = (seen // step + 1) * step
            seen += cost[i]
        return starts + [len(turns) - 1]

    @staticmethod
    def _condensed(dropped: list[Turn], count_tokens: Callable[[str], int], room: int) -> str:
        if not dropped:
            return ""
        header = "Earlier in this conversation (condensed):"
        facts = [f"- {t.attachment_note(a, brief=True)}" for t in dropped if t.role is Role.USER for a in t.attachments]
        said = [f'- The user said: "{_shorten(t.text, 200)}"' for t in reversed(dropped)
                if t.role is Role.USER and t.text]
        lines = [header] + facts
        for line in said:  # newest words first, while they fit
            if count_tokens("\n".join(lines + [line])) > room:
                break
            lines.append(line)
        return "\n".join(lines)

    # -- serialisation --------------------------------------------------------------
    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self), default=_enum_value))

    @classmethod
    def from_dict(cls, data: dict) -> Conversation:
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Conversation:
        return cls.from_dict(json.loads(text))


# Chat templates wrap each message in a few special tokens.
_MESSAGE_OVERHEAD = 6


def _history_budget(budget: int) -> int:
    """The part of a prompt budget for the system prompt and the history; the rest is the tracked state's.

    A fixed share, so where the window starts does not move with the state's size; small budgets
    still leave the state room for a few facts.
    """
    return budget - max(budget // 6, min(128, budget // 3))


# A document's text in the condensed note of dropped turns, and in the tracked state's list of
# attachments (whole there only when the newest message names the document).
_BRIEF_DOCUMENT_CHARS = 300
_ITEM_DOCUMENT_CHARS = 600


def _document_parts(notes: list[Observation]) -> tuple[str, str]:
    """A document's facts line and its text (excerpt), from its notes."""
    about = "; ".join(o.text for o in notes if o.kind is ObservationKind.FACTS) or "a PDF"
    return about, "\n".join(o.text for o in notes if o.kind is ObservationKind.DOCUMENT)


_COULD_NOT_TELL = "the image models could not tell what it shows"


def _photo_details(notes: list[Observation]) -> str:
    """What a photo's notes say, or that the models could not tell.

    Said outright and alone: given the size and colours, a small model describes those
    ("a bright, mostly white landscape") as if they were the answer.
    """
    if not any(o.kind in _SEEN_IN_PHOTOS for o in notes):
        return _COULD_NOT_TELL
    return "; ".join(o.text for o in notes)


def _enum_value(value):
    if isinstance(value, Enum):
        return value.value
    raise TypeError(f"not JSON serialisable: {value!r}")


def _shorten(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _clipped(text: str, count_tokens: Callable[[str], int], room: int) -> str:
    """`text` cut to at most `room` tokens, keeping its start and end (the request and the question
    after a pasted text are usually there) around a note saying how much was left out."""
    def cut(keep: int) -> str:
        head, tail = text[: keep - keep // 2], text[len(text) - keep // 2:]
        return f"{head}\n[… {len(text) - keep:,} characters left out: the message is longer than I can read …]\n{tail}"

    low, high = 0, len(text)  # binary search for the most characters that fit
    while low < high:
        middle = (low + high + 1) // 2
        if count_tokens(cut(middle)) <= room:
            low = middle
        else:
            high = middle - 1
    return cut(low)


_ORDINALS = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth"]


def _ordinal(label: str) -> str:
    """"Photo 2" -> "second"."""
    number = int(label.rsplit(" ", 1)[-1]) if label[-1:].isdigit() else 0
    if 1 <= number <= len(_ORDINALS):
        return _ORDINALS[number - 1]
    return f"{number}th"


def _title_from(turn: Turn) -> str:
    if turn.text.strip():
        return _shorten(turn.text, 60)
    if turn.attachments:
        return f"{_KIND_LABEL[turn.attachments[0].kind]} {turn.attachments[0].name}".strip()
    return ""
