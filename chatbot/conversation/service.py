"""Chat turns end to end, and the conversations they belong to.

`ChatService` is shared by every browser session and API client; it owns the
models and the conversation store, and knows nothing about Gradio. Every
operation names an *owner* (see `resolve_owner`); the store refuses to show or
change a conversation to anyone but its owner.

Durability: a user's turn is saved before its reply starts, the reply when it
ends (stopped replies are kept, marked interrupted). A reply cut off by the
server dying is never written; on the next start `ConversationStore.close_unanswered`
marks it as an interrupted, empty reply, which the user can regenerate.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from chatbot import media
from chatbot.conversation.owners import ChatSession
from chatbot.conversation.store import (
    ConversationNotFound,
    ConversationStore,
    ConversationSummary,
)
from chatbot.errors import UserFacingError
from chatbot.generation.base import FinishReason, GenerationSettings, ReplyGenerator, loading
from chatbot.memory import Relevance
from chatbot.perception.encoder import MultimodalEncoder
from chatbot.state import DEFAULT_SYSTEM_PROMPT, Attachment, Conversation, Message, Role, Turn

log = logging.getLogger(__name__)

SORRY = "Sorry, something went wrong on my side while answering. Your conversation is safe; please try again."
MAX_TITLE_LENGTH = 120
NOTICE_TEXT_CHARS, NOTICE_FILES, NOTICE_NAME_CHARS = 500, 5, 120  # how much of a refused message is kept


def clean_title(title: str | None) -> str:
    """A title on one line, not too long; UserFacingError if nothing is left."""
    title = " ".join((title or "").split())[:MAX_TITLE_LENGTH]
    if not title:
        raise UserFacingError("A conversation needs a title; type one first.")
    return title


@dataclass
class _RunningReply:
    owner: str
    stop: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class IncomingMessage:
    """One message of a stateless client's request (the OpenAI protocol sends the whole history each time)."""

    role: Role
    text: str = ""
    files: tuple[Path, ...] = ()


@dataclass
class Answer:
    """A reply being generated for a stateless request: iterate `replies` for the reply so far."""

    conversation: Conversation
    prompt_tokens: int
    replies: Iterator[str]


class ReplyListener(Protocol):
    """Follows each reply while it is written (the voice that speaks it); knows nothing of the model."""

    def heard(self, owner: str, conv_id: str, reply: str) -> None:
        """The reply so far (called after every piece)."""

    def finished(self, owner: str, conv_id: str, reply: str, interrupted: bool) -> list[Attachment]:
        """The reply is complete or stopped: media to keep with it (never shown to the model)."""


# -- the service --------------------------------------------------------------------------
@dataclass
class ChatService:
    encoder: MultimodalEncoder
    generator: ReplyGenerator
    store: ConversationStore
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    system_prompt: str | None = None
    relevance: Relevance | None = None  # ranks condensed-out messages for the tracked state (word overlap if None)
    listener: ReplyListener | None = None  # e.g. chatbot.voice.speaker.ReplySpeaker

    def __post_init__(self) -> None:
        self._running: dict[str, _RunningReply] = {}
        self._lock = threading.Lock()
        # No reply runs yet: any user turn still waiting for one was cut off by a crash.
        closed = self.store.close_unanswered()
        if closed:
            log.warning("Marked %d reply(s) cut off by the last shutdown as interrupted", closed)

    def text_model_loading(self) -> bool:
        """Whether replies wait for the text model to load (the app loads it while serving the page)."""
        return loading(self.generator)

    # -- conversations ------------------------------------------------------------------
    def new_conversation(self) -> Conversation:
        """A fresh conversation; it is stored once it has a turn."""
        return Conversation() if self.system_prompt is None else Conversation(system_prompt=self.system_prompt)

    def conversation(self, owner: str, conv_id: str | None) -> Conversation:
        """The owner's conversation with this id as stored now, or a new one if there is none."""
        if conv_id:
            try:
                return self.store.load(owner, conv_id)
            except ConversationNotFound:
                pass
        return self.new_conversation()

    def open(self, owner: str, conv_id: str) -> Conversation:
        """The owner's conversation; ConversationNotFound for any other id (someone else's included)."""
        return self.store.load(owner, conv_id)

    def conversations(self, owner: str) -> list[ConversationSummary]:
        return self.store.list(owner)

    def search(self, owner: str, query: str) -> list[ConversationSummary]:
        """The owner's conversations whose title or words match `query` (all of them for an empty query)."""
        return self.store.search(owner, query) if query.strip() else self.store.list(owner)

    def rename(self, owner: str, conv_id: str, title: str) -> None:
        self.store.rename(owner, conv_id, clean_title(title))

    def delete(self, owner: str, conv_id: str) -> bool:
        self.stop(owner, conv_id)
        return self.store.delete(owner, conv_id)

    def export_json(self, owner: str, conv_id: str, include_files: bool = True) -> str:
        return self.store.export_json(owner, conv_id, include_files)

    def import_json(self, owner: str, text: str) -> Conversation:
        return self.store.import_json(owner, text)

    # -- turns ----------------------------------------------------------------------------
    def respond(self, owner: str, conv: Conversation, text: str, files: list[str] = (),
                settings: GenerationSettings | None = None) -> Iterator[str]:
        """Add the user's turn to `conv` and stream the reply, yielding the reply so far.

        The first value ("") comes once the user's turn is in the state and stored, so
        a UI can show it (e.g. a voice message's transcript) before the reply starts.
        Input the encoder rejects becomes a pair of notice turns: shown, never sent to
        the model.
        """
        try:
            turn = self.encoder.encode(text, files)
        except UserFacingError as error:
            self._notice(conv, text, files, str(error))
            self._save(owner, conv)
            yield ""
            return
        except Exception:  # noqa: BLE001 - a crash in an encoder must not end the session
            log.exception("Encoding a turn failed")
            self._notice(conv, text, files, SORRY)
            self._save(owner, conv)
            yield ""
            return
        conv.add_user_turn(turn)
        self._save(owner, conv)
        yield ""
        yield from self._reply(owner, conv, settings or self.settings)

    def answer(self, owner: str, messages: list[IncomingMessage],
               settings: GenerationSettings | None = None) -> Answer:
        """Answer the last user message of a whole history sent by a stateless client.

        The history is mapped onto one stored conversation of the owner (its id comes
        from the owner, system prompt and first message), so a client that sends its
        history again each turn continues the same conversation: the turns already
        stored, with what was observed in their attachments, are reused (nothing is
        encoded twice); a history that no longer matches starts a new conversation.
        Bad input raises UserFacingError before anything is stored.
        """
        if not messages or messages[-1].role is not Role.USER:
            raise UserFacingError("The last message must be the user's.")
        system = "\n\n".join(m.text for m in messages if m.role is Role.SYSTEM and m.text.strip())
        dialogue = [m for m in messages if m.role is not Role.SYSTEM]
        conv = self._thread(owner, system or self.system_prompt or DEFAULT_SYSTEM_PROMPT, dialogue[:-1],
                            dialogue[0])
        conv.add_user_turn(self.encoder.encode(dialogue[-1].text, list(dialogue[-1].files)))
        self._save(owner, conv)
        settings = settings or self.settings
        prompt = self.prompt(conv, settings)
        tokens = sum(self.generator.count_tokens(m.content) for m in prompt)
        return Answer(conv, tokens, self._reply(owner, conv, settings))

    def _thread(self, owner: str, system_prompt: str, history: list[IncomingMessage],
                first: IncomingMessage) -> Conversation:
        """The stored conversation `history` continues (extended by its new turns), or a new one."""
        def key(role: Role, text: str, shas) -> tuple:
            return role.value, text.strip(), tuple(shas)

        incoming = [key(m.role, m.text, map(media.sha256_file, m.files)) for m in history]
        seed = json.dumps([owner, system_prompt, key(first.role, first.text, map(media.sha256_file, first.files))])
        conv_id = hashlib.sha256(seed.encode()).hexdigest()[:32]
        try:
            conv = self.store.load(owner, conv_id)
        except ConversationNotFound:
            conv = Conversation(id=conv_id, system_prompt=system_prompt)
        # A reply's own media (its spoken audio) is not part of what a client sends back.
        stored = [key(t.role, t.text, (a.sha256 for a in t.attachments) if t.role is Role.USER else ())
                  for t in conv.turns if not t.notice]
        if conv.system_prompt != system_prompt or stored != incoming[:len(stored)]:
            conv, stored = Conversation(system_prompt=system_prompt), []  # the client changed its history
        for message in history[len(stored):]:
            if message.role is Role.USER:
                conv.add_user_turn(self.encoder.encode(message.text, list(message.files)))
            else:  # the encoder's cap on a message's length holds for the client's replies too
                if len(message.text.strip()) > self.encoder.limits.max_message_chars:
                    raise UserFacingError(f"A message is {len(message.text.strip()):,} characters long; messages "
                                          f"can have at most {self.encoder.limits.max_message_chars:,}.")
                conv.add_assistant_turn(message.text.strip())
        return conv

    def regenerate(self, owner: str, conv: Conversation, settings: GenerationSettings | None = None) -> Iterator[str]:
        """Replace the reply to the last user turn with a new one (streamed like `respond`)."""
        last = self._last_user_turn(conv)
        if last is None or conv.turns[last].notice:
            return  # nothing the model could answer
        del conv.turns[last + 1:]
        self._save(owner, conv)
        yield ""
        yield from self._reply(owner, conv, settings or self.settings)

    def edit(self, owner: str, conv: Conversation, turn_id: str, text: str,
             settings: GenerationSettings | None = None) -> Iterator[str]:
        """Change what a past user turn says, drop everything after it, and answer it anew.

        Its attachments and what was observed in them stay.
        """
        index = next((i for i, t in enumerate(conv.turns) if t.id == turn_id), None)
        if index is None or conv.turns[index].role is not Role.USER or conv.turns[index].notice:
            raise UserFacingError("Only your own messages in this conversation can be edited.")
        turn = conv.turns[index]
        text = (text or "").strip()
        if not text and not turn.attachments:
            raise UserFacingError("An edited message cannot be empty.")
        self.stop(owner, conv.id)
        turn.text = text
        del conv.turns[index + 1:]
        self._save(owner, conv)
        yield ""
        yield from self._reply(owner, conv, settings or self.settings)

    def continue_reply(self, owner: str, conv: Conversation,
                       settings: GenerationSettings | None = None) -> Iterator[str]:
        """Extend the last reply (one cut at the token limit, or stopped) where it ended; yields the whole reply."""
        last = conv.turns[-1] if conv.turns else None
        if last is None or last.role is not Role.ASSISTANT or last.notice or not (last.cut or last.interrupted):
            raise UserFacingError("There is no unfinished reply to continue.")
        yield last.text
        yield from self._reply(owner, conv, settings or self.settings, continuing=last)

    def replies_running(self) -> int:
        """How many replies are being written now (for a page to tell a new message it must wait)."""
        with self._lock:
            return len(self._running)

    def undo(self, owner: str, conv: Conversation) -> bool:
        """Remove the last exchange (the last user turn and what followed it)."""
        last = self._last_user_turn(conv)
        if last is None:
            return False
        self.stop(owner, conv.id)
        del conv.turns[last:]
        self._save(owner, conv)
        return True

    def clear(self, owner: str, conv: Conversation) -> None:
        """Empty the conversation; an empty conversation is not kept in the store."""
        self.stop(owner, conv.id)
        conv.turns.clear()
        conv.title = ""
        self._save(owner, conv)

    def stop(self, owner: str, conv_id: str | None) -> bool:
        """Stop the reply being generated for this owner's conversation, if any."""
        with self._lock:
            running = self._running.get(conv_id or "")
        if running is None or running.owner != owner:
            return False
        running.stop.set()
        return True

    def end_session(self, session: ChatSession | None) -> None:
        """A browser session ended: stop its reply (what was said so far is saved as interrupted)."""
        if session and session.owner:
            self.stop(session.owner, session.conversation_id)

    def prompt(self, conv: Conversation, settings: GenerationSettings | None = None) -> list[Message]:
        """The messages the reply model reads to answer the last turn of `conv`."""
        budget = self.generator.prompt_budget(settings or self.settings)
        return conv.render(self.generator.count_tokens, budget, self.relevance,
                           notes=getattr(self.generator, "reads_notes", True))

    # -- internals ------------------------------------------------------------------------
    def _reply(self, owner: str, conv: Conversation, settings: GenerationSettings,
               continuing: Turn | None = None) -> Iterator[str]:
        """Stream a new reply, or more of `continuing` (the last turn), and record it when it ends."""
        running = _RunningReply(owner)
        with self._lock:
            self._running[conv.id] = running
        before = continuing.text if continuing else ""
        reply = ""
        failed = finished = at_stop = False
        sorry = SORRY
        finish: FinishReason | None = None
        try:
            messages = self.prompt(conv, settings)
            pieces = self.generator.stream(messages, settings, running.stop, conversation=conv.id)
            try:
                while True:
                    try:
                        piece = next(pieces)
                    except StopIteration as end:
                        finish = end.value
                        break
                    reply += piece
                    cut_at = _cut_at_stop(reply, settings.stop)
                    if cut_at is not None:
                        reply, at_stop = cut_at, True
                        running.stop.set()  # ends the generation: the reply is complete
                        break
                    shown = _held_back(reply, settings.stop)
                    self._tell_listener("heard", owner, conv.id, shown)  # a stop string is never spoken
                    yield before + shown
            finally:
                pieces.close()  # also when our consumer went away: the backend frees the CPU at once
            finished = True
        except UserFacingError as error:  # e.g. a remote reply server that cannot be reached
            log.warning("Generating a reply failed: %s", error)
            failed, sorry = True, str(error)
        except Exception:  # noqa: BLE001
            log.exception("Generating a reply failed")
            failed = True
        finally:
            # Runs on normal end, on stop, and when the consumer goes away (GeneratorExit).
            with self._lock:
                if self._running.get(conv.id) is running:
                    del self._running[conv.id]
            interrupted = (running.stop.is_set() and not at_stop) or not finished
            cut = finish is FinishReason.LENGTH and not interrupted
            spoken = self._tell_listener("finished", owner, conv.id, reply.strip(), interrupted) or []
            self._record(owner, conv, before, reply, sorry if failed else None, interrupted, cut, continuing, spoken)
        if failed or settings.stop:
            # The whole of it: an ending held back as a possible stop string, or what came before a failure.
            yield before + reply
        if finished and not interrupted:  # a stop frees the CPU: nothing is read ahead after it
            # While the user reads and types, read what the next prompt will start with: the history as it
            # stands, then the window the next turns will move to (if near). The former is needed because the
            # tracked-state block sat in front of the question just answered and is gone from it next turn,
            # so the cache holds that question and its reply behind a block the next prompt no longer has
            # (reading only the moved window, the turns before a move read the last block, question and reply again).
            count, budget = self.generator.count_tokens, self.generator.prompt_budget(settings)
            self.generator.prefill(conv.render(count, budget), conversation=conv.id)
            moved = conv.render_ahead(count, budget)
            if moved:
                self.generator.prefill(moved, conversation=conv.id)

    def _record(self, owner: str, conv: Conversation, before: str, reply: str, failure: str | None,
                interrupted: bool, cut: bool, continuing: Turn | None, spoken: list[Attachment]) -> None:
        """Put the ended reply into `conv` and the store (unless the stored conversation moved on meanwhile).

        `failure`: the notice to add after the reply when generating it failed.
        """
        failed = failure is not None
        try:
            if continuing is not None:
                position = len(conv.turns) - 1  # the continued reply is the last turn
                if reply.strip():
                    continuing.text = (before + reply).strip()
                    continuing.attachments.extend(spoken)
                    continuing.interrupted, continuing.cut = interrupted, cut
                elif not (failed or interrupted):  # the model had nothing to add: the reply is complete
                    continuing.interrupted = continuing.cut = False
                if failed:
                    conv.turns.append(Turn(role=Role.ASSISTANT, text=failure, notice=True))
                kept = self.store.replace_last(owner, conv.id, position, continuing)
                if kept and failed:
                    kept = self.store.append(owner, conv.id, position + 1, conv.turns[position + 1:])
            else:
                position = len(conv.turns)
                if reply.strip() or not failed:
                    conv.add_assistant_turn(reply.strip(), interrupted=interrupted, cut=cut, attachments=spoken)
                if failed:
                    conv.turns.append(Turn(role=Role.ASSISTANT, text=failure, notice=True))
                kept = self.store.append(owner, conv.id, position, conv.turns[position:])
            if not kept:
                log.info("Conversation %s changed while replying; the reply was not kept", conv.id)
        except Exception:  # noqa: BLE001 - the reply is shown; its loss is logged
            log.exception("Saving the reply failed")

    def _tell_listener(self, event: str, *args):
        if self.listener is None:
            return None
        try:
            return getattr(self.listener, event)(*args)
        except Exception:  # noqa: BLE001 - a failing voice must not lose the reply
            log.exception("The reply listener failed on %s", event)
            return None

    def _save(self, owner: str, conv: Conversation) -> None:
        if conv.turns:
            self.store.save(owner, conv)
        else:
            self.store.delete(owner, conv.id)

    @staticmethod
    def _last_user_turn(conv: Conversation) -> int | None:
        return next((i for i in range(len(conv.turns) - 1, -1, -1) if conv.turns[i].role is Role.USER), None)

    @staticmethod
    def _notice(conv: Conversation, text: str, files, message: str) -> None:
        # What was sent, shortened: a refused 2 MB message or 200 files must not be stored whole.
        names = [f"📎 {str(f).rsplit('/', 1)[-1][:NOTICE_NAME_CHARS]}" for f in files[:NOTICE_FILES]]
        if len(files) > NOTICE_FILES:
            names.append(f"📎 … and {len(files) - NOTICE_FILES} more")
        text = (text or "").strip()
        if len(text) > NOTICE_TEXT_CHARS:
            text = text[:NOTICE_TEXT_CHARS].rstrip() + f" … ({len(text):,} characters in all)"
        shown = "\n".join(filter(None, [text] + names))
        conv.title = conv.title or " ".join(shown.split())[:60]
        conv.turns.append(Turn(role=Role.USER, text=shown, notice=True))
        conv.turns.append(Turn(role=Role.ASSISTANT, text=message, notice=True))


def _cut_at_stop(reply: str, stops: tuple[str, ...]) -> str | None:
    """The reply up to the first stop string in it, or None if there is none."""
    found = [reply.index(s) for s in stops if s and s in reply]
    return reply[:min(found)] if found else None


def _held_back(reply: str, stops: tuple[str, ...]) -> str:
    """The reply less an ending that may be the start of a stop string (not shown until it is known)."""
    keep = len(reply)
    for stop in filter(None, stops):
        for size in range(min(len(stop) - 1, len(reply)), 0, -1):
            if reply.endswith(stop[:size]):
                keep = min(keep, len(reply) - size)
                break
    return reply[:keep]
