"""The Gradio chat page: a thin layer that shows the dialogue state and forwards input.

Everything it does goes through `ChatService`. The page holds only a
`ChatSession` per browser tab (whose conversations, which one is open) and, in
the browser's local storage, a random owner key that brings the same
conversation list back after a reload or a server restart.
"""

from __future__ import annotations

import functools
import inspect
import tempfile
from pathlib import Path

import gradio as gr

from chatbot.conversation.owners import (
    MIN_KEY_LENGTH,
    ChatSession,
    new_owner_key,
    resolve_owner,
)
from chatbot.conversation.service import ChatService
from chatbot.errors import UserFacingError
from chatbot.state import AttachmentKind, Conversation, ObservationKind, Role, Turn
from chatbot.web.voice import VoiceOptions, add_voice_controls

ASSETS = Path(__file__).resolve().parents[2] / "assets"
OWNER_STORAGE_KEY = "multimodal-chatbot-owner"

_EXAMPLES = [
    {"text": "Hi! My name is Ana and I love hiking. Can you suggest a short weekend plan?"},
    {"text": "What does the sign say?", "files": [str(ASSETS / "examples" / "sign.png")]},
    {"text": "", "files": [str(ASSETS / "examples" / "capital-of-france.wav")]},
    {"text": "Explain what a Python list comprehension is, with one example."},
]


def _turn_content(turn: Turn) -> list:
    """A turn as Gradio chat content: media first (thumbnails, players), then words."""
    parts: list = []
    for attachment in turn.attachments:
        parts.append({"path": attachment.path, "alt_text": attachment.label})
        if attachment.kind is AttachmentKind.AUDIO and turn.role is Role.USER:
            spoken = " ".join(o.text for o in turn.notes_for(attachment) if o.kind is ObservationKind.TRANSCRIPT)
            parts.append(f"🎤 *{spoken}*" if spoken else "🎤 *(no words recognised)*")
    text = turn.text + ("\n\n*(stopped)*" if turn.interrupted else "")
    if text.strip():
        parts.append(text)
    return parts


def shown_turns(conv: Conversation) -> list[Turn]:
    """The turns the chat shows, in order: message i of the Chatbot is shown_turns(conv)[i]."""
    return [t for t in conv.turns if t.role is not Role.SYSTEM and (t.text or t.attachments or t.interrupted)]


def chat_messages(conv: Conversation, reply: str | None = None) -> list[dict]:
    """The conversation as Chatbot messages, plus the reply still being written, if any."""
    messages = [{"role": t.role.value, "content": _turn_content(t)} for t in shown_turns(conv)]
    if reply:
        messages.append({"role": "assistant", "content": reply})
    return messages


def _shown_errors(fn):
    """UserFacingError → gr.Error, so the person sees the reason (Gradio hides other errors)."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def stream(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except UserFacingError as error:
                raise gr.Error(str(error)) from error
        return stream

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserFacingError as error:
            raise gr.Error(str(error)) from error
    return call


def build_ui(service: ChatService, browser_secret: str, concurrency_limit: int = 1,
             voice: VoiceOptions | None = None) -> gr.Blocks:
    """`browser_secret` encrypts the owner key in browsers; keep it across restarts or lists are lost.

    `voice`: spoken replies and call mode (chatbot.web.voice); None leaves them off the page.
    """
    exports = tempfile.TemporaryDirectory(prefix="chatbot-exports-")  # removed when the app exits

    def owner_of(session: ChatSession, request: gr.Request) -> str:
        # Browsers get their owner at page load; an API client is its Gradio session unless it chose a key.
        return session.owner or resolve_owner(user=request.username, session_hash=request.session_hash)

    def opened(session: ChatSession, request: gr.Request) -> tuple[str, Conversation]:
        owner = owner_of(session, request)
        return owner, service.conversation(owner, session.conversation_id)

    def conversation_choices(owner: str) -> list[tuple[str, str]]:
        return [(c.title or "Untitled", c.id) for c in service.conversations(owner)]

    def sidebar(session: ChatSession, request: gr.Request):
        owner, conv = opened(session, request)
        choices = conversation_choices(owner)
        current = conv.id if any(cid == conv.id for _, cid in choices) else None
        return gr.Radio(choices=choices, value=current), gr.Textbox(value=conv.title)

    def on_load(key: str | None, request: gr.Request):
        if not isinstance(key, str) or len(key) < MIN_KEY_LENGTH:
            key = new_owner_key()
        session = ChatSession(owner=resolve_owner(user=request.username, key=key))
        return session, key, gr.Radio(choices=conversation_choices(session.owner), value=None)

    # -- turns ----------------------------------------------------------------------------
    def streamed(owner: str, conv: Conversation, replies):
        session = ChatSession(owner, conv.id)
        locked = gr.MultimodalTextbox(value=None, interactive=False)
        for reply in replies:
            yield chat_messages(conv, reply), locked, session
        yield chat_messages(conv), gr.MultimodalTextbox(interactive=True), session

    @_shown_errors
    def respond(message: dict | None, session: ChatSession, request: gr.Request):
        owner, conv = opened(session, request)
        text = (message or {}).get("text") or ""
        files = [f if isinstance(f, str) else f["path"] for f in (message or {}).get("files") or []]
        yield from streamed(owner, conv, service.respond(owner, conv, text, files))

    @_shown_errors
    def regenerate(session: ChatSession, request: gr.Request):
        owner, conv = opened(session, request)
        yield from streamed(owner, conv, service.regenerate(owner, conv))

    @_shown_errors
    def edit(index: float | None, text: str, session: ChatSession, request: gr.Request):
        owner, conv = opened(session, request)
        turns = shown_turns(conv)
        position = int(index) if index is not None else -1
        if not 0 <= position < len(turns):
            raise UserFacingError("There is no such message to edit.")
        yield from streamed(owner, conv, service.edit(owner, conv, turns[position].id, text))

    def edit_in_chat(data: gr.EditData, session: ChatSession, request: gr.Request):
        value = data.value if isinstance(data.value, str) else " ".join(
            p.get("text", "") for p in data.value if isinstance(p, dict))
        yield from edit(data.index, value, session, request)

    def undo(session: ChatSession, request: gr.Request):
        owner, conv = opened(session, request)
        service.undo(owner, conv)
        return chat_messages(conv), ChatSession(owner, conv.id)

    def clear(session: ChatSession, request: gr.Request):
        owner, conv = opened(session, request)
        service.clear(owner, conv)
        return [], gr.MultimodalTextbox(interactive=True), ChatSession(owner, conv.id)

    def stop(session: ChatSession, request: gr.Request) -> None:
        service.stop(owner_of(session, request), session.conversation_id)

    # -- conversations ---------------------------------------------------------------------
    def new_chat(session: ChatSession, request: gr.Request):
        owner = owner_of(session, request)
        return [], gr.MultimodalTextbox(value=None, interactive=True), ChatSession(owner, None)

    @_shown_errors
    def open_conversation(conv_id: str, session: ChatSession, request: gr.Request):
        owner = owner_of(session, request)
        conv = service.open(owner, conv_id or "")
        return chat_messages(conv), ChatSession(owner, conv.id)

    @_shown_errors
    def use_key(key: str, request: gr.Request):
        session = ChatSession(owner=resolve_owner(user=request.username, key=key))
        return session, list_conversations(session, request)

    def list_conversations(session: ChatSession, request: gr.Request) -> list[dict]:
        return [{"id": c.id, "title": c.title, "turns": c.turns, "created": c.created, "updated": c.updated}
                for c in service.conversations(owner_of(session, request))]

    @_shown_errors
    def rename(title: str, session: ChatSession, request: gr.Request) -> None:
        owner, conv = opened(session, request)
        service.rename(owner, conv.id, title)

    def delete(session: ChatSession, request: gr.Request):
        owner = owner_of(session, request)
        if session.conversation_id:
            service.delete(owner, session.conversation_id)
        return new_chat(session, request)

    @_shown_errors
    def export(session: ChatSession, request: gr.Request) -> str:
        owner, conv = opened(session, request)
        if not conv.turns:
            raise UserFacingError("This conversation is empty; there is nothing to export yet.")
        path = Path(exports.name) / f"conversation-{conv.id}.json"
        path.write_text(service.export_json(owner, conv.id), encoding="utf-8")
        return str(path)

    @_shown_errors
    def import_conversation(file: str | None, session: ChatSession, request: gr.Request):
        if not file:
            raise UserFacingError("Choose an exported conversation (.json) to import.")
        owner = owner_of(session, request)
        conv = service.import_json(owner, Path(file).read_text(encoding="utf-8"))
        return chat_messages(conv), ChatSession(owner, conv.id)

    with gr.Blocks(title="Multimodal Chatbot") as demo:
        owner_key = gr.BrowserState(None, storage_key=OWNER_STORAGE_KEY, secret=browser_secret)
        # Per browser tab; holds ids only, so ending a session just stops its running reply.
        session = gr.State(ChatSession(), delete_callback=service.end_session)
        with gr.Sidebar(label="Conversations", open=True):
            new_btn = gr.Button("New chat", variant="primary")
            conv_list = gr.Radio(label="Conversations", choices=[], elem_id="conversation-list")
            title_box = gr.Textbox(label="Title of this conversation", max_lines=1)
            with gr.Row():
                rename_btn = gr.Button("Rename", size="sm")
                delete_btn = gr.Button("Delete", size="sm", variant="stop")
            with gr.Row():
                export_btn = gr.Button("Export", size="sm")
                import_btn = gr.UploadButton("Import", size="sm", file_types=[".json"], file_count="single")
            export_file = gr.File(label="Exported conversation", interactive=False)
        gr.Markdown("### Multimodal Chatbot\nType, attach photos, or press the microphone and speak.")
        chatbot = gr.Chatbot(label="Conversation", height=560, buttons=["copy"], editable="user",
                             placeholder="Say hello, share a photo, or record a question.")
        box = gr.MultimodalTextbox(
            sources=["upload", "microphone"], file_types=["image", "audio"], file_count="multiple",
            placeholder="Type a message, attach photos, or record your voice…", show_label=False,
            autofocus=True, stop_btn=True, elem_id="message-box")
        if voice is not None:
            add_voice_controls(service, voice, session, chatbot, box, owner_of, chat_messages)
        gr.Examples(examples=_EXAMPLES, inputs=box, label="Try")
        # Inputs and outputs of API-only endpoints (no place on the page).
        with gr.Group(visible=False):
            api_text = gr.Textbox()
            api_index = gr.Number(precision=0)
            api_json = gr.JSON()
            api_open, api_edit, api_key, api_list = (gr.Button() for _ in range(4))

        refresh = dict(fn=sidebar, inputs=[session], outputs=[conv_list, title_box], api_visibility="private",
                       queue=False)
        # Replies share one queue slot group: the model is one, and waiting users see their place.
        reply = dict(concurrency_id="reply", concurrency_limit=concurrency_limit)
        quick = dict(concurrency_limit=None)

        demo.load(on_load, [owner_key], [session, owner_key, conv_list], api_visibility="private", queue=False)
        box.submit(respond, [box, session], [chatbot, box, session], api_name="chat", **reply).then(**refresh)
        box.stop(stop, [session], None, api_name="stop", queue=False)
        chatbot.retry(regenerate, [session], [chatbot, box, session], api_name="retry", **reply).then(**refresh)
        chatbot.undo(undo, [session], [chatbot, session], api_name="undo", **quick).then(**refresh)
        chatbot.edit(edit_in_chat, [session], [chatbot, box, session], api_visibility="private",
                     **reply).then(**refresh)
        api_edit.click(edit, [api_index, api_text, session], [chatbot, box, session], api_name="edit",
                       **reply).then(**refresh)
        chatbot.clear(clear, [session], [chatbot, box, session], api_name="clear", **quick).then(**refresh)
        new_btn.click(new_chat, [session], [chatbot, box, session], api_name="new_chat", queue=False).then(**refresh)
        conv_list.input(open_conversation, [conv_list, session], [chatbot, session], api_visibility="private",
                        **quick).then(**refresh)
        api_open.click(open_conversation, [api_text, session], [chatbot, session], api_name="open",
                       **quick).then(**refresh)
        api_key.click(use_key, [api_text], [session, api_json], api_name="use_key", queue=False)
        api_list.click(list_conversations, [session], [api_json], api_name="conversations", queue=False)
        rename_btn.click(rename, [title_box, session], None, api_name="rename", **quick).then(**refresh)
        title_box.submit(rename, [title_box, session], None, api_visibility="private", **quick).then(**refresh)
        delete_btn.click(delete, [session], [chatbot, box, session], api_name="delete", **quick).then(**refresh)
        export_btn.click(export, [session], [export_file], api_name="export", **quick)
        import_btn.upload(import_conversation, [import_btn, session], [chatbot, session], api_name="import",
                          **quick).then(**refresh)
    return demo
