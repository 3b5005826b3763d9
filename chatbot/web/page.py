"""The Gradio chat page: a thin layer that shows the dialogue state and forwards input.

Everything it does goes through `ChatService`. `ChatPage` holds the service and
one handler method per control; `build()` lays the page out from small methods
(`sidebar_panel`, `chat_area`, `input_row`, `wire`) that a subclass can extend,
e.g. to add voice controls beside the message box. Per browser tab the page
keeps only a `ChatSession` (whose conversations, which one is open) and, in the
browser's local storage, a random owner key that brings the same conversation
list back after a reload or a server restart.

Streamed updates are built from a copy of the chat taken when the user's turn is
in, plus the reply so far; the final update is read back from the store, so the
page never renders an object the service is still changing.
"""

from __future__ import annotations

import functools
import html
import inspect
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import gradio as gr

from chatbot.conversation.listing import list_label
from chatbot.conversation.owners import (
    MIN_KEY_LENGTH,
    ChatSession,
    new_owner_key,
    resolve_owner,
)
from chatbot.conversation.service import ChatService, clean_title
from chatbot.errors import UserFacingError
from chatbot.state import AttachmentKind, Conversation, ObservationKind, Role, Turn
from chatbot.web.security import Throttle

if TYPE_CHECKING:  # voice (call mode) needs torch; the page itself must load without it
    from chatbot.web.voice import VoiceOptions

log = logging.getLogger(__name__)
ASSETS = Path(__file__).resolve().parents[2] / "assets"
STATIC = Path(__file__).resolve().parent / "static"
OWNER_STORAGE_KEY = "multimodal-chatbot-owner"
LAST_CONVERSATION_KEY = "multimodal-chatbot-last-conversation"  # reopened after a reload
FINISHED = "Reply finished."
UPDATE_EVERY = 0.2
# Shown under a reply that reached the token limit (the service marks it cut; Continue writes on).
CUT_MARK = "\n\n*(cut short at the length limit: press Continue for more)*"
# While a reply runs the box offers Stop in place of Send (the two also look different: static/page.css).
_BUSY_BOX = dict(interactive=False, submit_btn=False, stop_btn=True)
_IDLE_BOX = dict(interactive=True, submit_btn=True, stop_btn=False)
# After a reply the cursor goes back to the message box, ready for the next message.
_FOCUS_BOX = "() => { setTimeout(() => document.querySelector('#message-box textarea')?.focus(), 50); }"
# A new chat empties the title box in the browser at once: a name typed right after must not be wiped by
# the server's answer to the click, which can come later.
_EMPTY_TITLE = "() => ''"
# Icons shipped with the page (static/page.css draws them), not emoji: a system without an emoji font shows
# emoji as empty boxes. Each is followed by its words for screen readers (the chat's sanitizer drops aria-label).
MIC_ICON = '<span class="chat-icon chat-icon-mic"></span><span class="sr-only">Recording:</span>'
FILE_ICON = '<span class="chat-icon chat-icon-file"></span><span class="sr-only">File:</span>'

_EXAMPLES = [
    {"text": "Hi! My name is Ana and I love hiking. Can you suggest a short weekend plan?"},
    {"text": "What does the sign say?", "files": [str(ASSETS / "examples" / "sign.png")]},
    {"text": "", "files": [str(ASSETS / "examples" / "capital-of-france.wav")]},
    {"text": "Explain what a Python list comprehension is, with one example."},
]
# Words for each example (an example with only a recording would otherwise be a button without a name).
_EXAMPLE_LABELS = ["Plan a weekend hike", "Read a sign in a photo", "Ask by voice: the capital of France",
                   "Explain list comprehensions"]


# -- the conversation as Chatbot messages ---------------------------------------------------
def _turn_content(turn: Turn) -> list:
    """A turn as Gradio chat content: media first (thumbnails, players), then words."""
    parts: list = []
    for attachment in turn.attachments:
        parts.append({"path": attachment.path, "alt_text": attachment.label})
        if attachment.kind is AttachmentKind.AUDIO and turn.role is Role.USER:
            spoken = " ".join(o.text for o in turn.notes_for(attachment) if o.kind is ObservationKind.TRANSCRIPT)
            parts.append(f"{MIC_ICON} *{spoken}*" if spoken else f"{MIC_ICON} *(no words recognised)*")
        if attachment.kind is AttachmentKind.DOCUMENT:  # shown as a download link named by its hash
            name = html.escape(re.sub(r"[*_`\[\]\\]", "", attachment.name))  # a file name, not markdown
            parts.append(f"*{attachment.label}: {name}*")
    # A refused message lists its files one per line, each marked 📎 (stored words; drawn as an icon here).
    text = re.sub(r"^📎 ", FILE_ICON + " ", turn.text, flags=re.M) if turn.notice else turn.text
    text += "\n\n*(stopped)*" if turn.interrupted else ""
    text += CUT_MARK if turn.cut else ""
    if text.strip():
        parts.append(text)
    return parts


def shown_turns(conv: Conversation) -> list[Turn]:
    """The turns the chat shows, in order: message i of the Chatbot is shown_turns(conv)[i]."""
    return [t for t in conv.turns if t.role is not Role.SYSTEM and (t.text or t.attachments or t.interrupted)]


def chat_messages(conv: Conversation, reply: str | None = None) -> list[dict]:
    """The conversation as Chatbot messages (new objects each call), plus the reply still being written."""
    messages = [{"role": t.role.value, "content": _turn_content(t)} for t in shown_turns(conv)]
    if reply:
        messages.append({"role": "assistant", "content": reply})
    return messages


def _discard_uploads(files: list[str]) -> None:
    """Remove uploads from Gradio's temp dir once the app is done with them (kept files are in media/)."""
    uploads = Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio").resolve()
    for file in files:
        path = Path(file).resolve()
        if path.is_relative_to(uploads) and path != uploads:
            path.unlink(missing_ok=True)
            if path.parent != uploads and not any(path.parent.iterdir()):
                path.parent.rmdir()


def _refused(conv: Conversation) -> bool:
    """Whether the last message sent was refused (it became a pair of notice turns)."""
    return len(conv.turns) >= 2 and conv.turns[-2].role is Role.USER and conv.turns[-2].notice


def _user_error(fn, error: UserFacingError) -> gr.Error:
    """What the person did wrong is one log line, not a traceback, and the reason shown to them."""
    log.info("%s: %s", fn.__name__, error)
    return gr.Error(str(error), print_exception=False)


def _shown_errors(fn):
    """UserFacingError → gr.Error, so the person sees the reason (Gradio hides other errors)."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def stream(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except UserFacingError as error:
                raise _user_error(fn, error) from error
        return stream

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserFacingError as error:
            raise _user_error(fn, error) from error
    return call


def paced(replies: Iterable[str], every: float, clock: Callable[[], float] = time.monotonic) -> Iterator[str]:
    """A streamed reply's values at most one per `every` seconds (the newest then), the first words and the end at once.

    Each update carries the whole chat, which Gradio walks and diffs on a thread that takes CPU from the model's two
    (README, "Replies after a recording, and through the page").
    """
    last = pending = None
    shown_at = 0.0
    for reply in replies:
        if last and clock() - shown_at < every:
            pending = reply
            continue
        yield reply
        last, pending, shown_at = reply, None, clock()
    if pending is not None:
        yield pending


def _message_parts(message: dict | None) -> tuple[str, list[str]]:
    """Text and file paths of a MultimodalTextbox value (as the page or an API client sends it)."""
    message = message or {}
    files = [f if isinstance(f, str) else f["path"] for f in message.get("files") or []]
    return message.get("text") or "", files


def export_name(conv: Conversation) -> str:
    """A file name people recognise: the title and the date, e.g. `weekend-hike-2026-11-24.json`."""
    words = re.sub(r"[^a-z0-9]+", "-", conv.title.lower()).strip("-")[:60].rstrip("-") or "conversation"
    return f"{words}-{time.strftime('%Y-%m-%d', time.localtime(conv.created))}.json"


def status_html(words: str, busy: bool = False) -> str:
    """The reply status line; while busy the page's script counts seconds beside the words."""
    if not busy:
        return f"<span>{html.escape(words)}</span>"
    return f'<span class="busy">{html.escape(words)}</span><span aria-hidden="true" data-elapsed></span>'


def _unfinished(conv: Conversation) -> bool:
    """Whether the last reply can be continued (cut at the length limit, or stopped)."""
    last = conv.turns[-1] if conv.turns else None
    return bool(last and last.role is Role.ASSISTANT and not last.notice and (last.cut or last.interrupted))


@dataclass(frozen=True)
class Accepted:
    """A message the page has shown, and the tab's place when it was sent: the tab may open another
    conversation while the message waits for the model, and the reply belongs where it was asked."""

    message: dict
    session: ChatSession


@dataclass
class Controls:
    """The components handlers read and write; `build()` fills it, subclasses may add their own."""

    session: gr.State
    owner_key: gr.BrowserState
    last_conversation: gr.BrowserState
    chatbot: gr.Chatbot
    box: gr.MultimodalTextbox
    conv_list: gr.Radio
    search_box: gr.Textbox
    title_box: gr.Textbox
    new_btn: gr.Button
    rename_btn: gr.Button
    delete_btn: gr.Button
    export_btn: gr.Button
    import_btn: gr.UploadButton
    export_file: gr.File
    status: gr.HTML
    continue_btn: gr.Button
    confirm_row: gr.Row
    confirm_text: gr.Markdown
    confirm_yes: gr.Button
    confirm_no: gr.Button


class ChatPage:
    """The chat page over one ChatService. Handlers are methods; `build()` returns the Gradio app."""

    def __init__(self, service: ChatService, browser_secret: str, concurrency_limit: int = 1,
                 voice: VoiceOptions | None = None, update_every: float = UPDATE_EVERY):
        """`browser_secret` encrypts the owner key in browsers; keep it across restarts or lists are lost.

        `voice`: spoken replies and call mode (chatbot.web.voice); None leaves them off the page.
        """
        self.service = service
        self.voice = voice
        self.browser_secret = browser_secret
        self.concurrency_limit = concurrency_limit
        self._exports = tempfile.TemporaryDirectory(prefix="chatbot-exports-")  # removed when the app exits
        # Owner keys are unguessable; still, make guessing slow. Generous: one office behind one address opens
        # many new browsers (each a new key with no conversations yet).
        self._key_throttle = Throttle(free=20)
        self.update_every = update_every  # seconds between a streamed reply's updates (see `paced`)

    # -- who and where -------------------------------------------------------------------
    @staticmethod
    def owner_of(session: ChatSession, request: gr.Request) -> str:
        # Browsers get their owner at page load; an API client is its Gradio session unless it chose a key.
        return session.owner or resolve_owner(user=request.username, session_hash=request.session_hash)

    def opened(self, session: ChatSession, request: gr.Request) -> tuple[str, Conversation]:
        owner = self.owner_of(session, request)
        conv = self.service.conversation(owner, session.conversation_id)
        if not conv.turns and session.title:
            conv.title = session.title  # named before its first message: kept when that message stores it
        return owner, conv

    def conversation_choices(self, owner: str, query: str = "") -> list[tuple[str, str]]:
        """The side panel's lines (title and day) of the owner's conversations that match `query`."""
        now = time.time()
        return [(list_label(c, now), c.id) for c in self.service.search(owner, query or "")]

    def conversation_list(self, session: ChatSession, request: gr.Request, query: str = "") -> gr.Radio:
        owner = self.owner_of(session, request)
        choices = self.conversation_choices(owner, query)
        current = session.conversation_id if any(cid == session.conversation_id for _, cid in choices) else None
        return gr.Radio(choices=choices, value=current)

    def search_list(self, query: str, session: ChatSession, request: gr.Request) -> gr.Radio:
        """The list as the search box is typed in."""
        return self.conversation_list(session, request, query)

    def sidebar(self, session: ChatSession, request: gr.Request, query: str = ""):
        """The list (filtered by the search box) and the title of the open conversation.

        A new chat without a name given leaves the title box as it is: it was emptied in the browser
        when the chat began, and whatever the person has typed there since is theirs."""
        _, conv = self.opened(session, request)
        title = gr.Textbox(value=conv.title) if conv.turns or session.title else gr.skip()
        return self.conversation_list(ChatSession(session.owner, conv.id), request, query), title

    def on_load(self, key: str | None, last: str | None, request: gr.Request):
        """Who this browser is, and its conversation in use before the reload (else the latest one) reopened."""
        if not isinstance(key, str) or len(key) < MIN_KEY_LENGTH:
            key = new_owner_key()
        owner = resolve_owner(user=request.username, key=key)
        listed = [c.id for c in self.service.conversations(owner)]
        reopened = last if isinstance(last, str) and last in listed else next(iter(listed), None)
        return ChatSession(owner, reopened), key, self.stored_messages(owner, reopened)

    # -- turns ----------------------------------------------------------------------------
    def streamed(self, owner: str, conv: Conversation, replies: Iterable[str],
                 keep_last: bool = True) -> Iterator[tuple]:
        """Chat updates for a streamed reply: (messages, message box, session).

        `keep_last=False` when the reply streamed is the conversation's last turn, continued.
        """
        session = ChatSession(owner, conv.id)
        locked = gr.MultimodalTextbox(value=None, **_BUSY_BOX)
        shown: list[dict] | None = None
        for reply in paced(replies, self.update_every):
            if shown is None:
                shown = chat_messages(conv)  # the user's turn is in: a copy of the chat so far
                shown = shown if keep_last else shown[:-1]
            yield [*shown, {"role": "assistant", "content": reply}] if reply else shown, locked, session
        yield self.stored_messages(owner, conv.id), gr.MultimodalTextbox(**_IDLE_BOX), session

    def stored_messages(self, owner: str, conv_id: str | None) -> list[dict]:
        return chat_messages(self.service.conversation(owner, conv_id))

    def waiting_words(self, files: list[str] = ()) -> str:
        """What a new message (with these files) waits for, in plain words."""
        others = self.service.replies_running() - self.concurrency_limit + 1
        if others > 0:
            return f"Waiting for {others} other {'reply' if others == 1 else 'replies'} to finish…"
        if self.service.text_model_loading():
            return "Loading the text model first (seconds; a minute or two at the first start after installing)…"
        if loading := self.service.encoder.models_to_load(files):
            # Their first use in a while: seconds more than usual, said so the wait is not a mystery.
            return f"Loading {' and '.join(loading)} first (a few seconds)…"
        return "Thinking…"

    @_shown_errors
    def accept(self, message: dict | None, session: ChatSession, request: gr.Request):
        """Show the message in the chat at once (it may wait for a free model) and lock the box."""
        text, files = _message_parts(message)
        if not text.strip() and not files:
            raise UserFacingError("Type a message, attach a photo or record your voice first.")
        owner, conv = self.opened(session, request)
        shown = [*chat_messages(conv), {"role": "user", "content": [*({"path": f} for f in files), *([text] if text else [])]}]
        return shown, gr.MultimodalTextbox(value=None, **_BUSY_BOX), Accepted(message, session), gr.HTML(
            status_html(self.waiting_words(files), busy=True)), gr.Button(visible=False)

    def busy(self):
        """Box and status while a retry, edit or continue waits for and runs the model."""
        return gr.MultimodalTextbox(**_BUSY_BOX), gr.HTML(status_html(self.waiting_words(), busy=True)), gr.Button(
            visible=False)

    def after_reply(self, session: ChatSession, query: str, request: gr.Request):
        """Side panel, status line ("Reply finished."), Continue and a free message box once a reply ended.

        The box is freed here too, as a reply that failed never sent its last update."""
        return *self._after(session, query, request, FINISHED), gr.MultimodalTextbox(**_IDLE_BOX)

    def after_change(self, session: ChatSession, query: str, request: gr.Request):
        """The same after any other change (open, rename, undo...), with a quiet status line."""
        return self._after(session, query, request, "")

    def after_load(self, session: ChatSession, query: str, request: gr.Request):
        """`after_change` without the status line: a message sent while the page loaded may already say "Thinking…"."""
        radio, title, _, *rest = self.after_change(session, query, request)
        return radio, title, *rest

    def _after(self, session: ChatSession, query: str, request: gr.Request, words: str):
        _, conv = self.opened(session, request)
        radio, title = self.sidebar(session, request, query)
        return (radio, title, gr.HTML(status_html(words if conv.turns else "")), gr.Button(visible=_unfinished(conv)),
                gr.File(value=None, visible=False),  # an earlier export link would be stale
                gr.Column(visible=False),  # so would a question about deleting
                conv.id if conv.turns else session.conversation_id)  # the conversation a reload reopens

    @_shown_errors
    def respond(self, message: dict | None, session: ChatSession, request: gr.Request):
        owner, conv = self.opened(session, request)
        text, files = _message_parts(message)
        try:
            yield from self.streamed(owner, conv, self.service.respond(owner, conv, text, files))
        finally:
            if _refused(conv):  # a refused upload must not linger on disk
                _discard_uploads(files)

    def respond_accepted(self, accepted: Accepted, request: gr.Request):
        yield from self.respond(accepted.message, accepted.session, request)

    @_shown_errors
    def regenerate(self, session: ChatSession, request: gr.Request):
        owner, conv = self.opened(session, request)
        yield from self.streamed(owner, conv, self.service.regenerate(owner, conv))

    @_shown_errors
    def edit(self, index: float | None, text: str, session: ChatSession, request: gr.Request):
        owner, conv = self.opened(session, request)
        turns = shown_turns(conv)
        position = int(index) if index is not None else -1
        if not 0 <= position < len(turns):
            raise UserFacingError("There is no such message to edit.")
        yield from self.streamed(owner, conv, self.service.edit(owner, conv, turns[position].id, text))

    @_shown_errors
    def continue_reply(self, session: ChatSession, request: gr.Request):
        owner, conv = self.opened(session, request)
        yield from self.streamed(owner, conv, self.service.continue_reply(owner, conv), keep_last=False)

    def edit_in_chat(self, data: gr.EditData, session: ChatSession, request: gr.Request):
        value = data.value if isinstance(data.value, str) else " ".join(
            p.get("text", "") for p in data.value if isinstance(p, dict))
        yield from self.edit(data.index, value, session, request)

    def undo(self, session: ChatSession, request: gr.Request):
        owner, conv = self.opened(session, request)
        self.service.undo(owner, conv)
        return self.stored_messages(owner, conv.id), ChatSession(owner, conv.id)

    def clear(self, session: ChatSession, request: gr.Request):
        owner, conv = self.opened(session, request)
        self.service.clear(owner, conv)
        return [], gr.MultimodalTextbox(**_IDLE_BOX), ChatSession(owner, conv.id)

    def stop(self, session: ChatSession, request: gr.Request) -> None:
        self.service.stop(self.owner_of(session, request), session.conversation_id)

    # -- conversations ---------------------------------------------------------------------
    def new_chat(self, session: ChatSession, request: gr.Request):
        owner = self.owner_of(session, request)
        return [], gr.MultimodalTextbox(value=None, **_IDLE_BOX), ChatSession(owner, None)

    @_shown_errors
    def open_conversation(self, conv_id: str, session: ChatSession, request: gr.Request):
        owner = self.owner_of(session, request)
        conv = self.service.open(owner, conv_id or "")
        return chat_messages(conv), ChatSession(owner, conv.id)

    @_shown_errors
    def use_key(self, key: str, request: gr.Request):
        client = getattr(getattr(request, "client", None), "host", None) or "unknown"
        wait = self._key_throttle.wait(client)
        if wait > 0:
            raise UserFacingError(f"Too many keys tried from here; try again in {wait:.0f} s.")
        session = ChatSession(owner=resolve_owner(user=request.username, key=key))
        listed = self.list_conversations(session, request)
        # A key with no conversations counts as a guess (a brand-new key is too, harmlessly).
        (self._key_throttle.succeeded if listed else self._key_throttle.failed)(client)
        return session, listed

    def list_conversations(self, session: ChatSession, request: gr.Request) -> list[dict]:
        return self.search_conversations("", session, request)

    def search_conversations(self, query: str, session: ChatSession, request: gr.Request) -> list[dict]:
        """The owner's conversations whose title or words match `query` (all for an empty one), newest first."""
        return [{"id": c.id, "title": c.title, "turns": c.turns, "created": c.created, "updated": c.updated}
                for c in self.service.search(self.owner_of(session, request), query or "")]

    @_shown_errors
    def rename(self, title: str, session: ChatSession, request: gr.Request) -> ChatSession:
        owner, conv = self.opened(session, request)
        if not conv.turns:  # a new chat is stored with its first message; until then the tab keeps the name
            return ChatSession(owner, conv.id, clean_title(title))
        self.service.rename(owner, conv.id, title)
        return ChatSession(owner, conv.id)

    @_shown_errors
    def ask_delete(self, session: ChatSession, request: gr.Request):
        """The question before deleting: which conversation, and that it cannot be undone."""
        owner, conv = self.opened(session, request)
        if not conv.turns:
            raise UserFacingError("This chat is not saved yet; there is nothing to delete.")
        return gr.Column(visible=True), gr.Markdown(
            f"Delete **{html.escape(conv.title or 'this conversation')}** for good?")

    def delete(self, session: ChatSession, request: gr.Request):
        owner = self.owner_of(session, request)
        if session.conversation_id:
            self.service.delete(owner, session.conversation_id)
        return self.new_chat(session, request)

    @_shown_errors
    def export(self, session: ChatSession, request: gr.Request) -> str:
        """The exported file's path (API clients get the file itself; the page then shows its link)."""
        owner, conv = self.opened(session, request)
        if not conv.turns:
            raise UserFacingError("This conversation is empty; there is nothing to export yet.")
        path = Path(self._exports.name) / conv.id / export_name(conv)
        path.parent.mkdir(exist_ok=True)
        path.write_text(self.service.export_json(owner, conv.id), encoding="utf-8")
        return str(path)

    @_shown_errors
    def import_conversation(self, file: str | None, session: ChatSession, request: gr.Request):
        if not file:
            raise UserFacingError("Choose an exported conversation (.json) to import.")
        owner = self.owner_of(session, request)
        try:
            text = Path(file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            raise UserFacingError("That file is not a conversation exported from this app.") from None
        finally:
            _discard_uploads([file])  # its content is in the database now (or refused)
        conv = self.service.import_json(owner, text)
        return chat_messages(conv), ChatSession(owner, conv.id)

    # -- layout ---------------------------------------------------------------------------
    def sidebar_panel(self) -> dict:
        with gr.Sidebar(label="Conversations", open=True):
            new_btn = gr.Button("New chat", variant="primary")
            search_box = gr.Textbox(label="Search conversations", placeholder="Words from a title or a message",
                                    max_lines=1, elem_id="conversation-search")
            conv_list = gr.Radio(label="Conversations", choices=[], elem_id="conversation-list")
            title_box = gr.Textbox(label="Title of this conversation", max_lines=1)
            with gr.Row():
                rename_btn = gr.Button("Rename", size="sm")
                delete_btn = gr.Button("Delete…", size="sm", variant="stop")
            # Deleting asks first (the only delete control: the chat's own bin is not offered).
            with gr.Column(visible=False, elem_id="confirm-delete") as confirm_row:
                confirm_text = gr.Markdown()
                with gr.Row():
                    confirm_yes = gr.Button("Yes, delete it", size="sm", variant="stop")
                    confirm_no = gr.Button("Keep it", size="sm")
            with gr.Row():
                export_btn = gr.Button("Export", size="sm")
                import_btn = gr.UploadButton("Import", size="sm", file_types=[".json"], file_count="single")
            export_file = gr.File(label="Exported conversation", interactive=False, visible=False)
        return dict(new_btn=new_btn, conv_list=conv_list, search_box=search_box, title_box=title_box, rename_btn=rename_btn,
                    delete_btn=delete_btn, export_btn=export_btn, import_btn=import_btn, export_file=export_file,
                    confirm_row=confirm_row, confirm_text=confirm_text, confirm_yes=confirm_yes, confirm_no=confirm_no)

    def chat_area(self) -> gr.Chatbot:
        gr.Markdown("### Multimodal Chatbot\nType, attach photos, or press the microphone and speak.")
        return gr.Chatbot(label="Conversation", height=560, elem_id="chat", buttons=["copy"], editable="user",
                          placeholder="Say hello, share a photo, or record a question.")

    def reply_controls(self) -> tuple[gr.HTML, gr.Button]:
        """The status line (a live region: thinking, waiting, finished) and Continue for a cut reply."""
        with gr.Row(equal_height=True):
            status = gr.HTML("", elem_id="reply-status", padding=False)
            continue_btn = gr.Button("Continue the reply", size="sm", visible=False, elem_id="continue-reply",
                                     scale=0, min_width=160)
        return status, continue_btn

    def input_row(self) -> gr.MultimodalTextbox:
        """The message box; override to put more controls (e.g. voice) beside it."""
        box = gr.MultimodalTextbox(
            sources=["upload", "microphone"], file_types=["image", "audio", ".pdf"], file_count="multiple",
            placeholder="Type a message, attach photos or PDFs, or record your voice…", show_label=False,
            autofocus=True, stop_btn=False, elem_id="message-box")
        gr.Examples(examples=_EXAMPLES, inputs=box, label="Try", example_labels=_EXAMPLE_LABELS)
        return box

    def build(self) -> gr.Blocks:
        with gr.Blocks(title="Multimodal Chatbot") as demo:
            owner_key = gr.BrowserState(None, storage_key=OWNER_STORAGE_KEY, secret=self.browser_secret)
            last_conversation = gr.BrowserState(None, storage_key=LAST_CONVERSATION_KEY, secret=self.browser_secret)
            # Per browser tab; holds ids only, so ending a session just stops its running reply.
            session = gr.State(ChatSession(), delete_callback=self.service.end_session)
            panel = self.sidebar_panel()
            chatbot = self.chat_area()
            status, continue_btn = self.reply_controls()
            box = self.input_row()
            if self.voice is not None:
                from chatbot.web.voice import add_voice_controls

                add_voice_controls(self.service, self.voice, session, chatbot, box, self.owner_of, chat_messages)
            self.wire(demo, Controls(session=session, owner_key=owner_key, last_conversation=last_conversation,
                                     chatbot=chatbot, box=box, status=status,
                                     continue_btn=continue_btn, **panel))
        return demo

    @staticmethod
    def launch_options() -> dict:
        """What `launch()` needs to show the page as designed: its style sheet and script (no network)."""
        return dict(css_paths=[STATIC / "page.css"], head=(STATIC / "page.js").read_text(encoding="utf-8"))

    def wire(self, demo: gr.Blocks, c: Controls) -> None:
        """Connect controls to handlers; every API endpoint is named here."""
        # Inputs and outputs of API-only endpoints (no place on the page).
        with gr.Group(visible=False):
            api_text = gr.Textbox()
            api_index = gr.Number(precision=0)
            api_json = gr.JSON()
            api_message = gr.MultimodalTextbox()
            api_chat, api_open, api_edit, api_key, api_list, api_clear, api_search = (gr.Button() for _ in range(7))
        pending = gr.State(None)  # the message the page shows while it waits for the model (Accepted)

        session, chatbot, box = c.session, c.chatbot, c.box
        turn_out = [chatbot, box, session]
        # Status updates are instant: no progress overlay of their own.
        busy = dict(fn=self.busy, outputs=[box, c.status, c.continue_btn], api_visibility="private", queue=False,
                    show_progress="hidden")
        refreshed = [c.conv_list, c.title_box, c.status, c.continue_btn, c.export_file, c.confirm_row,
                     c.last_conversation]
        ended = dict(fn=self.after_reply, inputs=[session, c.search_box], outputs=[*refreshed, box],
                     api_visibility="private", queue=False, show_progress="hidden")
        changed = dict(fn=self.after_change, inputs=[session, c.search_box], outputs=refreshed,
                       api_visibility="private", queue=False, show_progress="hidden")
        # Replies share one queue slot group: the model is one. The page says in words what a reply
        # waits for (the status line), so Gradio's own queue overlay is hidden.
        reply = dict(concurrency_id="reply", concurrency_limit=self.concurrency_limit, show_progress="hidden")
        quick = dict(concurrency_limit=None, show_progress="hidden")
        # What changes the conversation a tab shows, or names it, runs in one lane in the order it was
        # asked. Unqueued calls run side by side: a name given right after "New chat" could read the
        # tab's session before "New chat" had stored it, and rename the previous conversation.
        ordered = dict(concurrency_id="session", concurrency_limit=1, show_progress="hidden")

        def replied(event):
            event.then(**ended).then(None, js=_FOCUS_BOX)

        def after(event):
            event.then(**changed)

        demo.load(self.on_load, [c.owner_key, c.last_conversation], [session, c.owner_key, chatbot],
                  api_visibility="private", queue=False, show_progress="hidden").then(
            **dict(changed, fn=self.after_load, outputs=[o for o in refreshed if o is not c.status]))
        replied(box.submit(self.accept, [box, session], [chatbot, box, pending, c.status, c.continue_btn],
                         api_visibility="private", **ordered)
              .success(self.respond_accepted, [pending], turn_out, api_visibility="private", **reply))
        replied(api_chat.click(self.respond, [api_message, session], turn_out, api_name="chat", **reply))
        box.stop(self.stop, [session], None, api_name="stop", queue=False, show_progress="hidden")
        replied(chatbot.retry(**busy).then(self.regenerate, [session], turn_out, api_name="retry", **reply))
        replied(c.continue_btn.click(**busy).then(self.continue_reply, [session], turn_out, api_name="continue",
                                                **reply))
        after(chatbot.undo(self.undo, [session], [chatbot, session], api_name="undo", **ordered))
        # The edit's data comes with the event itself, so its handler is the first in the chain.
        replied(chatbot.edit(self.edit_in_chat, [session], turn_out, api_visibility="private", **reply))
        replied(api_edit.click(self.edit, [api_index, api_text, session], turn_out, api_name="edit", **reply))
        after(api_clear.click(self.clear, [session], turn_out, api_name="clear", **ordered))
        c.new_btn.click(None, None, [c.title_box], js=_EMPTY_TITLE, api_visibility="private", queue=False)
        after(c.new_btn.click(self.new_chat, [session], turn_out, api_name="new_chat", **ordered))
        after(c.conv_list.input(self.open_conversation, [c.conv_list, session], [chatbot, session],
                                api_visibility="private", **ordered))
        after(api_open.click(self.open_conversation, [api_text, session], [chatbot, session], api_name="open",
                             **ordered))
        api_only = dict(queue=False, show_progress="hidden")
        api_key.click(self.use_key, [api_text], [session, api_json], api_name="use_key", **api_only)
        api_list.click(self.list_conversations, [session], [api_json], api_name="conversations", **api_only)
        api_search.click(self.search_conversations, [api_text, session], [api_json], api_name="search", **api_only)
        c.search_box.change(self.search_list, [c.search_box, session], [c.conv_list], api_visibility="private",
                           queue=False, show_progress="hidden", trigger_mode="always_last")
        after(c.rename_btn.click(self.rename, [c.title_box, session], [session], api_name="rename", **ordered))
        after(c.title_box.submit(self.rename, [c.title_box, session], [session], api_visibility="private",
                                 **ordered))
        c.delete_btn.click(self.ask_delete, [session], [c.confirm_row, c.confirm_text], api_visibility="private",
                           queue=False, show_progress="hidden")
        c.confirm_no.click(lambda: gr.Column(visible=False), None, [c.confirm_row], api_visibility="private",
                           queue=False, show_progress="hidden")
        c.confirm_yes.click(None, None, [c.title_box], js=_EMPTY_TITLE, api_visibility="private", queue=False)
        after(c.confirm_yes.click(self.delete, [session], turn_out, api_name="delete", **ordered))
        c.export_btn.click(self.export, [session], [c.export_file], api_name="export", **quick).success(
            lambda: gr.File(visible=True), None, [c.export_file], api_visibility="private", queue=False,
            show_progress="hidden")
        after(c.import_btn.upload(self.import_conversation, [c.import_btn, session], [chatbot, session],
                                  api_name="import", **ordered))

