"""The page's voice controls: a speaker toggle, a hands-free call button, spoken clips played in order.

`add_voice_controls` is called once inside the page's Blocks. The browser side is a small
player (`_PLAYER_JS`): it plays the clips of the reply being spoken one after another in hidden
<audio> elements and silences them on barge-in. The server side is one `VoicePeer` per tab;
a timer asks it for news (new clips, the call's state, a changed conversation) while the
speaker or a call is on.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import gradio as gr

from chatbot.conversation.owners import ChatSession
from chatbot.conversation.service import ChatService
from chatbot.voice.call import VoicePeer
from chatbot.voice.speaker import ReplySpeaker

if TYPE_CHECKING:  # the page must load without torch (speech imports it)
    from chatbot.perception.speech import SpeechRecognizer

POLL_SECONDS = 0.3  # how soon a finished sentence starts playing

_PLAYER_JS = """
(value) => {
  const v = window.chatbotVoice || (window.chatbotVoice = {
    queue: [], current: null, seq: -1,
    holder() {
      let d = document.getElementById('voice-player');
      if (!d) { d = document.createElement('div'); d.id = 'voice-player'; d.hidden = true; document.body.appendChild(d); }
      return d;
    },
    next() {
      if (this.current && !this.current.ended && !this.current.dataset.done) return;
      const url = this.queue.shift();
      if (!url) { this.current = null; return; }
      const a = document.createElement('audio');
      a.className = 'spoken-clip'; a.src = url; a.preload = 'auto';
      const done = () => { a.dataset.done = '1'; this.next(); };
      a.addEventListener('ended', done); a.addEventListener('error', done);
      this.holder().appendChild(a); this.current = a;
      a.play().catch(() => { a.dataset.blocked = '1'; done(); });
    },
    stop() {
      this.queue = []; this.current = null;
      document.querySelectorAll('#voice-player audio').forEach(a => {
        if (!a.ended) { a.pause(); a.dataset.stopped = '1'; a.dataset.done = '1'; }
      });
    },
  });
  if (!value) return;
  const u = JSON.parse(value);
  if (u.seq <= v.seq) return;
  v.seq = u.seq;
  if (u.stop) v.stop();
  for (const url of u.urls) v.queue.push(url);
  v.next();
}
"""
# One tap starts the call: the browser's language goes to the server, and the microphone starts streaming.
_START_CALL_JS = """
(on) => {
  if (!on) { setTimeout(() => document.querySelector('#call-mic button.record-button')?.click(), 300); }
  else { document.querySelector('#call-mic button.stop-button')?.click(); }
  return navigator.language || '';
}
"""


@dataclass
class VoiceOptions:
    speaker: ReplySpeaker
    recognizer: SpeechRecognizer | None  # None: no call mode (voice input is off)
    speak_by_default: bool = False


def add_voice_controls(service: ChatService, options: VoiceOptions, session: gr.State, chatbot: gr.Chatbot,
                       box: gr.MultimodalTextbox, owner_of: Callable[[ChatSession, gr.Request], str],
                       render: Callable) -> None:
    """Adds the controls where it is called; `render(conv, reply)` is the page's chat rendering."""
    peers: dict[str, VoicePeer] = {}
    counter = {"seq": 0}
    gr.set_static_paths([options.speaker.clip_dir])  # the sentence clips, served while they play

    def peer_of(request: gr.Request) -> VoicePeer:
        key = request.session_hash or ""
        if key not in peers:
            peers[key] = VoicePeer(service, options.speaker, options.recognizer)
        return peers[key]

    def forget(key: str | None) -> None:
        peer = peers.pop(key or "", None)
        if peer:
            peer.end_call()

    def remember(request: gr.Request) -> str:
        return request.session_hash or ""  # the key `forget` gets when the tab closes

    def set_speaker(on: bool, session: ChatSession, request: gr.Request):
        options.speaker.set_speaking(owner_of(session, request), on)
        return gr.Timer(active=on)

    def toggle_call(on: bool, session: ChatSession, language: str, request: gr.Request):
        peer = peer_of(request)
        owner = owner_of(session, request)
        if on:
            peer.end_call()
            return (False, gr.Button("📞 Start call", variant="secondary"), "", gr.skip())
        peer.start_call(owner, session.conversation_id, language or None)
        return (True, gr.Button("End call", variant="stop"), "Listening…", gr.Timer(active=True))

    def push_to_talk(path: str | None, language: str):
        """Record, stop: the transcript lands in the message box, to correct and send like typed text."""
        from chatbot.errors import UserFacingError
        from chatbot.perception.audio import load_audio

        if not path or options.recognizer is None:
            return gr.skip(), gr.skip(), None
        try:
            transcript = options.recognizer.transcribe(load_audio(path), language or None)
        except UserFacingError as error:
            return gr.skip(), str(error), None
        if not transcript.text:
            return gr.skip(), "No words recognised; please try again.", None
        sure = "" if transcript.language_probability >= 0.5 else ", unsure: your browser's language was used"
        return ({"text": transcript.text, "files": []},
                f"Heard ({transcript.language}{sure}). Correct it if needed, then press Enter.", None)

    def hear(chunk, request: gr.Request) -> None:
        if chunk is not None:
            rate, samples = chunk
            peer_of(request).hear(rate, samples)

    def poll(speaker_on: bool, call_on: bool, session: ChatSession, request: gr.Request):
        peer = peer_of(request)
        owner = owner_of(session, request)
        if not call_on:
            options.speaker.set_speaking(owner, speaker_on)
        update = peer.collect(session.conversation_id)
        clips = gr.skip()
        if update.clips or update.stop_playback:
            counter["seq"] += 1
            clips = json.dumps({"seq": counter["seq"], "stop": update.stop_playback,
                                "urls": [f"gradio_api/file={c.url_path}" for c in update.clips]})
        chat, new_session = gr.skip(), gr.skip()
        if update.conversation_changed and update.conversation_id:
            conv = peer.conversation or service.conversation(owner, update.conversation_id)
            chat, new_session = render(conv, peer.reply_so_far), ChatSession(owner, conv.id)
        status = update.status if call_on or update.status.startswith("Not spoken") else ""
        return clips, status, chat, new_session

    with gr.Row(equal_height=True):
        speaker_box = gr.Checkbox(label="🔊 Speak replies", value=options.speak_by_default, elem_id="speak-replies",
                                  scale=0, min_width=160)
        call_btn = gr.Button("📞 Start call", elem_id="call-button", scale=0, min_width=140,
                             interactive=options.recognizer is not None)
        status = gr.Markdown("", elem_id="voice-status")
    talk = gr.Audio(sources=["microphone"], type="filepath", label="Push to talk: record, stop, then check and send",
                    elem_id="push-to-talk", visible=options.recognizer is not None)
    mic = gr.Audio(sources=["microphone"], streaming=True, type="numpy", label="Call microphone",
                   elem_id="call-mic", visible=options.recognizer is not None)
    with gr.Group(visible=False):
        clips_box = gr.Textbox(elem_id="voice-clips")
        language = gr.Textbox()
    call_on = gr.State(False)
    peer_key = gr.State("", delete_callback=forget)
    timer = gr.Timer(POLL_SECONDS, active=options.speak_by_default)
    quick = dict(queue=False, api_visibility="private")

    speaker_box.change(set_speaker, [speaker_box, session], [timer], **quick)
    call_btn.click(None, [call_on], [language], js=_START_CALL_JS, **quick).then(
        toggle_call, [call_on, session, language], [call_on, call_btn, status, timer], **quick).then(
        remember, None, [peer_key], **quick)
    talk.stop_recording(push_to_talk, [talk, language], [box, status, talk], api_visibility="private",
                        js="(path, lang) => [path, navigator.language || '']")
    mic.stream(hear, [mic], None, stream_every=0.25, time_limit=3600, concurrency_limit=None,
               concurrency_id="call-microphone", api_visibility="private")
    timer.tick(poll, [speaker_box, call_on, session], [clips_box, status, chatbot, session], show_progress="hidden",
               **quick)
    clips_box.change(None, [clips_box], None, js=_PLAYER_JS)
