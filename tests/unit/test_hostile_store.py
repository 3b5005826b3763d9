"""Hostile input to storage: imported documents, files, ids, races, permissions (issue: fresh start + hardening).

Each test is one attack; all of them succeeded against the code before the media module and the checked import.
"""

import base64
import copy
import json
import os
import stat
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatbot import media
from chatbot.config import parse_args
from chatbot.conversation.owners import persistent_secret
from chatbot.conversation.store import ConversationChanged, ConversationStore
from chatbot.errors import UserFacingError
from chatbot.perception.encoder import MultimodalEncoder
from chatbot.state import Attachment, AttachmentKind, Conversation, Role, Turn
from chatbot.web.security import Throttle

ANA, MALLORY = "key:ana", "key:mallory"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + bytes(range(64))
WAV = b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(64)
HTML = b"<html><script>fetch('/steal?'+JSON.stringify(localStorage))</script></html>"
SVG = b'<svg xmlns="http://www.w3.org/2000/svg" onload="alert(localStorage)"/>'


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    """Every attack on a store runs against both databases."""
    database = request.getfixturevalue("postgres_url") if request.param == "postgresql" else None
    return ConversationStore(tmp_path / "data", database, media_grace_seconds=0)


def document(files: dict[str, bytes], name: str = "photo.png", kind: str = "image", **conversation) -> dict:
    """An export as another server (or an attacker) would write it."""
    attachments = [{"kind": kind, "path": f"media/{media.sha256_bytes(c)[:2]}/{media.sha256_bytes(c)}.{name}",
                    "sha256": media.sha256_bytes(c), "name": name, "label": "Photo 1"} for c in files.values()]
    conv = {"id": "c1", "title": "holiday", "system_prompt": "Be brief.", "created": 1.0,
            "turns": [{"role": "user", "text": "look", "attachments": attachments, "observations": [],
                       "id": "t1", "created": 1.0, "interrupted": False, "notice": False},
                      {"role": "assistant", "text": "nice", "attachments": [], "observations": [],
                       "id": "t2", "created": 2.0, "interrupted": False, "notice": False}]}
    conv.update(conversation)
    return {"format": "multimodal-chatbot/conversation", "version": 1, "conversation": conv,
            "files": {media.sha256_bytes(c): base64.b64encode(c).decode() for c in files.values()}}


def media_files(store: ConversationStore) -> list[Path]:
    return sorted(p for p in store.media_dir.rglob("*") if p.is_file())


def assert_nothing_stored(store: ConversationStore, owner: str = ANA) -> None:
    assert store.list(owner) == []
    assert media_files(store) == []


# -- stored XSS: only photos and recordings get in, under a name from their content --------------
@pytest.mark.parametrize("content, name", [(HTML, "page.html"), (SVG, "drawing.svg"), (b"MZ\x90\x00", "x.exe")])
def test_import_refuses_files_that_are_not_photos_or_recordings(store, content, name):
    with pytest.raises(UserFacingError, match="not an image, recording or PDF"):
        store.import_json(ANA, json.dumps(document({"f": content}, name=name)))
    assert_nothing_stored(store)


def test_imported_file_is_named_by_its_detected_format(store):
    conv = store.import_json(ANA, json.dumps(document({"p": PNG, "w": WAV}, name="evil.html")))
    paths = [Path(a.path) for a in conv.attachments(None)]
    assert [p.suffix for p in paths] == [".png", ".wav"]
    assert [a.kind for a in conv.attachments(None)] == [AttachmentKind.IMAGE, AttachmentKind.AUDIO]
    assert all(p.parent.parent == store.media_dir and p.read_bytes() in (PNG, WAV) for p in paths)


def test_encoder_names_uploads_by_content_and_refuses_other_files(tmp_path):
    encoder = MultimodalEncoder(tmp_path / "media")
    page = tmp_path / "cat.jpg"
    page.write_bytes(HTML)
    with pytest.raises(UserFacingError, match="not an image, recording or PDF"):
        encoder.encode("", [page])
    assert not (tmp_path / "media").exists()


def test_concurrent_uploads_of_one_file_do_not_collide(tmp_path):
    """The encoder copied every upload through one fixed `<sha>.png.partial` name."""
    source = tmp_path / "big.png"
    source.write_bytes(PNG + os.urandom(4 << 20))
    sha = media.sha256_file(source)
    encoder = MultimodalEncoder(tmp_path / "media")
    errors: list[BaseException] = []

    def keep() -> None:
        try:
            encoder._keep_copy(source, sha, media.sniff(source))
        except BaseException as error:  # noqa: BLE001 - collected for the assertion
            errors.append(error)
    threads = [threading.Thread(target=keep) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [p.name for p in (tmp_path / "media").rglob("*") if p.is_file()] == [f"{sha}.png"]
    assert (tmp_path / "media" / sha[:2] / f"{sha}.png").read_bytes() == source.read_bytes()


# -- by reference: only your own files ----------------------------------------------------------
def test_by_reference_import_of_another_owners_hash_is_refused(store):
    victim = Conversation()
    path = media.write_bytes(media.media_path(store.media_dir, media.sha256_bytes(PNG), media.sniff_bytes(PNG)), PNG)
    victim.add_user_turn(Turn(role=Role.USER, text="my photo", attachments=[
        Attachment(kind=AttachmentKind.IMAGE, path=str(path), sha256=media.sha256_bytes(PNG), name="me.png")]))
    store.save(ANA, victim)
    by_reference = document({"p": PNG})
    del by_reference["files"]  # the attacker knows only the hash
    with pytest.raises(UserFacingError, match="not included"):
        store.import_json(MALLORY, json.dumps(by_reference))
    assert store.list(MALLORY) == []
    # The owner herself may re-import by reference.
    assert store.import_json(ANA, json.dumps(by_reference)).attachments()[0].path == str(path)


# -- schema: types, sizes, ids ------------------------------------------------------------------
def mutated(path: list, value) -> str:
    doc = document({"p": PNG})
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return json.dumps(doc)


@pytest.mark.parametrize("path, value", [
    (["conversation", "title"], "x" * 1_000_000),
    (["conversation", "title"], 5),
    (["conversation", "turns"], "many"),
    (["conversation", "turns", 0, "text"], ["a"]),
    (["conversation", "turns", 0, "role"], "wizard"),
    (["conversation", "turns", 0, "created"], "yesterday"),
    (["conversation", "turns", 0, "interrupted"], "no"),
    (["conversation", "turns", 0, "attachments", 0, "sha256"], 5),
    (["conversation", "turns", 0, "attachments", 0, "sha256"], "../../x"),
    (["conversation", "turns", 0, "attachments", 0], "photo"),
    (["conversation", "turns", 0, "observations"], [{"kind": "ocr", "text": {"a": 1}}]),
    (["conversation", "turns", 0, "text"], "\ud800 lone surrogate"),
    (["conversation", "system_prompt"], None),
    (["files"], ["not", "a", "table"]),
    (["files", media.sha256_bytes(PNG)], 12),
    (["files", media.sha256_bytes(PNG)], "not base64!"),
    (["conversation"], []),
    (["version"], "1"),
])
def test_malformed_import_gives_a_clear_error_and_stores_nothing(store, path, value):
    with pytest.raises(UserFacingError) as refused:
        store.import_json(ANA, mutated(path, value))
    assert "sqlite" not in str(refused.value).lower()
    assert_nothing_stored(store)


@pytest.mark.parametrize("text", ["[" * 100_000, '{"a":' * 50_000, "\x00", "", "null", "[]"])
def test_import_of_junk_never_escapes_as_another_error(store, text):
    with pytest.raises(UserFacingError):
        store.import_json(ANA, text)


def test_imported_ids_are_always_fresh(store):
    conv = store.import_json(ANA, mutated(["conversation", "id"], "../../x"))
    assert conv.id != "../../x" and conv.id.isalnum()
    assert all(t.id not in ("t1", "t2") and t.id.isalnum() for t in conv.turns)
    exported = json.loads(store.export_json(ANA, conv.id))
    assert exported["conversation"]["id"] == conv.id


def test_a_failed_import_leaves_no_half_written_files(store):
    doc = document({"p": PNG, "h": HTML})  # the photo is fine, the page is refused
    with pytest.raises(UserFacingError):
        store.import_json(ANA, json.dumps(doc))
    assert_nothing_stored(store)


def _export_documents() -> st.SearchStrategy:
    """Exports with fields replaced by arbitrary JSON values (the shapes an attacker can send)."""
    leaf = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=40)
    junk = st.recursive(leaf, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                           max_size=4), max_leaves=12)
    fields = st.sampled_from([["format"], ["version"], ["conversation", "title"], ["conversation", "turns"],
                              ["conversation", "turns", 0], ["conversation", "turns", 0, "attachments"],
                              ["conversation", "turns", 0, "attachments", 0, "kind"],
                              ["conversation", "turns", 0, "attachments", 0, "sha256"],
                              ["conversation", "turns", 1, "observations"], ["conversation", "created"],
                              ["files"], ["conversation", "turns", 1, "role"], ["conversation", "turns", 0, "id"]])
    return st.lists(st.tuples(fields, junk), min_size=1, max_size=3)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=_export_documents())
def test_fuzzed_imports_either_import_or_refuse_clearly(store, changes):
    doc = document({"p": PNG})
    for path, value in changes:
        target = doc
        try:
            for key in path[:-1]:
                target = target[key]
            target[path[-1]] = copy.deepcopy(value)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier change removed the place this one points at
    try:
        conv = store.import_json(ANA, json.dumps(doc))
    except UserFacingError:
        return
    assert store.load(ANA, conv.id) == conv


# -- media are removed with the last turn that refers to them -----------------------------------
def stored_photo(store: ConversationStore, content: bytes) -> Attachment:
    fmt = media.sniff_bytes(content)
    sha = media.sha256_bytes(content)
    path = media.write_bytes(media.media_path(store.media_dir, sha, fmt), content)
    return Attachment(kind=fmt.kind, path=str(path), sha256=sha, name="p.png")


def test_media_are_removed_after_delete_unless_still_referenced(store):
    mine, shared = stored_photo(store, PNG + b"mine"), stored_photo(store, PNG + b"shared")
    conv, other = Conversation(), Conversation()
    conv.add_user_turn(Turn(role=Role.USER, text="a", attachments=[mine, shared]))
    other.add_user_turn(Turn(role=Role.USER, text="b", attachments=[copy.copy(shared)]))
    store.save(ANA, conv)
    store.save(MALLORY, other)
    store.delete(ANA, conv.id)
    assert not Path(mine.path).exists()
    assert Path(shared.path).exists()  # Mallory's turn still shows it
    store.delete(MALLORY, other.id)
    assert media_files(store) == []


def test_media_are_removed_when_undo_or_clear_drops_their_turn(store):
    first, second = stored_photo(store, PNG + b"1"), stored_photo(store, PNG + b"2")
    conv = Conversation()
    conv.add_user_turn(Turn(role=Role.USER, text="a", attachments=[first]))
    conv.add_assistant_turn("ok")
    conv.add_user_turn(Turn(role=Role.USER, text="b", attachments=[second]))
    store.save(ANA, conv)
    del conv.turns[2:]  # undo
    store.save(ANA, conv)
    assert Path(first.path).exists() and not Path(second.path).exists()


def test_a_just_uploaded_file_survives_a_delete_until_it_is_old(tmp_path):
    """The encoder copies an upload a moment before its turn is saved; a delete in between must not take it."""
    store = ConversationStore(tmp_path / "data")  # the default grace period
    photo = stored_photo(store, PNG)
    conv = Conversation()
    conv.add_user_turn(Turn(role=Role.USER, text="a", attachments=[photo]))
    store.save(ANA, conv)
    store.delete(ANA, conv.id)
    assert Path(photo.path).exists()
    old = time.time() - 3600
    os.utime(photo.path, (old, old))
    assert store.collect_garbage() == 1 and not Path(photo.path).exists()


# -- concurrent whole-conversation saves ---------------------------------------------------------
def test_a_stale_save_does_not_overwrite_another_tabs_turn(store):
    conv = Conversation()
    conv.add_user_turn(Turn(role=Role.USER, text="hello"))
    conv.add_assistant_turn("hi")
    store.save(ANA, conv)
    tab_a, tab_b = store.load(ANA, conv.id), store.load(ANA, conv.id)
    tab_a.add_user_turn(Turn(role=Role.USER, text="from tab A"))
    tab_b.add_user_turn(Turn(role=Role.USER, text="from tab B"))
    store.save(ANA, tab_a)
    with pytest.raises(ConversationChanged):
        store.save(ANA, tab_b)
    assert [t.text for t in store.load(ANA, conv.id).turns] == ["hello", "hi", "from tab A"]


# -- permissions and secrets -----------------------------------------------------------------------
def test_database_and_data_dir_are_private_whatever_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        store = ConversationStore(tmp_path / "data")
        conv = Conversation()
        conv.add_user_turn(Turn(role=Role.USER, text="secret"))
        store.save(ANA, conv)
    finally:
        os.umask(old)
    assert stat.S_IMODE(store.data_dir.stat().st_mode) == 0o700
    for path in store.data_dir.glob("conversations.sqlite3*"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_atomic_writes_are_private_and_leave_no_temporary_files(tmp_path):
    target = media.write_bytes(tmp_path / "x" / "secret", b"s")
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    with pytest.raises(RuntimeError), media.atomic_writer(tmp_path / "x" / "half") as out:
        out.write(b"half")
        raise RuntimeError("crash mid-write")
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["secret"]


def test_the_browser_secret_is_created_once_even_when_starts_race(tmp_path):
    seen: list[str] = []
    threads = [threading.Thread(target=lambda: seen.append(persistent_secret(tmp_path / "s"))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(seen)) == 1 and stat.S_IMODE((tmp_path / "s").stat().st_mode) == 0o600


def test_passwords_come_from_a_file_or_the_environment(tmp_path, monkeypatch):
    auth_file = tmp_path / "users"
    auth_file.write_text("# team\nana:correct horse\n\nben:battery:staple\n")
    monkeypatch.setenv("CHATBOT_AUTH", "cy:pw1 dee:pw2")
    config = parse_args(["--auth-file", str(auth_file), "--auth", "eve:x"])
    assert config.auth == [("eve", "x"), ("ana", "correct horse"), ("ben", "battery:staple"), ("cy", "pw1"),
                           ("dee", "pw2")]


def test_throttle_backs_off_after_free_attempts_and_forgives_a_success():
    throttle = Throttle(free=3, base_seconds=10)
    for _ in range(3):
        assert throttle.wait("1.2.3.4") == 0
        throttle.failed("1.2.3.4")
    assert 9 < throttle.wait("1.2.3.4") <= 10
    assert throttle.wait("5.6.7.8") == 0  # per client
    throttle.succeeded("1.2.3.4")
    assert throttle.wait("1.2.3.4") == 0
