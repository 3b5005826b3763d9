"""ConversationStore on SQLite (WAL) and on PostgreSQL: per-owner access, crash safety, export/import round trips.

Every test that takes `store` or `open_store` runs against both databases.
"""

import base64
import hashlib
import json
import shutil
import sqlite3
import subprocess
import sys
import threading

import pytest

from chatbot.conversation.store import ConversationNotFound, ConversationStore
from chatbot.errors import UserFacingError
from chatbot.state import (
    Attachment,
    AttachmentKind,
    Conversation,
    Observation,
    Role,
    Turn,
)

ANA, BEN = "key:ana", "key:ben"


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request) -> str | None:
    """None for SQLite in the data directory, or the URL of an empty PostgreSQL schema."""
    return request.getfixturevalue("postgres_url") if request.param == "postgresql" else None


@pytest.fixture
def open_store(database):
    """Opens a store on `data_dir` and this test's database (a reopen is a restart)."""
    return lambda data_dir: ConversationStore(data_dir, database)


@pytest.fixture
def store(open_store, tmp_path):
    return open_store(tmp_path / "data")


def media_file(store: ConversationStore, content: bytes, suffix: str) -> Attachment:
    """A file kept the way the encoder keeps it: media/<sha[:2]>/<sha><suffix>."""
    sha = hashlib.sha256(content).hexdigest()
    path = store.media_dir / sha[:2] / f"{sha}{suffix}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    kind = {".png": AttachmentKind.IMAGE, ".pdf": AttachmentKind.DOCUMENT}.get(suffix, AttachmentKind.AUDIO)
    return Attachment(kind=kind, path=str(path), sha256=sha, name=f"upload{suffix}")


def sample(store: ConversationStore) -> Conversation:
    conv = Conversation(system_prompt="Be brief. «ünïcode»")
    photo, voice = (media_file(store, b"\x89PNG\r\n\x1a\n fake photo", ".png"),
                    media_file(store, b"RIFF\x00\x00\x00\x00WAVE fake wav", ".wav"))
    conv.add_user_turn(Turn(role=Role.USER, text="What does the sign say? 🙂", attachments=[photo],
                            observations=[Observation("ocr", 'text in the photo: "OPEN"', photo.sha256, "ocr")]))
    conv.add_assistant_turn("It says OPEN. It also", cut=True)
    conv.add_user_turn(Turn(role=Role.USER, attachments=[voice],
                            observations=[Observation("transcript", "what is the capital of France",
                                                      voice.sha256, "whisper")]))
    conv.add_assistant_turn("Par", interrupted=True)
    conv.turns.append(Turn(role=Role.ASSISTANT, text="a notice", notice=True))
    return conv


def test_database_uses_wal_foreign_keys_and_a_schema_version(tmp_path):
    store = ConversationStore(tmp_path / "data")
    db = sqlite3.connect(store.path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA user_version").fetchone()[0] == 3
    assert {"conversations", "turns", "attachments", "observations"} <= {
        r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert store._db.execute("PRAGMA foreign_keys").fetchone()[0] == 1


def test_save_and_load_round_trip_every_field(store, open_store):
    conv = sample(store)
    store.save(ANA, conv)
    loaded = store.load(ANA, conv.id)
    assert loaded == conv
    assert loaded.to_json() == conv.to_json()
    # Reopening the file (a restart) gives the same.
    assert open_store(store.data_dir).load(ANA, conv.id) == conv


def test_attachment_paths_are_stored_relative_so_the_data_dir_can_move(store, open_store, tmp_path):
    conv = sample(store)
    store.save(ANA, conv)
    stored = {r[0] for r in store._db.execute("SELECT path FROM attachments")}
    assert all(p.startswith("media/") for p in stored)
    store.close()
    moved = shutil.move(store.data_dir, tmp_path / "moved")
    loaded = open_store(moved).load(ANA, conv.id)
    assert all(a.path.startswith(str(moved)) and open(a.path, "rb").read() for a in loaded.attachments())


def test_a_version_1_database_is_migrated_in_place(store, open_store, database):
    conv = sample(store)
    store.save(ANA, conv)
    with store._transaction():  # the version 1 layout (no `cut`, no search index), through the database's dialect
        store._db.execute("ALTER TABLE turns DROP COLUMN cut")
        if database is None:
            store._db.execute("DROP TABLE conversation_search")
        else:
            for table in ("conversations", "turns", "observations"):
                store._db.execute(f"DROP INDEX {table}_search")
        store._db.set_schema_version(1)
    store.close()
    reopened = open_store(store.data_dir)
    loaded = reopened.load(ANA, conv.id)
    assert [t.text for t in loaded.turns] == [t.text for t in conv.turns] and not any(t.cut for t in loaded.turns)
    assert [c.id for c in reopened.search(ANA, "sign")] == [conv.id]  # what was stored before is searchable
    reopened.save(ANA, conv)
    assert reopened.load(ANA, conv.id) == conv


def test_a_version_1_export_still_imports(store):
    conv = sample(store)
    store.save(ANA, conv)
    document = json.loads(store.export_json(ANA, conv.id))
    document["version"] = 1
    for turn in document["conversation"]["turns"]:
        del turn["cut"]
    imported = store.import_json(BEN, json.dumps(document))
    assert [t.text for t in imported.turns] == [t.text for t in conv.turns]


def test_replace_last_only_replaces_an_unchanged_last_turn(store):
    conv = sample(store)
    store.save(ANA, conv)
    last = conv.turns[-1]
    longer = Turn(role=Role.ASSISTANT, text="a longer notice", id=last.id, notice=True)
    assert not store.replace_last(BEN, conv.id, len(conv.turns) - 1, longer)  # not Ben's
    assert not store.replace_last(ANA, conv.id, len(conv.turns) - 2, longer)  # not the last turn
    assert not store.replace_last(ANA, conv.id, len(conv.turns) - 1, Turn(role=Role.ASSISTANT, text="other"))
    assert store.replace_last(ANA, conv.id, len(conv.turns) - 1, longer)
    assert store.load(ANA, conv.id).turns[-1] == longer and len(store.load(ANA, conv.id).turns) == len(conv.turns)


def test_each_owner_sees_only_their_own(store):
    conv = sample(store)
    store.save(ANA, conv)
    assert [c.id for c in store.list(ANA)] == [conv.id] and store.list(BEN) == []
    assert store.list(ANA)[0].turns == 5 and store.list(ANA)[0].title == "What does the sign say? 🙂"
    with pytest.raises(ConversationNotFound):
        store.load(BEN, conv.id)
    with pytest.raises(ConversationNotFound):
        store.save(BEN, conv)  # cannot overwrite someone else's conversation by reusing its id
    with pytest.raises(ConversationNotFound):
        store.rename(BEN, conv.id, "x")
    assert not store.delete(BEN, conv.id)
    assert not store.append(BEN, conv.id, 5, [Turn(role=Role.USER, text="sneaky")])
    assert store.load(ANA, conv.id) == conv


def test_list_is_most_recent_first_and_rename_delete_work(store):
    first, second = Conversation(title="first"), Conversation(title="second")
    for conv in (first, second):
        conv.add_user_turn(Turn(role=Role.USER, text=conv.title))
        store.save(ANA, conv)
    assert [c.title for c in store.list(ANA)] == ["second", "first"]
    store.rename(ANA, first.id, "renamed")
    assert [c.title for c in store.list(ANA)] == ["renamed", "second"]
    assert store.delete(ANA, second.id) and [c.id for c in store.list(ANA)] == [first.id]
    assert store._db.execute("SELECT count(*) FROM turns WHERE conversation_id = ?", (second.id,)).fetchone()[0] == 0


def test_append_only_extends_an_unchanged_conversation(store):
    conv = Conversation()
    conv.add_user_turn(Turn(role=Role.USER, text="hi"))
    store.save(ANA, conv)
    reply = Turn(role=Role.ASSISTANT, text="hello")
    assert not store.append(ANA, conv.id, 0, [reply])  # stale position: the conversation moved on
    assert store.append(ANA, conv.id, 1, [reply])
    assert store.load(ANA, conv.id).turns[-1] == reply
    store.delete(ANA, conv.id)
    assert not store.append(ANA, conv.id, 2, [reply])  # a deleted conversation does not come back


def test_unanswered_user_turns_are_closed_as_interrupted(store):
    answered, cut_off = sample(store), Conversation()
    cut_off.add_user_turn(Turn(role=Role.USER, text="a question the server died on"))
    store.save(ANA, answered)
    store.save(ANA, cut_off)
    assert store.close_unanswered() == 1
    turns = store.load(ANA, cut_off.id).turns
    assert [t.role for t in turns] == [Role.USER, Role.ASSISTANT] and turns[1].interrupted
    assert store.load(ANA, answered.id) == answered
    assert store.close_unanswered() == 0


def test_concurrent_writers_from_many_threads(store):
    def chat(n: int) -> None:
        conv = Conversation()
        for i in range(10):
            conv.add_user_turn(Turn(role=Role.USER, text=f"owner {n} message {i}"))
            store.save(f"key:{n}", conv)
            conv.add_assistant_turn(f"reply {i}")
            assert store.append(f"key:{n}", conv.id, len(conv.turns) - 1, conv.turns[-1:])

    threads = [threading.Thread(target=chat, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for n in range(8):
        [summary] = store.list(f"key:{n}")
        texts = [t.text for t in store.load(f"key:{n}", summary.id).turns if t.role is Role.USER]
        assert texts == [f"owner {n} message {i}" for i in range(10)]


def test_a_writer_killed_mid_transaction_leaves_a_consistent_store(tmp_path, database, open_store):
    """SIGKILL a process that rewrites a big conversation in a loop: the store keeps a whole version."""
    data = tmp_path / "data"
    script = f"""
import sys
from chatbot.state import Conversation, Role, Turn
from chatbot.conversation.store import ConversationStore
store = ConversationStore({str(data)!r}, {database!r})
conv = Conversation(id="c1")
for i in range(400):
    conv.add_user_turn(Turn(role=Role.USER, text="question %d " % i * 20))
    conv.add_assistant_turn("answer %d" % i)
store.save("key:ana", conv)
print("ready", flush=True)
version = 0
while True:
    version += 1
    for turn in conv.turns:
        turn.text = "version %d" % version
    store.save("key:ana", conv)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, cwd=str(
        __import__("pathlib").Path(__file__).resolve().parents[2]))
    assert proc.stdout.readline().strip() == b"ready"
    threading.Event().wait(1.5)  # let it commit (and be mid-way through) several rewrites
    proc.kill()
    proc.wait()
    store = open_store(data)
    if database is None:
        assert store._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    turns = store.load("key:ana", "c1").turns
    assert len(turns) == 800 and len({t.text for t in turns}) == 1  # one whole version, never a mix


def test_export_then_import_is_exact(store, tmp_path):
    conv = sample(store)
    store.save(ANA, conv)
    exported = store.export_json(ANA, conv.id)
    document = json.loads(exported)
    assert set(document["files"]) == {a.sha256 for a in conv.attachments()}
    assert str(store.data_dir) not in exported  # no server paths leak into the file

    elsewhere = ConversationStore(tmp_path / "elsewhere")  # another server: files come from the document
    imported = elsewhere.import_json(BEN, exported)
    assert imported.id != conv.id  # imports always get fresh ids: a document never picks a stored id
    assert without_ids(elsewhere.export_json(BEN, imported.id)) == without_ids(exported)
    for a, b in zip(conv.attachments(), elsewhere.load(BEN, imported.id).attachments()):
        assert open(a.path, "rb").read() == open(b.path, "rb").read()

    store.delete(ANA, conv.id)  # same server, after deleting the original: identical again
    again = store.import_json(ANA, exported)
    assert without_ids(store.export_json(ANA, again.id)) == without_ids(exported)
    twice = store.import_json(ANA, exported)
    assert twice.id != again.id
    assert without_ids(store.export_json(ANA, twice.id)) == without_ids(exported)


def without_ids(exported: str) -> dict:
    document = json.loads(exported)
    document["conversation"]["id"] = None
    for turn in document["conversation"]["turns"]:
        turn["id"] = None
    return document


def test_export_by_reference_imports_on_the_same_server_only(store, tmp_path):
    conv = sample(store)
    store.save(ANA, conv)
    exported = store.export_json(ANA, conv.id, include_files=False)
    assert "files" not in json.loads(exported)
    copy = store.import_json(ANA, exported)  # the owner still has the files (in `conv`)
    assert without_ids(store.export_json(ANA, copy.id, include_files=False)) == without_ids(exported)
    with pytest.raises(UserFacingError, match="not included"):
        ConversationStore(tmp_path / "elsewhere").import_json(ANA, exported)


def test_import_rejects_forged_files_and_paths(store):
    conv = sample(store)
    store.save(ANA, conv)
    document = json.loads(store.export_json(ANA, conv.id))
    sha = conv.attachments()[0].sha256
    forged = json.loads(json.dumps(document))
    forged["files"][sha] = base64.b64encode(b"other content").decode()
    with pytest.raises(UserFacingError, match="checksum"):
        store.import_json(BEN, json.dumps(forged))
    sneaky = json.loads(json.dumps(document))
    sneaky["conversation"]["turns"][0]["attachments"][0]["path"] = "../../etc/passwd"
    sneaky["conversation"]["id"] = "another"
    imported = store.import_json(BEN, json.dumps(sneaky))
    assert all(a.path.startswith(str(store.media_dir)) for a in imported.attachments())
    bad_hash = json.loads(json.dumps(document))
    bad_hash["conversation"]["turns"][0]["attachments"][0]["sha256"] = "../x"
    with pytest.raises(UserFacingError):
        store.import_json(BEN, json.dumps(bad_hash))
    for junk in ("not json", "{}", json.dumps({"format": "multimodal-chatbot/conversation", "version": 1,
                                                "conversation": {"turns": [{"role": "wizard"}]}})):
        with pytest.raises(UserFacingError):
            store.import_json(BEN, junk)


def test_two_copies_on_one_database_share_conversations_and_race_safely(open_store, tmp_path):
    """Two stores (two app copies, own connections) on one database: what one writes the other reads,
    and appends racing for the same place keep exactly one reply."""
    first, second = open_store(tmp_path / "shared"), open_store(tmp_path / "shared")
    conv = Conversation()
    conv.add_user_turn(Turn(role=Role.USER, text="hi from copy one"))
    first.save(ANA, conv)
    assert [c.id for c in second.list(ANA)] == [conv.id] and second.load(ANA, conv.id) == conv
    results: list[bool] = []
    replies = [Turn(role=Role.ASSISTANT, text=f"reply from copy {n}") for n in (1, 2)]
    threads = [threading.Thread(target=lambda s=s, r=r: results.append(s.append(ANA, conv.id, 1, [r])))
               for s, r in zip((first, second), replies)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False, True]
    assert first.load(ANA, conv.id).turns[1] in replies and first.load(ANA, conv.id) == second.load(ANA, conv.id)


# -- search ----------------------------------------------------------------------------------
def chat(store: ConversationStore, owner: str, title: str, *texts: str) -> Conversation:
    """A stored conversation of `owner`: the texts alternate user, assistant."""
    conv = Conversation(title=title)
    for i, text in enumerate(texts):
        if i % 2 == 0:
            conv.add_user_turn(Turn(role=Role.USER, text=text))
        else:
            conv.add_assistant_turn(text)
    store.save(owner, conv)
    return conv


def found(store: ConversationStore, owner: str, query: str) -> list[str]:
    return [c.title for c in store.search(owner, query)]


def test_search_finds_titles_and_text_of_the_owners_conversations(store):
    hike = chat(store, ANA, "Weekend hike", "Plan a walk near Sintra", "Take the Pena trail, about 9 km.")
    chat(store, ANA, "Bread", "How is sourdough made?", "Mix flour, water and the starter.")
    voice = sample(store)  # its recording says "what is the capital of France"
    store.save(ANA, voice)
    assert found(store, ANA, "weekend") == ["Weekend hike"]  # the title
    assert found(store, ANA, "SINTRA") == ["Weekend hike"]  # the user's words, any case
    assert found(store, ANA, "pena trail") == ["Weekend hike"]  # the bot's words; every word must match
    assert found(store, ANA, "sintra trail") == ["Weekend hike"]  # words from different turns of one chat
    assert found(store, ANA, "sintra sourdough") == []
    assert found(store, ANA, "sourd") == ["Bread"]  # the last word as typed so far (a prefix)
    assert found(store, ANA, "capital france") == [voice.title]  # a recording's transcript
    memo = Conversation()
    pdf, sign = media_file(store, b"%PDF-1.4 fake memo", ".pdf"), media_file(store, b"\x89PNG\r\n\x1a\n sign", ".png")
    memo.add_user_turn(Turn(role=Role.USER, text="Summarise these", attachments=[pdf, sign], observations=[
        Observation("document", "[page 1] The code word is MARMALADE.", pdf.sha256, "pdf"),
        Observation("ocr", 'text reads: "HARBOR ROAD"', sign.sha256, "ocr"),
        Observation("facts", "900×500, mostly green", sign.sha256, "facts")]))
    store.save(ANA, memo)
    assert found(store, ANA, "marmalade") == [memo.title]  # a PDF's text
    assert found(store, ANA, "harbor road") == [memo.title]  # text read in a photo
    assert found(store, ANA, "mostly green") == []  # other notes are the app's words, not the user's
    assert found(store, ANA, "   ") == [] and found(store, ANA, "") == []
    store.append(ANA, hike.id, len(hike.turns), [Turn(role=Role.USER, text="and the bread?")])
    assert found(store, ANA, "bread") == ["Weekend hike", "Bread"]  # most recently changed first


def test_search_never_shows_another_owners_conversation(store):
    chat(store, ANA, "Ana's secret", "my bank pin is zebra-4417", "Noted.")
    chat(store, BEN, "Ben's chat", "zebra crossings")
    assert found(store, BEN, "zebra") == ["Ben's chat"]
    for query in ("4417", "bank pin", "secret", "Ana", "' OR 1=1 --", '" OR owner:*', "*"):
        assert found(store, BEN, query) == [], query
    assert found(store, ANA, "zebra") == ["Ana's secret"]
    assert found(store, "key:nobody", "zebra") == []


HOSTILE_QUERIES = ['"', '""', "'", "*", "sign*", '"sign', "NEAR(", "NEAR(sign say", "-sign", "sign -say", "+sign",
                   "sign AND", "OR", "NOT sign", "sign OR say", "(sign", "sign)", "title:sign", "^sign", "{title}: x",
                   "say & sign | !x", "sign:*", "\\", "%", "_", "a_b", "\x00", "sign\x00say", "🙂", "';DROP TABLE turns;--",
                   "(" * 500, "sign " * 200, "ü" * 5000]


@pytest.mark.parametrize("query", HOSTILE_QUERIES)
def test_hostile_search_queries_are_only_words(store, query):
    conv = chat(store, ANA, "Signs", "What does the sign say?", "It says OPEN.")
    chat(store, BEN, "Signs too", "What does the sign say?")
    assert all(c.id == conv.id for c in store.search(ANA, query))  # never an error, never Ben's
    assert store.load(ANA, conv.id) == conv


@pytest.mark.parametrize("query", ['"sign', 'sign"', "sign*", "-sign", "+sign", "(sign", "NEAR(sign say", "sign:*",
                                   "sign -say", "say & sign", "sign OR", "'sign'", "SIGN!"])
def test_search_syntax_characters_are_taken_as_separators(store, query):
    conv = chat(store, ANA, "Signs", "What does the sign say? or near", "It says OPEN.")
    assert [c.id for c in store.search(ANA, query)] == [conv.id]


def test_search_follows_every_change(store, tmp_path):
    conv = chat(store, ANA, "Trip", "Lisbon or Porto?", "Porto has the river.")
    assert found(store, ANA, "porto") == ["Trip"]
    # A continued reply replaces the last turn.
    longer = Turn(role=Role.ASSISTANT, text="Lisbon has the tram.", id=conv.turns[-1].id)
    assert store.replace_last(ANA, conv.id, len(conv.turns) - 1, longer)
    assert found(store, ANA, "river") == [] and found(store, ANA, "tram") == ["Trip"]
    # Appended turns; then undone (saved without them).
    assert store.append(ANA, conv.id, 2, [Turn(role=Role.USER, text="what about Faro?")])
    assert found(store, ANA, "faro") == ["Trip"]
    store.save(ANA, _without_last(store, conv))
    assert found(store, ANA, "faro") == []
    store.rename(ANA, conv.id, "Holiday")
    assert found(store, ANA, "holiday") == ["Holiday"] and found(store, ANA, "trip") == []
    # An imported copy is searchable for its new owner; a deleted conversation is not found any more.
    store.import_json(BEN, store.export_json(ANA, conv.id))
    assert found(store, BEN, "tram") == ["Holiday"]
    assert store.delete(ANA, conv.id)
    assert found(store, ANA, "tram") == [] and found(store, BEN, "tram") == ["Holiday"]


def _without_last(store: ConversationStore, conv: Conversation) -> Conversation:
    undone = store.load(ANA, conv.id)
    undone.turns = undone.turns[:-1]
    return undone


def test_notices_are_not_searched(store):
    conv = Conversation(title="Refused")
    conv.turns += [Turn(role=Role.USER, text="broken.jpg", notice=True),
                   Turn(role=Role.ASSISTANT, text="That file is not a photo.", notice=True)]
    store.save(ANA, conv)
    assert found(store, ANA, "photo") == [] and found(store, ANA, "refused") == ["Refused"]
