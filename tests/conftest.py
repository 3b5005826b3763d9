"""Shared fixtures. Nothing here reaches the network: tiny models are built, real ones come from pip packages."""

import os
import shutil
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402

from tests.support.tiny_models import build_tiny_causal, build_tiny_t5  # noqa: E402

_FOLDER_MARKS = {"unit": pytest.mark.unit, "e2e": pytest.mark.e2e}


def pytest_collection_modifyitems(items):
    """Each test is marked by its folder (`pytest -m unit` runs the fast ones); browser tests also `browser`."""
    for item in items:
        folder = item.path.parent.name
        # A unit test that loads a real bundled model (Whisper, OCR) is `slow`: the full suite runs it, the quick loop not.
        if folder in _FOLDER_MARKS and not (folder == "unit" and item.get_closest_marker("slow")):
            item.add_marker(_FOLDER_MARKS[folder])
        if "page" in getattr(item, "fixturenames", ()) or "browser" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.browser)


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory):
    return build_tiny_t5(tmp_path_factory.mktemp("tiny-t5"))


@pytest.fixture(scope="session")
def tiny_causal_dir(tmp_path_factory):
    return build_tiny_causal(tmp_path_factory.mktemp("tiny-causal"))


POSTGRES_URL_VARIABLE = "CHATBOT_TEST_POSTGRES_URL"


@pytest.fixture
def postgres_url():
    """A URL of an empty PostgreSQL schema of its own (dropped afterwards), from $CHATBOT_TEST_POSTGRES_URL.

    Without a server the test is skipped here, but fails in CI (`.ci/run` starts one).
    """
    base = os.environ.get(POSTGRES_URL_VARIABLE)
    if not base:
        message = f"no PostgreSQL server: set {POSTGRES_URL_VARIABLE} (.ci/run starts one)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    import uuid

    import psycopg

    schema = f"test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(base, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{base}{'&' if '?' in base else '?'}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(base, autocommit=True) as admin:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture(scope="session")
def app_server(tmp_path_factory):
    """The real app (bundled models) served on a free local port, shared by API and browser tests."""
    from harness.server import AppServer

    with AppServer(tmp_path_factory.mktemp("app-data")) as server:
        yield server


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  # A fake microphone that "speaks" a committed recording.
                  "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"]
FAKE_MIC_WAV = Path(__file__).parent / "data" / "capital_of_france.wav"


@pytest.fixture(scope="session")
def browser():
    """Debian's Chromium driven by Playwright (no browser download)."""
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).exists():
        message = "Chromium is not installed (Debian: apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        args = CHROMIUM_FLAGS + [f"--use-file-for-fake-audio-capture={FAKE_MIC_WAV}"]
        instance = playwright.chromium.launch(executable_path=chromium, args=args)
        yield instance
        instance.close()


@pytest.fixture
def page(browser, app_server):
    from tests.support.drivers import open_page

    with open_page(browser, app_server.url) as tab:
        yield tab
