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

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from chatbot.conversation.owners import ChatSession
from chatbot.conversation.store import (
    ConversationNotFound,
    ConversationStore,
    ConversationSummary,
)
from chatbot.errors import UserFacingError
from chatbot.generation.base import FinishReason, GenerationSettings, ReplyGenerator
from chatbot.memory import Relevance
from chatbot.perception.encoder import MultimodalEncoder
from chatbot.state import Attachment, Conversation, Message, Role, Turn

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
        return conv.render(self.generator.count_tokens, budget, self.relevance)

    # -- internals ------------------------------------------------------------------------
    def _reply(self, owner: str, conv: Conversation, settings: GenerationSettings,
               continuing: Turn | None = None) -> Iterator[str]:
        """Stream a new reply, or more of `continuing` (the last turn), and record it when it ends."""
        running = _RunningReply(owner)
        with self._lock:
            self._running[conv.id] = running
        before = continuing.text if continuing else ""
        reply = ""
        failed = finished = False
        finish: FinishReason | None = None
        try:
            messages = self.prompt(conv, settings)
            pieces = self.generator.stream(messages, settings, running.stop)
            try:
                while True:
                    try:
                        piece = next(pieces)
                    except StopIteration as end:
                        finish = end.value
                        break
                    reply += piece
                    self._tell_listener("heard", owner, conv.id, reply)
                    yield before + reply
            finally:
                pieces.close()  # also when our consumer went away: the backend frees the CPU at once
            finished = True
        except Exception:  # noqa: BLE001
            log.exception("Generating a reply failed")
            failed = True
        finally:
            # Runs on normal end, on stop, and when the consumer goes away (GeneratorExit).
            with self._lock:
                if self._running.get(conv.id) is running:
                    del self._running[conv.id]
            interrupted = running.stop.is_set() or not finished
            cut = finish is FinishReason.LENGTH and not interrupted
            spoken = self._tell_listener("finished", owner, conv.id, reply.strip(), interrupted) or []
            self._record(owner, conv, before, reply, failed, interrupted, cut, continuing, spoken)
        if failed:
            yield before + reply
        elif finished:
            # While the user reads and types, read the window the next turns will move to (if near).
            ahead = conv.render_ahead(self.generator.count_tokens, self.generator.prompt_budget(settings))
            if ahead:
                self.generator.prefill(ahead)

    def _record(self, owner: str, conv: Conversation, before: str, reply: str, failed: bool, interrupted: bool,
                cut: bool, continuing: Turn | None, spoken: list[Attachment]) -> None:
        """Put the ended reply into `conv` and the store (unless the stored conversation moved on meanwhile)."""
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
                    conv.turns.append(Turn(role=Role.ASSISTANT, text=SORRY, notice=True))
                kept = self.store.replace_last(owner, conv.id, position, continuing)
                if kept and failed:
                    kept = self.store.append(owner, conv.id, position + 1, conv.turns[position + 1:])
            else:
                position = len(conv.turns)
                if reply.strip() or not failed:
                    conv.add_assistant_turn(reply.strip(), interrupted=interrupted, cut=cut, attachments=spoken)
                if failed:
                    conv.turns.append(Turn(role=Role.ASSISTANT, text=SORRY, notice=True))
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
