"""The first start on a fresh machine: empty model caches -> join, verify, convert -> the app serves and answers.

A machine that already holds converted weights hides every missing requirement of the first
start (it once lacked `accelerate`); this test never uses the shared caches.
"""

import time

from gradio_client import Client

from harness.server import AppServer
from tests.support.drivers import api_send, text_of


def test_first_start_from_empty_caches_serves_and_answers(tmp_path):
    cache = tmp_path / "cache"
    env = {"CHATBOT_CACHE_DIR": str(cache / "chatbot"), "XDG_CACHE_HOME": str(cache / "xdg"),
           "HF_HOME": str(cache / "hf")}
    began = time.monotonic()
    with AppServer(tmp_path / "data", env=env, startup_timeout=850) as server:
        page = time.monotonic() - began
        # The page is served at once; the first message waits while the weights are prepared and loaded.
        chat = api_send(Client(server.url, verbose=False), "What is the capital of France? Answer with one word.")
        first_reply = time.monotonic() - began
        assert "paris" in text_of(chat[-1]).lower()
        # Everything the bundled models need was built from the installed packages, here and now.
        assert (cache / "chatbot" / "qwen2.5-coder-0.5b-instruct.gguf").stat().st_size > 400e6
        assert (cache / "chatbot" / "qwen2.5-0.5b-hf" / "config.json").exists()
        # Whisper and the photo classifier load at their first use, but their files are made at start.
        assert (cache / "chatbot" / "whisper-base-ct2" / "model.bin").stat().st_size > 50e6
        assert (cache / "chatbot" / "efficientnet-lite0-0.1.0" / "model.onnx").stat().st_size > 10e6
        assert (cache / "chatbot" / "all-minilm-l6-v2-0.1.0" / "encoder.onnx.data").stat().st_size > 80e6  # relevance
    print(f"first start from empty caches: page {page:.0f} s, first reply {first_reply:.0f} s")
