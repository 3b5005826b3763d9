"""Hostile input against a real server: stored XSS via imported files (in Chromium), served-file headers,
URL fetching, file permissions, refused uploads, passwords in `ps`, password and owner-key guessing.

Each test is one attack that worked against the app before its hardening.
"""

import base64
import hashlib
import json
import os
import secrets
import stat
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from gradio_client import Client, handle_file

from harness.server import AppServer
from tests.support.drivers import api_send, open_page, text_of

# A small model and no speech: these tests attack storage and HTTP, not the replies.
LIGHT = ("--text-model", "smollm2-135m", "--speech-model", "none")
PNG = (Path(__file__).resolve().parents[2] / "assets" / "examples" / "sign.png").read_bytes()
STEAL = ("fetch('/gradio_api/LEAK?' + encodeURIComponent(JSON.stringify(Object.assign({}, localStorage))))"
         ".catch(() => 0)")
HTML = f"<html><body><script>{STEAL}</script>hello</body></html>".encode()
SVG = f'<svg xmlns="http://www.w3.org/2000/svg"><script>{STEAL}</script></svg>'.encode()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with AppServer(tmp_path_factory.mktemp("hostile-data"), *LIGHT) as app:
        yield app


def export_with(content: bytes, name: str) -> dict:
    """An exported conversation whose attachment is `content` (what an attacker hands a victim)."""
    sha = sha256(content)
    turn = {"role": "user", "text": "see attachment", "id": "t1", "created": 1.0, "interrupted": False,
            "notice": False, "observations": [],
            "attachments": [{"kind": "image", "path": f"media/{sha[:2]}/{sha}.{name.rsplit('.', 1)[-1]}",
                             "sha256": sha, "name": name, "label": "Photo 1"}]}
    return {"format": "multimodal-chatbot/conversation", "version": 1,
            "conversation": {"id": "x", "title": "hi", "system_prompt": "", "created": 1.0, "turns": [turn]},
            "files": {sha: base64.b64encode(content).decode()}}


def sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def plant(path: Path, content: bytes) -> Path:
    """A file in the served media folder (as an older version, or an import, may have left it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def file_url(server: AppServer, path: Path) -> str:
    return f"{server.url}gradio_api/file={path}"


def get(url: str, data: bytes | None = None, headers: dict | None = None):
    """(status, headers, body) of one request, errors included."""
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def test_an_imported_html_or_svg_file_runs_no_script_in_the_browser(server, browser, tmp_path):
    attacker = Client(server.url, verbose=False)
    for content, name in ((HTML, "invoice.html"), (SVG, "logo.svg")):
        document = tmp_path / f"{name}.json"
        document.write_text(json.dumps(export_with(content, name)))
        with pytest.raises(Exception, match="not an image, recording or PDF"):
            attacker.predict(handle_file(str(document)), api_name="/import")
    # Whatever got into the media folder (by that import, or left by an older version) is served, not run.
    for content, suffix in ((HTML, "html"), (SVG, "svg")):
        sha = sha256(content)
        planted = server.data_dir / "media" / sha[:2] / f"{sha}.{suffix}"
        if not planted.exists():
            plant(planted, content)
    targets = [p for p in (server.data_dir / "media").rglob("*") if p.suffix in (".html", ".svg")]
    assert len(targets) == 2

    with open_page(browser, server.url) as victim:
        victim.wait_for_function("Object.keys(localStorage).length > 0")  # the owner key is there to steal
        leaks: list[str] = []
        victim.context.on("request", lambda r: leaks.append(r.url) if "LEAK" in r.url else None)
        for target in targets:
            tab = victim.context.new_page()
            try:
                tab.goto(file_url(server, target), wait_until="load")
            except Exception:  # noqa: BLE001 - "Download is starting": the browser saves it instead of showing it
                pass
            tab.wait_for_timeout(1500)
            tab.close()
        assert leaks == [], "a served file ran script with the page's local storage"


def test_served_files_are_never_sniffed_or_shown_as_pages(server):
    sha = sha256(PNG)
    photo = plant(server.data_dir / "media" / sha[:2] / f"{sha}.png", PNG)
    status, headers, body = get(file_url(server, photo))
    assert status == 200 and body == PNG and headers["content-type"] == "image/png"
    assert headers["x-content-type-options"] == "nosniff"
    assert "sandbox" in headers["content-security-policy"] and "default-src 'none'" in headers["content-security-policy"]
    assert "attachment" not in (headers.get("content-disposition") or "")
    page = plant(server.data_dir / "media" / "00" / f"{'0' * 64}.html", HTML)
    status, headers, _ = get(file_url(server, page))
    assert status == 200 and headers["content-disposition"] == "attachment"
    assert headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("target", ["https://example.com/cat.png", "http://169.254.169.254/latest/meta-data",
                                    "//example.com/x"])
def test_the_server_never_fetches_a_url_for_a_client(server, target):
    status, _, body = get(f"{server.url}gradio_api/file={target}")
    assert status == 403 and b"does not fetch" in body
    status, _, _ = get(f"{server.url}gradio_api/proxy={target}")
    assert status == 403
    # A file "uploaded" by URL in an API payload: Gradio would download it.
    payload = {"data": [{"text": "hi", "files": [{"path": target, "meta": {"_type": "gradio.FileData"}}]}, None]}
    status, _, body = get(f"{server.url}gradio_api/call/chat", json.dumps(payload).encode(),
                          {"Content-Type": "application/json"})
    assert status == 400 and b"does not fetch" in body


def test_data_uploads_and_exports_are_private(server, tmp_path):
    assert "Umask:\t0077" in Path(f"/proc/{server.pid}/status").read_text()
    data = server.data_dir
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    for db in data.glob("conversations.sqlite3*"):
        assert stat.S_IMODE(db.stat().st_mode) == 0o600, db
    gradio_temp = data / "tmp" / "gradio"
    assert stat.S_IMODE(gradio_temp.stat().st_mode) == 0o700

    client = Client(server.url, verbose=False, download_files=str(tmp_path / "downloads"))  # not /tmp/gradio
    photo = tmp_path / "sign.png"
    photo.write_bytes(PNG)
    api_send(client, "Read the sign, one word.", (photo,))
    exported = Path(client.predict(api_name="/export"))  # gradio_client's local copy; find the server's
    on_server = list(data.rglob(exported.name))
    assert on_server and all(p.is_relative_to(data / "tmp") for p in on_server)
    assert all(stat.S_IMODE(p.stat().st_mode) & 0o077 == 0 for p in on_server)
    shared = Path("/tmp/gradio")
    assert not (shared.exists() and list(shared.rglob(exported.name)))

    # An upload the app refuses does not stay on disk, in its temp dir or a shared one.
    marker = secrets.token_hex(16).encode()
    refused = tmp_path / "holiday.png"
    refused.write_bytes(b"<html>" + marker + b"</html>")
    chat = api_send(client, "what is this", (refused,))
    assert "not an image, recording or PDF" in text_of(chat[-1])
    leftovers = [p for root in (data / "tmp", Path("/tmp/gradio")) if root.exists()
                 for p in root.rglob("holiday.png") if p.is_file() and marker in p.read_bytes()]
    assert leftovers == []


def test_owner_key_guessing_is_throttled(server):
    client = Client(server.url, verbose=False)
    refused = 0
    for _ in range(24):
        try:
            client.predict(secrets.token_urlsafe(24), api_name="/use_key")
        except Exception as error:  # noqa: BLE001 - gradio_client wraps the app's message
            assert "Too many keys" in str(error)
            refused += 1
    assert refused >= 2


@pytest.fixture(scope="module")
def signed_in_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("auth")
    users = folder / "users"
    users.write_text("# who may sign in\nana:Correct-Horse-7\n")
    os.chmod(users, 0o600)
    with AppServer(folder / "data", *LIGHT, "--auth-file", str(users),
                   env={"CHATBOT_AUTH": "ben:Battery-Staple-9"}) as app:
        yield app


def test_passwords_stay_out_of_ps_and_guessing_them_is_throttled(signed_in_server):
    command_line = Path(f"/proc/{signed_in_server.pid}/cmdline").read_bytes()
    assert b"Correct-Horse" not in command_line and b"Battery-Staple" not in command_line
    assert len(Client(signed_in_server.url, auth=("ana", "Correct-Horse-7"), verbose=False).predict(
        api_name="/conversations")) == 0
    Client(signed_in_server.url, auth=("ben", "Battery-Staple-9"), verbose=False)

    statuses = []
    for attempt in range(8):
        form = f"username=ana&password=guess{attempt}".encode()
        statuses.append(get(f"{signed_in_server.url}login", form,
                            {"Content-Type": "application/x-www-form-urlencoded"})[0])
    assert statuses[:5] == [400] * 5 and 429 in statuses[5:]
