"""One chat turn end to end: encode what the user sent, update the state, stream the reply.

`ChatService` is shared by every browser session; it owns the models and the
conversations, and knows nothing about Gradio.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from .decoder import GenerationSettings, ReplyGenerator
from .encoder import MultimodalEncoder
from .errors import UserFacingError
from .state import Conversation, Role, Turn

log = logging.getLogger(__name__)

SORRY = "Sorry, something went wrong on my side while answering. Your conversation is safe; please try again."


@dataclass
class ChatService:
    encoder: MultimodalEncoder
    generator: ReplyGenerator
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    system_prompt: str | None = None

    def __post_init__(self) -> None:
        self._conversations: dict[str, Conversation] = {}
        self._stops: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    # -- conversations ------------------------------------------------------------------
    def new_conversation(self) -> Conversation:
        conv = Conversation() if self.system_prompt is None else Conversation(system_prompt=self.system_prompt)
        with self._lock:
            self._conversations[conv.id] = conv
        return conv

    def conversation(self, conv_id: str | None) -> Conversation:
        """The conversation with this id, or a new one if the id is unknown."""
        with self._lock:
            conv = self._conversations.get(conv_id or "")
        return conv or self.new_conversation()

    def forget(self, conv_id: str) -> None:
        """Release a conversation's memory (its browser session ended)."""
        self.stop(conv_id)
        with self._lock:
            self._conversations.pop(conv_id, None)

    # -- a turn -------------------------------------------------------------------------------
    def respond(self, conv: Conversation, text: str, files: list[str] = (),
                settings: GenerationSettings | None = None) -> Iterator[str]:
        """Add the user's turn to `conv` and stream the reply, yielding the reply so far.

        The first value ("") comes once the user's turn is in the state, so a UI can
        show it (e.g. a voice message's transcript) before the reply starts. Input the
        encoder rejects becomes a pair of notice turns: shown, never sent to the model.
        """
        settings = settings or self.settings
        try:
            turn = self.encoder.encode(text, files)
        except UserFacingError as error:
            self._notice(conv, text, files, str(error))
            yield ""
            return
        except Exception:  # noqa: BLE001 - a crash in an encoder must not end the session
            log.exception("Encoding a turn failed")
            self._notice(conv, text, files, SORRY)
            yield ""
            return
        conv.add_user_turn(turn)
        yield ""

        stop = threading.Event()
        with self._lock:
            self._stops[conv.id] = stop
        reply = ""
        failed = finished = False
        try:
            messages = conv.render(self.generator.count_tokens, self.generator.prompt_budget(settings))
            for piece in self.generator.stream(messages, settings, stop):
                reply += piece
                yield reply
            finished = True
        except Exception:  # noqa: BLE001
            log.exception("Generating a reply failed")
            failed = True
        finally:
            # Runs on normal end, on stop, and when the consumer goes away (GeneratorExit).
            with self._lock:
                self._stops.pop(conv.id, None)
            if reply.strip() or not failed:
                conv.add_assistant_turn(reply.strip(), interrupted=stop.is_set() or not finished)
            if failed:
                conv.turns.append(Turn(role=Role.ASSISTANT, text=SORRY, notice=True))
        if failed:
            yield reply

    def stop(self, conv_id: str | None) -> bool:
        """Stop the reply being generated for this conversation, if any."""
        with self._lock:
            event = self._stops.get(conv_id or "")
        if event:
            event.set()
        return event is not None

    @staticmethod
    def _notice(conv: Conversation, text: str, files, message: str) -> None:
        names = [str(f).rsplit("/", 1)[-1] for f in files]
        shown = "\n".join(filter(None, [(text or "").strip()] + [f"📎 {n}" for n in names]))
        conv.turns.append(Turn(role=Role.USER, text=shown, notice=True))
        conv.turns.append(Turn(role=Role.ASSISTANT, text=message, notice=True))

