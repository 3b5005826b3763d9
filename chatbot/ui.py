"""The Gradio chat page: a thin layer that shows the dialogue state and forwards input.

Everything it does goes through `ChatService`; the page itself holds only the
id of the conversation each browser session is in.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from .session import ChatService
from .state import AttachmentKind, Conversation, Role, Turn

ASSETS = Path(__file__).resolve().parent.parent / "assets"

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
        if attachment.kind is AttachmentKind.AUDIO:
            spoken = " ".join(o.text for o in turn.notes_for(attachment) if o.kind == "transcript")
            parts.append(f"🎤 *{spoken}*" if spoken else "🎤 *(no words recognised)*")
    text = turn.text + ("\n\n*(stopped)*" if turn.interrupted else "")
    if text.strip():
        parts.append(text)
    return parts


def chat_messages(conv: Conversation, reply: str | None = None) -> list[dict]:
    """The conversation as Chatbot messages, plus the reply still being written, if any."""
    messages = [{"role": t.role.value, "content": _turn_content(t)} for t in conv.turns
                if t.role is not Role.SYSTEM and (t.text or t.attachments or t.interrupted)]
    if reply:
        messages.append({"role": "assistant", "content": reply})
    return messages


def build_ui(service: ChatService) -> gr.Blocks:
    def respond(message: dict | None, conv_id: str | None):
        conv = service.conversation(conv_id)
        text = (message or {}).get("text") or ""
        files = [f if isinstance(f, str) else f["path"] for f in (message or {}).get("files") or []]
        locked = gr.MultimodalTextbox(value=None, interactive=False)
        for reply in service.respond(conv, text, files):
            yield chat_messages(conv, reply), locked, conv.id
        yield chat_messages(conv), gr.MultimodalTextbox(interactive=True), conv.id

    def stop(conv_id: str | None) -> None:
        service.stop(conv_id)

    def new_chat(conv_id: str | None):
        service.stop(conv_id)
        return [], service.new_conversation().id, gr.MultimodalTextbox(value=None, interactive=True)

    with gr.Blocks(title="Multimodal Chatbot") as demo:
        # Per browser session; released with the session.
        conv_id = gr.State(None, delete_callback=lambda cid: cid and service.forget(cid))
        with gr.Row():
            gr.Markdown("### Multimodal Chatbot\nType, attach photos, or press the microphone and speak.")
            new_btn = gr.Button("New chat", variant="secondary", scale=0, min_width=140)
        chatbot = gr.Chatbot(label="Conversation", height=560, buttons=["copy"],
                             placeholder="Say hello, share a photo, or record a question.")
        box = gr.MultimodalTextbox(
            sources=["upload", "microphone"], file_types=["image", "audio"], file_count="multiple",
            placeholder="Type a message, attach photos, or record your voice…", show_label=False,
            autofocus=True, stop_btn=True)
        gr.Examples(examples=_EXAMPLES, inputs=box, label="Try")

        box.submit(respond, [box, conv_id], [chatbot, box, conv_id], api_name="chat")
        box.stop(stop, [conv_id], None, api_name="stop", queue=False)
        new_btn.click(new_chat, [conv_id], [chatbot, conv_id, box], api_name="new_chat", queue=False)
        chatbot.clear(new_chat, [conv_id], [chatbot, conv_id, box], api_name=False, queue=False)
    return demo
