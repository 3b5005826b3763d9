"""Durable conversations: an SQLite database (WAL) in the data directory, or a
PostgreSQL database that several app copies share.

Every conversation belongs to one owner (an opaque string the session layer
derives from a browser key, an API key or a signed-in user name); every read
and write names the owner, so one owner can never load, change or delete
another's conversation. Attachment files live in `<data_dir>/media`, named by
their SHA-256; the database keeps their paths relative to the data directory
so the directory can be moved. The SQL is shared; what differs between the two
databases lives in the two dialect classes at the end (`_SQLite`, `_Postgres`).

Export writes one JSON document holding the conversation and (optionally) the
attachment bytes; import checks every file against its hash before keeping it.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from chatbot import media
from chatbot.errors import UserFacingError
from chatbot.state import (
    Attachment,
    AttachmentKind,
    Conversation,
    Observation,
    ObservationKind,
    Role,
    Turn,
)

SCHEMA_VERSION = 3
EXPORT_FORMAT = "multimodal-chatbot/conversation"
EXPORT_VERSION = 2  # the document's own version (schema version 3 added only the search index)
EXPORT_VERSIONS = (1, 2)  # version 1 exports lack `cut` (which defaults to false)
# Steps from each older schema version to the next; SEARCH_INDEX stands for the dialect's search index.
SEARCH_INDEX = "search index"
_MIGRATIONS = {1: ["ALTER TABLE turns ADD COLUMN cut INTEGER NOT NULL DEFAULT 0"], 2: [SEARCH_INDEX]}
MAX_SEARCH_WORDS = 16

_SCHEMA = """
CREATE TABLE conversations (
    id            TEXT PRIMARY KEY,
    owner         TEXT NOT NULL,
    title         TEXT NOT NULL,
    system_prompt TEXT NOT NULL,
    created       REAL NOT NULL,
    updated       REAL NOT NULL
);
CREATE INDEX conversations_by_owner ON conversations (owner, updated DESC);
CREATE TABLE turns (
    key             INTEGER PRIMARY KEY,
    conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    position        INTEGER NOT NULL,
    id              TEXT NOT NULL,
    role            TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
    text            TEXT NOT NULL,
    created         REAL NOT NULL,
    interrupted     INTEGER NOT NULL DEFAULT 0,
    notice          INTEGER NOT NULL DEFAULT 0,
    cut             INTEGER NOT NULL DEFAULT 0,
    UNIQUE (conversation_id, position)
);
CREATE TABLE attachments (
    turn_key INTEGER NOT NULL REFERENCES turns (key) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    kind     TEXT NOT NULL,
    path     TEXT NOT NULL,
    sha256   TEXT NOT NULL,
    name     TEXT NOT NULL,
    label    TEXT NOT NULL,
    PRIMARY KEY (turn_key, position)
);
CREATE INDEX attachments_by_sha ON attachments (sha256);
CREATE TABLE observations (
    turn_key   INTEGER NOT NULL REFERENCES turns (key) ON DELETE CASCADE,
    position   INTEGER NOT NULL,
    kind       TEXT NOT NULL,
    text       TEXT NOT NULL,
    attachment TEXT NOT NULL,
    source     TEXT NOT NULL,
    PRIMARY KEY (turn_key, position)
);
"""

# Bounds of an imported conversation: generous for anything this app writes, small enough that a
# hostile document cannot fill the disk or the model's context with one field.
MAX_TITLE = 200
MAX_TEXT = 100_000
MAX_SYSTEM_PROMPT = 20_000
MAX_TURNS = 5_000
MAX_ATTACHMENTS_PER_TURN = 50
MAX_OBSERVATIONS_PER_TURN = 200
MAX_NAME = 255
MAX_IMPORT_FILE_BYTES = 50 * 2**20
# An unreferenced media file younger than this may belong to a turn being saved right now.
MEDIA_GRACE_SECONDS = 120.0


class ConversationChanged(UserFacingError):
    """The stored conversation moved on (another tab or client) since this copy was read."""

    def __init__(self) -> None:
        super().__init__("This conversation was changed in another tab or window meanwhile; "
                         "open it again to see the latest version.")


class ConversationNotFound(UserFacingError):
    """No conversation with that id belongs to this owner (whether or not someone else has one)."""

    def __init__(self) -> None:
        super().__init__("That conversation does not exist (it may have been deleted).")


@dataclass(frozen=True)
class ConversationSummary:
    """One line of an owner's conversation list."""

    id: str
    title: str
    created: float
    updated: float
    turns: int


class ConversationStore:
    """Thread-safe: one connection, used under a lock (every operation is a short transaction)."""

    def __init__(self, data_dir: Path, database: str | None = None,
                 media_grace_seconds: float = MEDIA_GRACE_SECONDS):
        """`database`: a postgresql:// URL, or None for SQLite in the data directory.

        Attachment files are always kept in `<data_dir>/media`: app copies that share
        a PostgreSQL database must share that directory too.
        """
        self.data_dir = Path(data_dir).resolve()
        self.media_dir = self.data_dir / "media"
        self.media_grace_seconds = media_grace_seconds
        # Private to this user whatever the umask: conversations, photos and recordings are personal.
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o700)
        self._lock = threading.RLock()
        self._db = _Postgres(database) if database else _SQLite(self.data_dir / "conversations.sqlite3")
        self.path = self._db.where
        with self._transaction():
            version = self._db.schema_version()
            if version == 0:
                self._db.execute_ddl(_SCHEMA)
                self._db.create_search_index()
                self._db.set_schema_version(SCHEMA_VERSION)
            while version in _MIGRATIONS:
                for step in _MIGRATIONS[version]:
                    self._db.create_search_index() if step == SEARCH_INDEX else self._db.execute_ddl(step)
                version += 1
                self._db.set_schema_version(version)
            if version not in (0, SCHEMA_VERSION):
                raise UserFacingError(f"{self.path} has schema version {version}; this app reads version "
                                      f"{SCHEMA_VERSION}. Use a matching app version or another "
                                      "--data-dir / --database.")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- conversations ---------------------------------------------------------------
    def save(self, owner: str, conv: Conversation) -> None:
        """Write the whole conversation in one transaction (replacing what was stored).

        `conv` may drop turns from the end (undo, edit, regenerate) or add turns, but
        a stored turn it does not know of at a position it keeps means someone else
        saved meanwhile: that raises ConversationChanged instead of overwriting it.
        """
        now = time.time()
        with self._transaction():
            stored = [r["id"] for r in self._db.execute(
                "SELECT t.id FROM turns t JOIN conversations c ON c.id = t.conversation_id"
                " WHERE c.id = ? AND c.owner = ? ORDER BY t.position", (conv.id, owner))]
            if any(old != turn.id for old, turn in zip(stored, conv.turns)):
                raise ConversationChanged()
            dropped = self._shas(conv.id)
            cursor = self._db.execute(
                "INSERT INTO conversations (id, owner, title, system_prompt, created, updated)"
                " VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (id) DO UPDATE SET title = excluded.title, system_prompt = excluded.system_prompt,"
                " updated = excluded.updated WHERE conversations.owner = excluded.owner",
                (conv.id, owner, conv.title, conv.system_prompt, conv.created, now))
            if cursor.rowcount == 0:  # the id exists but is someone else's
                raise ConversationNotFound()
            self._db.execute("DELETE FROM turns WHERE conversation_id = ?", (conv.id,))
            for position, turn in enumerate(conv.turns):
                self._insert_turn(conv.id, position, turn)
            self._db.index_conversation(conv.id)
        self._collect(dropped)

    def append(self, owner: str, conv_id: str, position: int, turns: list[Turn]) -> bool:
        """Add `turns` at `position` if the stored conversation still ends there.

        False (nothing written) when it was changed or deleted meanwhile: a reply
        that finishes after its question was undone or edited must not come back.
        """
        with self._transaction():
            row = self._db.execute(
                "SELECT (SELECT count(*) FROM turns WHERE conversation_id = c.id) AS turns"
                " FROM conversations c WHERE c.id = ? AND c.owner = ?", (conv_id, owner)).fetchone()
            if row is None or row["turns"] != position:
                return False
            for offset, turn in enumerate(turns):
                self._insert_turn(conv_id, position + offset, turn)
            self._db.execute("UPDATE conversations SET updated = ? WHERE id = ?", (time.time(), conv_id))
            self._db.index_conversation(conv_id)
            return True

    def replace_last(self, owner: str, conv_id: str, position: int, turn: Turn) -> bool:
        """Put `turn` (a continued reply) in place of the stored last turn if that is still `turn.id` at `position`.

        False (nothing written) when the conversation changed meanwhile, as for `append`.
        """
        with self._transaction():
            row = self._db.execute(
                "SELECT t.id FROM turns t JOIN conversations c ON c.id = t.conversation_id"
                " WHERE c.id = ? AND c.owner = ? AND t.position = ?"
                " AND t.position = (SELECT max(position) FROM turns WHERE conversation_id = c.id)",
                (conv_id, owner, position)).fetchone()
            if row is None or row["id"] != turn.id:
                return False
            self._db.execute("DELETE FROM turns WHERE conversation_id = ? AND position = ?", (conv_id, position))
            self._insert_turn(conv_id, position, turn)
            self._db.execute("UPDATE conversations SET updated = ? WHERE id = ?", (time.time(), conv_id))
            self._db.index_conversation(conv_id)
            return True

    def load(self, owner: str, conv_id: str) -> Conversation:
        with self._lock:
            row = self._db.execute("SELECT * FROM conversations WHERE id = ? AND owner = ?",
                                   (conv_id, owner)).fetchone()
            if row is None:
                raise ConversationNotFound()
            turns = self._db.execute("SELECT * FROM turns WHERE conversation_id = ? ORDER BY position",
                                     (conv_id,)).fetchall()
            keys = [t["key"] for t in turns]
            attachments = self._children("attachments", keys)
            observations = self._children("observations", keys)
        return Conversation(
            id=row["id"], title=row["title"], system_prompt=row["system_prompt"], created=row["created"],
            turns=[Turn(role=Role(t["role"]), text=t["text"], id=t["id"], created=t["created"],
                        interrupted=bool(t["interrupted"]), notice=bool(t["notice"]), cut=bool(t["cut"]),
                        attachments=[Attachment(kind=a["kind"], path=str(self.data_dir / a["path"]),
                                                sha256=a["sha256"], name=a["name"], label=a["label"])
                                     for a in attachments.get(t["key"], [])],
                        observations=[Observation(kind=o["kind"], text=o["text"], attachment=o["attachment"],
                                                  source=o["source"]) for o in observations.get(t["key"], [])])
                   for t in turns])

    def list(self, owner: str) -> list[ConversationSummary]:
        """The owner's conversations, most recently changed first."""
        return self._summaries(owner)

    def search(self, owner: str, query: str, limit: int = 50) -> list[ConversationSummary]:
        """The owner's conversations whose title or text (typed, a transcript, a PDF's text, text in a photo) has
        every word of `query`, the last word also as a prefix (search as you type); most recent first.

        The query is words only: punctuation and search-syntax characters separate words and are
        never passed on as syntax, so no query can fail or reach another owner's conversations.
        """
        words = search_words(query)
        if not words:
            return []
        condition, params = self._db.search_condition(words)
        return self._summaries(owner, f" AND {condition}", params, limit)

    def _summaries(self, owner: str, condition: str = "", params: tuple = (),
                   limit: int | None = None) -> list[ConversationSummary]:
        """The owner's conversations meeting `condition` (SQL on `c`), most recently changed first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT c.id, c.title, c.created, c.updated,"
                " (SELECT count(*) FROM turns t WHERE t.conversation_id = c.id) AS turns"
                f" FROM conversations c WHERE c.owner = ?{condition} ORDER BY c.updated DESC, c.created DESC"
                + (" LIMIT ?" if limit is not None else ""),
                (owner, *params, *([int(limit)] if limit is not None else []))).fetchall()
        return [ConversationSummary(r["id"], r["title"], r["created"], r["updated"], r["turns"]) for r in rows]

    def rename(self, owner: str, conv_id: str, title: str) -> None:
        with self._transaction():
            cursor = self._db.execute("UPDATE conversations SET title = ?, updated = ? WHERE id = ? AND owner = ?",
                                      (title, time.time(), conv_id, owner))
            if cursor.rowcount == 0:
                raise ConversationNotFound()
            self._db.index_conversation(conv_id)

    def delete(self, owner: str, conv_id: str) -> bool:
        """Delete the conversation with its turns; False if the owner has no such conversation.

        Its attachment files go too, unless another turn (of any owner) sent the same file.
        """
        with self._transaction():
            dropped = self._shas(conv_id, owner)
            cursor = self._db.execute("DELETE FROM conversations WHERE id = ? AND owner = ?", (conv_id, owner))
            self._db.index_conversation(conv_id)
        self._collect(dropped)
        return cursor.rowcount > 0

    def collect_garbage(self) -> int:
        """Remove every media file no turn refers to (at start-up); returns how many went.

        With a shared PostgreSQL database, every copy's turns count: a file stays while any refers to it.
        """
        with self._lock:
            return self._collect({p.name.split(".")[0] for p in self.media_dir.glob("??/*")})

    def close_unanswered(self) -> int:
        """Mark user turns left without a reply (the server died mid-reply) as answered by an interrupted,
        empty reply. Call at start-up, before any reply runs; returns how many were closed."""
        with self._transaction():
            rows = self._db.execute(
                "SELECT t.conversation_id, t.position FROM turns t"
                " WHERE t.role = 'user' AND t.notice = 0 AND t.position ="
                " (SELECT max(position) FROM turns WHERE conversation_id = t.conversation_id)").fetchall()
            for row in rows:
                self._insert_turn(row["conversation_id"], row["position"] + 1,
                                  Turn(role=Role.ASSISTANT, text="", interrupted=True))
            return len(rows)

    # -- export / import ---------------------------------------------------------------
    def export_json(self, owner: str, conv_id: str, include_files: bool = True) -> str:
        """The conversation as a JSON document; attachments by content hash, with their bytes if asked."""
        data = self.load(owner, conv_id).to_dict()
        files: dict[str, str] = {}
        for turn in data["turns"]:
            for attachment in turn["attachments"]:
                path = Path(attachment["path"])
                attachment["path"] = self._relative(path)
                if include_files:
                    files[attachment["sha256"]] = base64.b64encode(path.read_bytes()).decode("ascii")
        document = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "conversation": data}
        if include_files:
            document["files"] = files
        return json.dumps(document, ensure_ascii=False, indent=1, sort_keys=True)

    def import_json(self, owner: str, text: str) -> Conversation:
        """Store an exported conversation for `owner` under fresh ids and return it.

        Everything is checked before anything is written: the document's shape,
        types and sizes; every attached file must be a photo, recording or PDF (by its
        content) matching its SHA-256. A file sent by reference (hash only) must be
        one this owner already has. A failure raises UserFacingError and stores nothing.
        """
        conv, files = _parse_export(text)
        contents: dict[str, tuple[media.MediaFormat, bytes | Path]] = {}
        for attachment in conv.attachments(None):
            if attachment.sha256 not in contents:
                contents[attachment.sha256] = self._import_content(owner, attachment, files.get(attachment.sha256))
        written: set[str] = set()
        try:
            for attachment in conv.attachments(None):
                fmt, content = contents[attachment.sha256]
                attachment.kind = fmt.kind  # what the content is, not what the document claims
                if isinstance(content, Path):  # by reference: the owner's own copy
                    attachment.path = str(content)
                    continue
                target = media.media_path(self.media_dir, attachment.sha256, fmt)
                if not target.exists():
                    media.write_bytes(target, content)
                    written.add(attachment.sha256)
                attachment.path = str(target)
            self.save(owner, conv)
        except BaseException:
            self._collect(written, grace=0)  # nothing half-written stays behind
            raise
        return conv

    def keep_media(self, content: bytes) -> tuple[Path, str]:
        """Store a file the app made (e.g. a spoken reply) in the media folder; its path and SHA-256."""
        fmt = media.sniff_bytes(content)
        if fmt is None:
            raise ValueError("only photos and recordings are kept as media")
        sha = media.sha256_bytes(content)
        target = media.media_path(self.media_dir, sha, fmt)
        if not target.exists():
            media.write_bytes(target, content)
        return target, sha

    def _import_content(self, owner: str, attachment: Attachment,
                        encoded: str | None) -> tuple[media.MediaFormat, bytes | Path]:
        """The detected format and the bytes (or the owner's existing file) of an imported attachment."""
        name = attachment.name
        if encoded is None:
            existing = self._owned_file(owner, attachment.sha256)
            if existing is None:
                raise UserFacingError(f"The attachment '{name}' is not included in the file; "
                                      "export the conversation again with its files.")
            content: bytes | Path = existing
            fmt = media.sniff(existing)
        else:
            if len(encoded) > MAX_IMPORT_FILE_BYTES * 4 // 3 + 4:
                raise UserFacingError(f"The attachment '{name}' is larger than "
                                      f"{MAX_IMPORT_FILE_BYTES // 2**20} MB.")
            try:
                content = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                raise UserFacingError(f"The attachment '{name}' is not valid base64.") from None
            if media.sha256_bytes(content) != attachment.sha256:
                raise UserFacingError(f"The attachment '{name}' does not match its checksum.")
            fmt = media.sniff_bytes(content)
        if fmt is None:
            raise UserFacingError(f"The attachment '{name}' is not an image, recording or PDF this app accepts.")
        return fmt, content

    def _owned_file(self, owner: str, sha: str) -> Path | None:
        """The media file with this hash, if one of `owner`'s own turns already holds it."""
        with self._lock:
            row = self._db.execute(
                "SELECT a.path FROM attachments a JOIN turns t ON t.key = a.turn_key"
                " JOIN conversations c ON c.id = t.conversation_id"
                " WHERE c.owner = ? AND a.sha256 = ? LIMIT 1", (owner, sha)).fetchone()
        if row is None:
            return None
        path = self.data_dir / row["path"]
        return path if path.is_file() else None

    # -- internals ---------------------------------------------------------------------
    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """BEGIN (one writer at a time) ... COMMIT under the store's lock; rolled back on any error."""
        with self._lock:
            self._db.begin()
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _shas(self, conv_id: str, owner: str | None = None) -> set[str]:
        """The hashes of a conversation's attachments (candidates for removal when it changes)."""
        sql = ("SELECT a.sha256 FROM attachments a JOIN turns t ON t.key = a.turn_key"
               " JOIN conversations c ON c.id = t.conversation_id WHERE c.id = ?")
        if owner is None:
            return {r[0] for r in self._db.execute(sql, (conv_id,))}
        return {r[0] for r in self._db.execute(sql + " AND c.owner = ?", (conv_id, owner))}

    def _collect(self, shas: set[str], grace: float | None = None) -> int:
        """Remove the media files of `shas` that no turn refers to any more.

        Files younger than the grace period stay: an upload is copied into the media
        folder a moment before its turn is saved, and must not vanish in between.
        """
        grace = self.media_grace_seconds if grace is None else grace
        removed = 0
        with self._lock:
            for sha in shas:
                if not media.SHA256_PATTERN.fullmatch(sha) or self._db.execute(
                        "SELECT 1 FROM attachments WHERE sha256 = ? LIMIT 1", (sha,)).fetchone():
                    continue
                for path in (self.media_dir / sha[:2]).glob(f"{sha}.*"):
                    try:
                        if time.time() - path.stat().st_mtime >= grace:
                            path.unlink()
                            removed += 1
                    except FileNotFoundError:
                        pass
        return removed

    def _relative(self, path: Path) -> str:
        """Attachment paths are kept relative to the data directory (which may move)."""
        try:
            return Path(path).resolve().relative_to(self.data_dir).as_posix()
        except ValueError:
            return str(path)

    def _insert_turn(self, conv_id: str, position: int, turn: Turn) -> None:
        key = self._db.execute(
            "INSERT INTO turns (conversation_id, position, id, role, text, created, interrupted, notice, cut)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING key",
            (conv_id, position, turn.id, turn.role.value, turn.text, turn.created, int(turn.interrupted),
             int(turn.notice), int(turn.cut))).fetchone()[0]
        self._db.executemany(
            "INSERT INTO attachments (turn_key, position, kind, path, sha256, name, label) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(key, i, a.kind.value, self._relative(Path(a.path)), a.sha256, a.name, a.label)
             for i, a in enumerate(turn.attachments)])
        self._db.executemany(
            "INSERT INTO observations (turn_key, position, kind, text, attachment, source) VALUES (?, ?, ?, ?, ?, ?)",
            [(key, i, o.kind.value, o.text, o.attachment, o.source) for i, o in enumerate(turn.observations)])

    def _children(self, table: str, keys: list[int]) -> dict[int, list]:
        found: dict[int, list] = {}
        for start in range(0, len(keys), 500):  # stay under SQLite's bound-parameter limit
            chunk = keys[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for row in self._db.execute(f"SELECT * FROM {table} WHERE turn_key IN ({marks}) ORDER BY turn_key, position",
                                        chunk):
                found.setdefault(row["turn_key"], []).append(row)
        return found


# -- checking an imported document ---------------------------------------------------------
class _Invalid(Exception):
    """Where an imported document breaks the schema (shown to the user in the refusal)."""


def _parse_export(text: str) -> tuple[Conversation, dict[str, str]]:
    """A conversation with fresh ids and the document's file table, or UserFacingError.

    Built field by field from checked values, never by passing the document's
    dictionaries on: unknown keys are ignored, wrong types and sizes refused.
    """
    try:
        document = json.loads(text)
    except RecursionError:
        raise UserFacingError("That file is nested too deeply to be an exported conversation.") from None
    except (ValueError, TypeError) as error:
        raise UserFacingError(f"That file is not a conversation exported from this app ({error}).") from None
    try:
        document = _dict(document, "the file")
        if document.get("format") != EXPORT_FORMAT or document.get("version") not in EXPORT_VERSIONS:
            raise _Invalid("it is not an exported conversation of this app's version")
        data = _dict(document.get("conversation"), "conversation")
        files = _dict(document.get("files", {}) or {}, "files")
        for sha, encoded in files.items():
            if not media.SHA256_PATTERN.fullmatch(sha) or not isinstance(encoded, str):
                raise _Invalid("files must map SHA-256 hashes to base64 text")
        conv = Conversation(title=_text(data.get("title", ""), "title", MAX_TITLE),
                            system_prompt=_text(data.get("system_prompt", ""), "system_prompt", MAX_SYSTEM_PROMPT),
                            created=_time(data.get("created", time.time()), "created"))
        turns = _list(data.get("turns", []), "turns", MAX_TURNS)
        conv.turns = [_turn(_dict(t, f"turn {i + 1}"), f"turn {i + 1}") for i, t in enumerate(turns)]
    except _Invalid as error:
        raise UserFacingError(f"That file is not a valid exported conversation: {error}.") from None
    return conv, files


def _turn(data: dict, where: str) -> Turn:
    try:
        role = Role(data.get("role"))
    except ValueError:
        raise _Invalid(f"{where} has an unknown role") from None
    attachments = [_attachment(_dict(a, f"{where}, attachment"), where)
                   for a in _list(data.get("attachments", []), f"{where} attachments", MAX_ATTACHMENTS_PER_TURN)]
    observations = [_observation(_dict(o, f"{where}, observation"), where)
                    for o in _list(data.get("observations", []), f"{where} observations", MAX_OBSERVATIONS_PER_TURN)]
    return Turn(role=role, text=_text(data.get("text", ""), f"{where} text", MAX_TEXT),
                attachments=attachments, observations=observations,
                created=_time(data.get("created", time.time()), f"{where} created"),
                interrupted=_flag(data.get("interrupted", False), f"{where} interrupted"),
                notice=_flag(data.get("notice", False), f"{where} notice"),
                cut=_flag(data.get("cut", False), f"{where} cut"))


def _attachment(data: dict, where: str) -> Attachment:
    sha = data.get("sha256")
    if not isinstance(sha, str) or not media.SHA256_PATTERN.fullmatch(sha):
        raise _Invalid(f"{where} has an attachment without a valid SHA-256")
    try:
        kind = AttachmentKind(data.get("kind"))
    except ValueError:
        raise _Invalid(f"{where} has an attachment of an unknown kind") from None
    # The path is the exporting server's; the local one is derived from the hash and content.
    return Attachment(kind=kind, path="", sha256=sha, name=_text(data.get("name", ""), f"{where} file name", MAX_NAME),
                      label=_text(data.get("label", ""), f"{where} label", MAX_NAME))


def _observation(data: dict, where: str) -> Observation:
    try:
        kind = ObservationKind(data.get("kind"))
    except ValueError:
        raise _Invalid(f"{where} has an observation of an unknown kind") from None
    attachment = _text(data.get("attachment", ""), f"{where} observation", 64)
    if attachment and not media.SHA256_PATTERN.fullmatch(attachment):
        raise _Invalid(f"{where} has an observation of an unknown attachment")
    return Observation(kind=kind, text=_text(data.get("text", ""), f"{where} observation", MAX_TEXT),
                       attachment=attachment, source=_text(data.get("source", ""), f"{where} source", MAX_NAME))


def _dict(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise _Invalid(f"{where} must be an object")
    return value


def _list(value, where: str, limit: int) -> list:
    if not isinstance(value, list):
        raise _Invalid(f"{where} must be a list")
    if len(value) > limit:
        raise _Invalid(f"{where} has more than {limit} entries")
    return value


def _text(value, where: str, limit: int) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"{where} must be text")
    if len(value) > limit:
        raise _Invalid(f"{where} is longer than {limit} characters")
    if "\x00" in value or not value.isprintable() and _unencodable(value):
        raise _Invalid(f"{where} contains characters that are not text")
    return value


def _unencodable(value: str) -> bool:
    try:
        value.encode("utf-8")  # JSON can carry lone surrogates; the databases (UTF-8) cannot store them
    except UnicodeEncodeError:
        return True
    return False


def _time(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise _Invalid(f"{where} must be a time (seconds since 1970)")
    return float(value)


def _flag(value, where: str) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"{where} must be true or false")
    return value


# -- search --------------------------------------------------------------------------------------
def search_words(query: str) -> list[str]:
    """The words of a search query, lower-cased: runs of letters and digits (as both databases split text)."""
    return [w.lower() for w in re.findall(r"[^\W_]+", query or "")][:MAX_SEARCH_WORDS]


# Notes that hold words the user sent: a recording's transcript, a PDF's text, text read in a photo.
_SEARCHED_NOTES = "kind IN ('transcript', 'document', 'ocr')"
# The searchable text of a conversation (SQLite's index holds one row per conversation): its turns'
# words and those notes; notices (refusals shown in the chat) are not the dialogue.
_SEARCH_BODY = (
    "(SELECT group_concat(words, char(10)) FROM ("
    " SELECT t.text AS words FROM turns t WHERE t.conversation_id = c.id AND t.notice = 0"
    " UNION ALL SELECT o.text FROM observations o JOIN turns t ON t.key = o.turn_key"
    f" WHERE t.conversation_id = c.id AND t.notice = 0 AND o.{_SEARCHED_NOTES}))")


# -- the two databases: everything that differs between their SQL is here -----------------------
class _SQLite:
    """A file in the data directory, in WAL mode: one server process (or a few on one machine)."""

    def __init__(self, path: Path):
        self.where = path
        path.touch(mode=0o600)  # SQLite gives its -wal and -shm files the database's mode
        os.chmod(path, 0o600)
        # isolation_level=None: we open transactions ourselves, so each save is one atomic commit.
        self.conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA journal_mode = WAL")
        # FULL: a commit is on disk before save() returns (NORMAL could lose it on power loss).
        self.conn.execute("PRAGMA synchronous = FULL")
        self.conn.execute("PRAGMA foreign_keys = ON")
        self.conn.execute("PRAGMA busy_timeout = 5000")

    def execute(self, sql: str, params=()):
        return self.conn.execute(sql, params)

    def executemany(self, sql: str, rows) -> None:
        self.conn.executemany(sql, rows)

    def begin(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")  # takes the write lock now: no deadlock on upgrade

    def schema_version(self) -> int:
        return self.conn.execute("PRAGMA user_version").fetchone()[0]

    def set_schema_version(self, version: int) -> None:
        self.conn.execute(f"PRAGMA user_version = {int(version)}")

    def execute_ddl(self, script: str) -> None:
        # Statement by statement: executescript() would commit the open transaction.
        for statement in filter(str.strip, script.split(";")):
            self.conn.execute(statement)

    def create_search_index(self) -> None:
        """An FTS5 table with one row per conversation (title, body), filled from what is stored."""
        self.conn.execute("CREATE VIRTUAL TABLE conversation_search USING fts5(conversation_id UNINDEXED, title, body)")
        self._fill_search_index()

    def index_conversation(self, conv_id: str) -> None:
        """Bring the conversation's search row up to date (none once it is deleted); inside the write."""
        self.conn.execute("DELETE FROM conversation_search WHERE conversation_id = ?", (conv_id,))
        self._fill_search_index(" WHERE c.id = ?", (conv_id,))

    def _fill_search_index(self, where: str = "", params: tuple = ()) -> None:
        self.conn.execute("INSERT INTO conversation_search (conversation_id, title, body)"
                          f" SELECT c.id, c.title, coalesce({_SEARCH_BODY}, '') FROM conversations c{where}", params)

    def search_condition(self, words: list[str]) -> tuple[str, tuple]:
        # Each word quoted as an FTS5 string (words hold no quotes), the last one also as a prefix.
        match = " ".join([*(f'"{w}"' for w in words[:-1]), f'"{words[-1]}"*'])
        return ("c.id IN (SELECT conversation_id FROM conversation_search WHERE conversation_search MATCH ?)",
                (match,))

    def close(self) -> None:
        self.conn.close()


class _Postgres:
    """A PostgreSQL database shared by any number of app copies (psycopg 3).

    The shared SQL is written for SQLite (`?` placeholders); it is portable apart
    from the placeholder and a few column types, translated here. Write
    transactions take one advisory lock, so writers queue exactly as SQLite's do
    and the check-then-write of `save`, `append` and `replace_last` stays atomic
    across processes.
    """

    _WRITER_LOCK = 0x636861  # any constant; one per database

    def __init__(self, url: str):
        import psycopg  # only needed for --database postgresql://…

        self.where = _redacted(url)
        try:
            self.conn = psycopg.connect(url, autocommit=True, row_factory=_row_factory)
        except psycopg.Error as error:
            raise UserFacingError(f"Cannot connect to the database {self.where}: {error}".strip()) from error

    def execute(self, sql: str, params=()):
        return self.conn.execute(sql.replace("?", "%s"), params)

    def executemany(self, sql: str, rows) -> None:
        rows = list(rows)
        if rows:
            self.conn.cursor().executemany(sql.replace("?", "%s"), rows)

    def begin(self) -> None:
        self.conn.execute("BEGIN")
        self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (self._WRITER_LOCK,))

    def schema_version(self) -> int:
        self.conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = self.conn.execute("SELECT max(version) FROM schema_version").fetchone()
        return row[0] or 0

    def set_schema_version(self, version: int) -> None:
        self.conn.execute("DELETE FROM schema_version")
        self.conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))

    def execute_ddl(self, script: str) -> None:
        script = (script.replace("INTEGER PRIMARY KEY", "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY")
                  .replace("INTEGER NOT NULL REFERENCES", "BIGINT NOT NULL REFERENCES")
                  .replace(" REAL ", " DOUBLE PRECISION "))
        for statement in filter(str.strip, script.split(";")):
            self.conn.execute(statement)

    def create_search_index(self) -> None:
        """Full-text indexes PostgreSQL keeps up to date itself (GIN over `to_tsvector('simple', …)`)."""
        for table, column, where in (("conversations", "title", ""), ("turns", "text", ""),
                                     ("observations", "text", f" WHERE {_SEARCHED_NOTES}")):
            self.conn.execute(f"CREATE INDEX {table}_search ON {table} USING gin (to_tsvector('simple', {column})){where}")

    def index_conversation(self, conv_id: str) -> None:
        """Nothing to do: the indexes follow the tables."""

    def search_condition(self, words: list[str]) -> tuple[str, tuple]:
        # Every word somewhere in the conversation: its title, a turn, or a searched note (see _SEARCHED_NOTES).
        # Each word is one quoted lexeme of a tsquery; the last also matches as a prefix.
        per_word = ("(to_tsvector('simple', c.title) @@ to_tsquery('simple', ?)"
                    " OR EXISTS (SELECT 1 FROM turns t WHERE t.conversation_id = c.id AND t.notice = 0"
                    " AND to_tsvector('simple', t.text) @@ to_tsquery('simple', ?))"
                    " OR EXISTS (SELECT 1 FROM observations o JOIN turns t ON t.key = o.turn_key"
                    f" WHERE t.conversation_id = c.id AND t.notice = 0 AND o.{_SEARCHED_NOTES}"
                    " AND to_tsvector('simple', o.text) @@ to_tsquery('simple', ?)))")
        queries = [f"'{w}'" for w in words[:-1]] + [f"'{words[-1]}':*"]
        return " AND ".join([per_word] * len(queries)), tuple(q for q in queries for _ in range(3))

    def close(self) -> None:
        self.conn.close()


class _Row(tuple):
    """A row readable by position and by column name, like sqlite3.Row."""

    names: dict[str, int]

    def __getitem__(self, key):
        return super().__getitem__(self.names[key] if isinstance(key, str) else key)


def _row_factory(cursor):
    names = {column.name: i for i, column in enumerate(cursor.description or ())}
    row_type = type("Row", (_Row,), {"names": names})
    return lambda values: row_type(values)


def _redacted(url: str) -> str:
    """The URL without its password, for messages and logs."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)
