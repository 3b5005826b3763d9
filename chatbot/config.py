"""Settings for one server run, read from the command line."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from chatbot import weights
from chatbot.generation.base import BACKENDS
from chatbot.perception.encoder import Limits

NO_MODEL = "none"


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "multimodal-chatbot"


@dataclass
class Config:
    host: str = "127.0.0.1"
    port: int = 7860
    text_backend: str = "transformers"
    text_model: str = "qwen2.5-0.5b"
    quantize: str = "int4"
    speech_model: str = "whisper-base"
    speech_language: str | None = None
    caption_model: str | None = None
    voice: str = "hibari"
    # Whisper and the photo models load at their first use and are let go after this many seconds unused
    # (0: kept once loaded): ≈0.25 GB not held through text-only stretches, ≈1-2 s to load them again.
    release_models_after: float = 60.0
    speak_replies: bool = False
    max_new_tokens: int = 256
    temperature: float = 0.0  # greedy: chosen on bench.quality (README)
    top_p: float = 0.9
    repetition_penalty: float = 1.1
    max_context: int = 2048
    threads: int | None = None
    data_dir: Path = _default_data_dir()
    system_prompt: str | None = None
    auth: list[tuple[str, str]] | None = None
    concurrency: int = 1
    database: str | None = None  # a postgresql:// URL; None: SQLite in the data directory
    api_keys_file: Path | None = None
    base_url: str | None = None  # of an OpenAI-compatible server (--text-backend openai)
    api_key_file: Path | None = None
    remote_model: str | None = None
    max_message_chars: int = Limits.max_message_chars
    max_files: int = Limits.max_files
    max_upload_mb: float = Limits.max_file_mb
    max_document_pages: int = Limits.max_document_pages

    def hub_models(self) -> list[str]:
        """Model specs that are neither bundled nor local folders: loading them needs the hub."""
        specs = [self.text_model, self.speech_model, self.caption_model]
        local = set(weights.CHAT_MODELS) | set(weights.SPEECH_MODELS) | {NO_MODEL}
        return [s for s in specs if s and s not in local and not Path(s).exists()]


def _user_password(value: str) -> tuple[str, str]:
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise argparse.ArgumentTypeError("expected USER:PASSWORD")
    return user, password


AUTH_ENV = "CHATBOT_AUTH"


def _read_auth_file(value: str) -> list[tuple[str, str]]:
    """USER:PASSWORD lines (blank lines and # comments skipped): passwords stay out of `ps`."""
    try:
        lines = Path(value).read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise argparse.ArgumentTypeError(f"cannot read {value}: {error.strerror}") from None
    return [_user_password(line.strip()) for line in lines if line.strip() and not line.lstrip().startswith("#")]


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each setting's default, except where there is none (the help says what happens then)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is argparse.SUPPRESS:
            return action.help or ""
        return super()._get_help_string(action)


def parse_args(argv: list[str] | None = None) -> Config:
    d = Config()
    p = argparse.ArgumentParser(
        prog="app.py", description="A multimodal chatbot in your browser: type, attach photos, speak. "
        "Runs offline on the CPU with bundled models; any Hugging Face model id can be chosen instead.",
        epilog="Environment: CHATBOT_CACHE_DIR sets where the bundled weights are prepared on first use "
        "(default: ~/.cache/multimodal-chatbot); XDG_DATA_HOME moves the default --data-dir.",
        formatter_class=_HelpWithDefaults)
    net = p.add_argument_group("server")
    net.add_argument("--host", default=d.host, help="address to listen on (0.0.0.0 exposes it to your network)")
    net.add_argument("--port", type=int, default=d.port, help="port to serve the page and the API on")
    net.add_argument("--data-dir", type=Path, default=d.data_dir,
                     help="where conversations (an SQLite database) and their attachments are kept")
    net.add_argument("--auth", action="append", type=_user_password, metavar="USER:PASSWORD",
                     help="require signing in (repeat for more users); each user then sees only their own "
                          "conversations, on any browser. Use it whenever the server is reachable beyond localhost. "
                          "Visible to other local users in `ps`: prefer --auth-file or the "
                          f"{AUTH_ENV} environment variable (USER:PASSWORD, several separated by spaces)")
    net.add_argument("--auth-file", type=_read_auth_file, metavar="FILE",
                     help="sign-in users from a file of USER:PASSWORD lines (keep it readable by you only)")
    net.add_argument("--concurrency", type=int, default=d.concurrency,
                     help="replies generated at the same time; further requests wait in a queue and see their place")
    net.add_argument("--database", default=d.database, metavar="postgresql://USER:PASSWORD@HOST/DB",
                     help="keep conversations in PostgreSQL, shared by several app copies (which must then share "
                          "--data-dir for the attachments); default: SQLite in --data-dir")
    net.add_argument("--api-keys-file", type=Path, default=d.api_keys_file, metavar="FILE",
                     help="API keys of the OpenAI-compatible API at /v1, one NAME:KEY a line (also "
                          "$CHATBOT_API_KEYS, comma-separated); a key's owner is the signed-in user NAME. "
                          "Without keys the API answers this machine only")
    caps = p.add_argument_group("limits of one message (each holds the model while it is read)")
    caps.add_argument("--max-message-chars", type=int, default=d.max_message_chars,
                      help="longer messages are refused; the model reads at most its context of a long one")
    caps.add_argument("--max-files", type=int, default=d.max_files, help="photos, recordings and PDFs per message")
    caps.add_argument("--max-upload-mb", type=float, default=d.max_upload_mb,
                      help="size of one uploaded file (the web server refuses larger uploads)")
    caps.add_argument("--max-document-pages", type=int, default=d.max_document_pages,
                      help="pages of one PDF; longer documents are refused (the model reads the beginning of a document)")
    models = p.add_argument_group("models")
    models.add_argument("--text-backend", default=d.text_backend, choices=sorted(BACKENDS),
                        help="what writes the replies: a model in this process (transformers) or an "
                             "OpenAI-compatible server (openai: vLLM, TGI, Ollama, llama.cpp, another copy of this app)")
    models.add_argument("--base-url", default=d.base_url, metavar="URL",
                        help="with --text-backend openai: the server's API root, e.g. http://host:8000/v1")
    models.add_argument("--api-key-file", type=Path, default=d.api_key_file, metavar="FILE",
                        help="with --text-backend openai: a file holding the server's API key")
    models.add_argument("--remote-model", default=d.remote_model, metavar="NAME",
                        help="with --text-backend openai: the model name the server knows")
    models.add_argument("--text-model", default=d.text_model,
                        help="reply model: bundled " + ", ".join(weights.CHAT_MODELS)
                        + ", or a Hugging Face id / local folder (seq2seq like google/flan-t5-large, or a chat model)")
    models.add_argument("--quantize", default=d.quantize, choices=["none", "int8", "int4"],
                        help="weight quantization of the reply model's linear layers: int4 is fastest on CPU, "
                        "int8 answers like full precision")
    models.add_argument("--speech-model", default=d.speech_model,
                        help="speech recogniser: bundled " + ", ".join(weights.SPEECH_MODELS)
                        + f", a Hugging Face ASR id / folder (e.g. openai/whisper-small), or '{NO_MODEL}'")
    models.add_argument("--speech-language", default=d.speech_language,
                        help="fix the spoken language (e.g. en, fr); default: detected per recording")
    models.add_argument("--caption-model", default=d.caption_model,
                        help="optional image captioning model, a Hugging Face id / folder "
                             "(e.g. Salesforce/blip-image-captioning-base)")
    models.add_argument("--release-models-after", type=float, default=d.release_models_after, metavar="SECONDS",
                        help="the speech and photo models load at their first use; release them after this many "
                             "seconds unused to save memory (0: keep them once loaded)")
    models.add_argument("--voice", default=d.voice,
                        help=f"voice for spoken replies and call mode: hibari (bundled), piper-joe (needs piper-tts, "
                             f"GPL-3.0, installed separately) or '{NO_MODEL}'")
    models.add_argument("--speak-replies", action="store_true", default=d.speak_replies,
                        help="speak every reply aloud by default (each page has a speaker toggle)")
    gen = p.add_argument_group("generation")
    gen.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens,
                     help="longest reply in tokens; a reply cut there is marked and can be continued")
    gen.add_argument("--temperature", type=float, default=d.temperature, help="0 for greedy decoding")
    gen.add_argument("--top-p", type=float, default=d.top_p,
                     help="sample only from the most likely tokens that together reach this probability")
    gen.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty,
                     help="above 1 discourages repeating words already in the prompt or reply")
    gen.add_argument("--max-context", type=int, default=d.max_context,
                     help="token budget of prompt plus reply; older turns are condensed beyond it")
    gen.add_argument("--threads", type=int, default=d.threads,
                     help="CPU threads for the models (default: as many as torch chooses, usually all cores)")
    gen.add_argument("--system-prompt", default=d.system_prompt,
                     help="replace the default system prompt (default: a short helpful-assistant prompt)")
    args = p.parse_args(argv)
    if args.concurrency < 1:
        p.error("--concurrency must be at least 1")
    if args.text_backend == "openai" and not (args.base_url and args.remote_model):
        p.error("--text-backend openai needs --base-url and --remote-model")
    if args.database and not args.database.startswith(("postgresql://", "postgres://")):
        p.error("--database takes a postgresql:// URL (SQLite is the default, in --data-dir)")
    if args.release_models_after < 0:
        p.error("--release-models-after must be 0 or more seconds")
    if min(args.max_message_chars, args.max_files, args.max_upload_mb, args.max_document_pages) <= 0:
        p.error("--max-message-chars, --max-files, --max-upload-mb and --max-document-pages must be positive")
    caption = None if args.caption_model in (None, NO_MODEL) else args.caption_model
    try:
        from_env = [_user_password(v) for v in os.environ.get(AUTH_ENV, "").split()]
    except argparse.ArgumentTypeError as error:
        p.error(f"{AUTH_ENV}: {error}")
    auth = (args.auth or []) + (args.auth_file or []) + from_env
    settings = {k: v for k, v in vars(args).items() if k != "auth_file"}
    return Config(**{**settings, "caption_model": caption, "auth": auth or None})
