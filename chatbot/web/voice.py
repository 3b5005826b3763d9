"""The page's voice controls: a speaker toggle, a hands-free call button, spoken clips played in order.

`add_voice_controls` is called once inside the page's Blocks. The browser side is a small
player (`_PLAYER_JS`): it plays the clips of the reply being spoken one after another in hidden
<audio> elements and silences them on barge-in. The server side is one `VoicePeer` per tab;
a timer asks it for news (new clips, the call's state, a changed conversation) while the
speaker or a call is on; during a call a second timer carries the microphone's samples (`_MIC_JS`).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import gradio as gr
import numpy as np

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
# The call's microphone. Gradio's streaming Audio drops (and truncates) chunks whenever a round
# trip takes longer than a chunk, i.e. exactly when the server is busy answering, which lost the
# words of a barge-in. Here the browser keeps every sample until the server acknowledges it:
# each tick sends all unacknowledged samples with their position, so nothing is lost or doubled.
_MIC_JS = """
window.chatbotMic = window.chatbotMic || {
  id: '', ctx: null, stream: null, chunks: [], first: 0,
  async start() {
    this.stop();
    this.stream = await navigator.mediaDevices.getUserMedia({audio: {
      channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true}});
    this.ctx = new AudioContext();
    await this.ctx.resume();
    this.id = String(Date.now()); this.chunks = []; this.first = 0;
    // A ScriptProcessor needs no module file (an AudioWorklet would); it only runs while connected.
    const node = this.ctx.createScriptProcessor(4096, 1, 1);
    node.onaudioprocess = (e) => {
      const f = e.inputBuffer.getChannelData(0), pcm = new Int16Array(f.length);
      for (let i = 0; i < f.length; i++) pcm[i] = Math.max(-32768, Math.min(32767, Math.round(f[i] * 32767)));
      this.chunks.push(pcm);
    };
    this.ctx.createMediaStreamSource(this.stream).connect(node);
    node.connect(this.ctx.destination);
  },
  stop() {
    this.stream?.getTracks().forEach(t => t.stop());
    this.ctx?.close();
    this.stream = null; this.ctx = null; this.chunks = [];
  },
  take(ack) {
    if (!this.ctx) return '';
    const heard = ack && ack.startsWith(this.id + ':') ? Number(ack.split(':')[1]) : 0;
    while (this.chunks.length && this.first + this.chunks[0].length <= heard) this.first += this.chunks.shift().length;
    if (!this.chunks.length) return '';
    const total = this.chunks.reduce((n, c) => n + c.length, 0), pcm = new Int16Array(total);
    let at = 0;
    for (const c of this.chunks) { pcm.set(c, at); at += c.length; }
    const bytes = new Uint8Array(pcm.buffer);
    let text = '';
    for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
    return JSON.stringify({stream: this.id, start: this.first, rate: this.ctx.sampleRate, pcm: btoa(text)});
  },
};
"""
# One tap starts the call: the browser's language goes to the server, and the microphone starts streaming.
_START_CALL_JS = "async (on) => {" + _MIC_JS + """
  if (on) window.chatbotMic.stop();
  else { try { await window.chatbotMic.start(); } catch (e) { console.error('microphone', e); return 'no-microphone'; } }
  return navigator.language || '';
}
"""
_TAKE_MIC_JS = "(ack) => [window.chatbotMic ? window.chatbotMic.take(ack) : '']"
MIC_SECONDS = 0.2  # how often the microphone's new samples go to the server


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
        if on or language == "no-microphone":
            peer.end_call()
            words = "" if on else "The microphone is not available: allow it in the browser, then try again."
            return (False, gr.Button("📞 Start call", variant="secondary"), words, gr.skip(), gr.Timer(active=False))
        peer.start_call(owner, session.conversation_id, language or None)
        return (True, gr.Button("End call", variant="stop"), "Listening…", gr.Timer(active=True),
                gr.Timer(active=True))

    def push_to_talk(path: str | None, language: str):
        """Tap to record, tap to stop: the recording and its transcript land in the message box, to
        correct and send (the recording stays with the turn, playable; the corrected words count)."""
        from chatbot.errors import UserFacingError
        from chatbot.perception.audio import load_audio
        from chatbot.perception.speech import SURE_LANGUAGE

        if not path or options.recognizer is None:
            return gr.skip(), gr.skip(), None
        try:
            transcript = options.recognizer.transcribe(load_audio(path), language or None)
        except UserFacingError as error:
            return gr.skip(), str(error), None
        if not transcript.text:
            return gr.skip(), "No words recognised; please try again.", None
        service.encoder.remember_recording(path, transcript, dictated=True)
        sure = "" if transcript.language_probability >= SURE_LANGUAGE else ", unsure: your browser's language was used"
        return ({"text": transcript.text, "files": [path]},
                f"Heard ({transcript.language}{sure}). Correct it if needed, then press Enter.", None)

    def hear(packet: str, request: gr.Request):
        """New microphone samples (see `_MIC_JS`); answers with what is heard, the browser's acknowledgement."""
        if not packet:
            return gr.skip()
        p = json.loads(packet)
        samples = np.frombuffer(base64.b64decode(p["pcm"]), "<i2")
        heard = peer_of(request).receive(str(p["stream"]), int(p["start"]), int(p["rate"]), samples)
        return f"{p['stream']}:{heard}"

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
    talk = gr.Audio(sources=["microphone"], type="filepath", elem_id="push-to-talk",
                    label="Push to talk: tap to record, tap to stop, then check the words and send",
                    visible=options.recognizer is not None)
    with gr.Group(visible=False):
        clips_box = gr.Textbox(elem_id="voice-clips")
        language = gr.Textbox()
        heard_box = gr.Textbox()  # "<stream>:<samples heard>", the microphone's acknowledgement
    call_on = gr.State(False)
    peer_key = gr.State("", delete_callback=forget)
    timer = gr.Timer(POLL_SECONDS, active=options.speak_by_default)
    mic_timer = gr.Timer(MIC_SECONDS, active=False)
    quick = dict(queue=False, api_visibility="private", show_progress="hidden")  # the status line says it in words

    speaker_box.change(set_speaker, [speaker_box, session], [timer], **quick)
    call_btn.click(None, [call_on], [language], js=_START_CALL_JS, **quick).then(
        toggle_call, [call_on, session, language], [call_on, call_btn, status, timer, mic_timer], **quick).then(
        remember, None, [peer_key], **quick)
    talk.stop_recording(push_to_talk, [talk, language], [box, status, talk], api_visibility="private",
                        js="(path, lang) => [path, navigator.language || '']")
    mic_timer.tick(hear, [heard_box], [heard_box], js=_TAKE_MIC_JS, **quick)
    timer.tick(poll, [speaker_box, call_on, session], [clips_box, status, chatbot, session], **quick)
    clips_box.change(None, [clips_box], None, js=_PLAYER_JS)
