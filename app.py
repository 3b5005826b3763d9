"""Start the multimodal chatbot: `python app.py --help` lists the settings."""

from __future__ import annotations

import logging
import os
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import Future

from chatbot import footprint, media, weights
from chatbot.config import NO_MODEL, Config, parse_args


def configure_environment(config: Config) -> None:
    """Private files, no calls home: set before gradio/transformers are imported, which read these once."""
    os.umask(0o077)  # everything this process writes (database, media, uploads, exports) is the user's alone
    # Uploads and exports go to a private temp dir under the data dir (not a shared /tmp), emptied at start.
    # App copies sharing one data dir (with --database) each empty only their own.
    temp = config.data_dir / "tmp"
    if config.database:
        temp = temp / f"{socket.gethostname()}-{config.port}"
    temp = media.private_dir(temp, clean=True)
    os.environ["GRADIO_TEMP_DIR"] = str(media.private_dir(temp / "gradio"))
    tempfile.tempdir = str(temp)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ["ORT_DISABLE_TELEMETRY"] = "1"  # onnxruntime's uploader (see chatbot/perception/onnx.py)
    if not config.hub_models():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if config.threads:
        os.environ["OMP_NUM_THREADS"] = str(config.threads)
    footprint.limit_arenas()  # before the model and request threads start: each would otherwise get a heap of its own


def build_service(config: Config):
    """The chat service, its text model not loaded yet: `load_models` loads it while the page is served."""
    from chatbot.conversation.relevance import MiniLMRelevance
    from chatbot.conversation.service import ChatService
    from chatbot.conversation.store import ConversationStore
    from chatbot.generation.base import GenerationSettings, LoadingGenerator
    from chatbot.perception.encoder import Limits, MultimodalEncoder
    from chatbot.perception.speech import OnDemandRecognizer
    from chatbot.perception.vision import load_analyzers

    store = ConversationStore(config.data_dir, config.database)  # first: a bad data dir fails before minutes of model loading
    log = logging.getLogger("app")
    if removed := store.collect_garbage():
        log.info("Removed %d media file(s) no conversation refers to", removed)
    generator = LoadingGenerator(lambda: load_text_model(config))
    release = config.release_models_after or None
    recognizer = None if config.speech_model == NO_MODEL else OnDemandRecognizer(
        config.speech_model, config.speech_language, release_after=release)
    analyzers = load_analyzers(config.caption_model, on_demand=True, release_after=release)
    limits = Limits(max_message_chars=config.max_message_chars, max_files=config.max_files,
                    max_file_mb=config.max_upload_mb, max_document_pages=config.max_document_pages)
    encoder = MultimodalEncoder(store.media_dir, recognizer, analyzers, limits)
    settings = GenerationSettings(max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                                  top_p=config.top_p, repetition_penalty=config.repetition_penalty)
    speaker = None
    if config.voice != NO_MODEL:
        from chatbot.voice.speaker import ReplySpeaker
        from chatbot.voice.tts import load_voice

        log.info("Loading the voice '%s'...", config.voice)
        speaker = ReplySpeaker(load_voice(config.voice), store)
    return ChatService(encoder, generator, store, settings, system_prompt=config.system_prompt,
                       relevance=MiniLMRelevance(), listener=speaker)


def load_text_model(config: Config):
    """The reply model (and, at a first start, the files of the models loaded at their first use)."""
    from chatbot.generation.base import load_generator

    log = logging.getLogger("app")
    if config.threads:
        import torch

        torch.set_num_threads(config.threads)
    # Whisper's and the photo models' files (only a first start makes them); they load at their first use.
    weights.prepare_models_used_later(config.speech_model)
    if config.text_backend == "openai":
        log.info("Replies come from '%s' at %s", config.remote_model, config.base_url)
    else:
        log.info("Loading the text model '%s' (the first start prepares the bundled weights, about a minute)...",
                 config.text_model)
    return load_generator(config)


def read_system_prompt(service) -> Future:
    """Every conversation starts with the system prompt: read it now (in the background), not in each first turn."""
    generator = service.generator
    return generator.prefill(service.new_conversation().render(generator.count_tokens, generator.context_tokens)[:1])


def load_models(service) -> bool:
    """Load the sentence embedder, the text model (replies wait for it), read the system prompt; whether the text
    model loaded.

    Runs once the page is served: importing torch and transformers and loading the weights took most
    of a later start, and a first start prepares the bundled weights here (about a minute).
    """
    log = logging.getLogger("app")
    log.info("Loading the sentence embedder (relevance of earlier messages)...")
    try:  # first: a first start exports it (seconds), as it prepares the other models' files
        service.relevance.load()
    except Exception:  # noqa: BLE001 - the replies must not wait for it forever; its first use tries again
        log.exception("Loading the sentence embedder failed")
    if service.generator.load() is None:
        return False
    try:
        read_system_prompt(service).result()
    except Exception:  # noqa: BLE001 - logged where it failed; replies read the prompt themselves
        pass
    log.info(READY)
    return True


READY = "Ready: the text model is loaded and the system prompt read"  # the log line that says so (tests wait for it)


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    try:
        media.private_dir(config.data_dir)
        configure_environment(config)
    except OSError as error:
        print(f"\nCannot start: the data directory {config.data_dir} is not usable ({error.strerror}).",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own start-up probes
    from chatbot.errors import UserFacingError

    try:
        service = build_service(config)
    except UserFacingError as error:
        print(f"\nCannot start: {error}", file=sys.stderr)
        return 2

    import gradio as gr
    import uvicorn
    from fastapi import FastAPI

    from chatbot.conversation.owners import persistent_secret
    from chatbot.web import security
    from chatbot.web.openai_api import ApiKeys, openai_router
    from chatbot.web.page import ChatPage
    from chatbot.web.voice import VoiceOptions

    try:
        keys = ApiKeys.load(config.api_keys_file)
    except (UserFacingError, OSError) as error:
        print(f"\nCannot start: {error}", file=sys.stderr)
        return 2
    voice = None if service.listener is None else VoiceOptions(service.listener, service.encoder.recognizer,
                                                               config.speak_replies)
    # The secret that encrypts each browser's owner key must outlive restarts, or browsers lose their lists.
    page = ChatPage(service, persistent_secret(config.data_dir / "browser-secret"), config.concurrency, voice)
    demo = page.build()
    demo.queue(default_concurrency_limit=1)
    # One server: the OpenAI-compatible API at /v1 first, the page (mounted at /) takes everything else.
    # The hardening middleware wraps every route of both: safe file headers, no URL fetching, login throttling.
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None, middleware=security.middleware())
    app.include_router(openai_router(service, keys, signed_in=bool(config.auth)))
    # Only the media folder is served (files named by their SHA-256); the database is not. No Gradio
    # banner here (it suggests share=True, a public tunnel this offline app never opens).
    app = gr.mount_gradio_app(app, demo, path="/", server_name=config.host, server_port=config.port,
                              allowed_paths=[str(service.store.media_dir)], auth=config.auth, show_error=False,
                              max_file_size=int(config.max_upload_mb * 2**20), **page.launch_options())
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="warning"))
    # The models load once the page is served (a message sent meanwhile waits for the text model): on two
    # cores, loading beside Gradio's import and the server's start would slow both by seconds.
    threading.Thread(target=load_after_start, args=(service, server), name="load-models", daemon=True).start()
    logging.getLogger("app").info("Serving the chat on http://%s:%d/ and the OpenAI-compatible API at /v1 "
                                  "(Ctrl+C stops it)", config.host, config.port)
    server.run()
    if error := service.generator.error:
        print(f"\nCannot start: {error}", file=sys.stderr)
        return 2
    return 0


def load_after_start(service, server) -> None:
    """`load_models` once `server` listens; a text model that cannot load stops the server (as a failed start)."""
    while not (server.started or server.should_exit):
        time.sleep(0.05)
    if not load_models(service):
        server.should_exit = True


if __name__ == "__main__":
    sys.exit(main())
