"""Runs `app.py` as a real server process for API and browser tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from app import READY

ROOT = Path(__file__).resolve().parents[1]

# Deterministic, short replies keep end-to-end tests quick and repeatable.
TEST_ARGS = ["--temperature", "0", "--max-new-tokens", "48"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppServer:
    def __init__(self, data_dir: Path, *extra_args: str, settings: tuple[str, ...] = tuple(TEST_ARGS),
                 startup_timeout: float = 600, plugins: tuple[str, ...] = (), env: dict[str, str] | None = None):
        """`plugins`: modules imported before the app starts (e.g. one that registers a test backend)."""
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        start = [sys.executable, str(ROOT / "app.py")]
        if plugins:
            start = [sys.executable, "-c", f"import sys, app, {', '.join(plugins)}; sys.exit(app.main(sys.argv[1:]))"]
        self.env = env or {}
        self.args = [*start, "--port", str(self.port), "--data-dir", str(data_dir),
                     *settings, *extra_args]
        self.timeout = startup_timeout
        self.log_path = data_dir / "server.log"
        self.process: subprocess.Popen | None = None

    def start(self, *, wait_for_model: bool = True) -> AppServer:
        """Start the app and return once its page is served and, with `wait_for_model`, its text model is loaded.

        The app serves its page before it loads the text model: a test that measures the CPU, or the first
        reply's time, would otherwise measure the loading beside it.
        """
        env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1", **self.env}
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.args, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"app exited with {self.process.returncode}:\n{self.log_text()}")
            try:
                with urllib.request.urlopen(self.url, timeout=2) as response:
                    served = response.status == 200
            except OSError:
                served = False
            if served and (not wait_for_model or READY in self.log_path.read_text(errors="replace")):
                return self
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"app did not serve {self.url} (and load its text model) in {self.timeout}s:\n"
                           f"{self.log_text()}")

    @property
    def pid(self) -> int:
        return self.process.pid

    def restart(self, sig: int = signal.SIGTERM) -> AppServer:
        """Stop the process (SIGKILL: no chance to clean up) and start a new one on the same port and data."""
        self.stop(sig)
        return self.start()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if hasattr(self, "log"):
            self.log.close()

    def __enter__(self) -> AppServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
