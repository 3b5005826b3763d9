"""Durable conversations: an SQLite database (WAL) in the data directory.

Every conversation belongs to one owner (an opaque string the session layer
derives from a browser key, an API key or a signed-in user name); every read
and write names the owner, so one owner can never load, change or delete
another's conversation. Attachment files live in `<data_dir>/media`, named by
their SHA-256; the database keeps their paths relative to the data directory
so the directory can be moved.

Export writes one JSON document holding the conversation and (optionally) the
attachment bytes; import checks every file against its hash before keeping it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from chatbot.errors import UserFacingError
from chatbot.state import Attachment, Conversation, Observation, Role, Turn, new_id

SCHEMA_VERSION = 1
EXPORT_FORMAT = "multimodal-chatbot/conversation"

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

_SHA256 = re.compile(r"[0-9a-f]{64}")
_SUFFIX = re.compile(r"\.[a-z0-9]{1,8}")


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

    def __init__(self, data_dir: Path, database: str | None = None):
        """`database`: a postgresql:// URL, or None for SQLite in the data directory.

        Attachment files are always kept in `<data_dir>/media`: app copies that share
        a PostgreSQL database must share that directory too.
        """
        self.data_dir = Path(data_dir).resolve()
        self.media_dir = self.data_dir / "media"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = _Postgres(database) if database else _SQLite(self.data_dir / "conversations.sqlite3")
        self.path = self._db.where
        with self._transaction():
            version = self._db.schema_version()
            if version == 0:
                self._db.create_schema(_SCHEMA, SCHEMA_VERSION)
            elif version != SCHEMA_VERSION:
                raise UserFacingError(f"{self.path} has schema version {version}; this app reads version "
                                      f"{SCHEMA_VERSION}. Use a matching app version or another database.")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- conversations ---------------------------------------------------------------
    def save(self, owner: str, conv: Conversation) -> None:
        """Write the whole conversation in one transaction (replacing what was stored)."""
        now = time.time()
        with self._transaction():
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
                        interrupted=bool(t["interrupted"]), notice=bool(t["notice"]),
                        attachments=[Attachment(kind=a["kind"], path=str(self.data_dir / a["path"]),
                                                sha256=a["sha256"], name=a["name"], label=a["label"])
                                     for a in attachments.get(t["key"], [])],
                        observations=[Observation(kind=o["kind"], text=o["text"], attachment=o["attachment"],
                                                  source=o["source"]) for o in observations.get(t["key"], [])])
                   for t in turns])

    def exists(self, conv_id: str) -> bool:
        """Whether any owner has a conversation with this id."""
        with self._lock:
            return self._db.execute("SELECT 1 FROM conversations WHERE id = ?", (conv_id,)).fetchone() is not None

    def list(self, owner: str) -> list[ConversationSummary]:
        """The owner's conversations, most recently changed first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT c.id, c.title, c.created, c.updated,"
                " (SELECT count(*) FROM turns t WHERE t.conversation_id = c.id) AS turns"
                " FROM conversations c WHERE c.owner = ? ORDER BY c.updated DESC, c.created DESC",
                (owner,)).fetchall()
        return [ConversationSummary(r["id"], r["title"], r["created"], r["updated"], r["turns"]) for r in rows]

    def rename(self, owner: str, conv_id: str, title: str) -> None:
        with self._transaction():
            cursor = self._db.execute("UPDATE conversations SET title = ?, updated = ? WHERE id = ? AND owner = ?",
                                      (title, time.time(), conv_id, owner))
            if cursor.rowcount == 0:
                raise ConversationNotFound()

    def delete(self, owner: str, conv_id: str) -> bool:
        """Delete the conversation with its turns; False if the owner has no such conversation.

        Attachment files stay in the media folder: they are shared by content hash
        with any other turn (of any owner) that sent the same file.
        """
        with self._transaction():
            cursor = self._db.execute("DELETE FROM conversations WHERE id = ? AND owner = ?", (conv_id, owner))
            return cursor.rowcount > 0

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
        document = {"format": EXPORT_FORMAT, "version": SCHEMA_VERSION, "conversation": data}
        if include_files:
            document["files"] = files
        return json.dumps(document, ensure_ascii=False, indent=1, sort_keys=True)

    def import_json(self, owner: str, text: str) -> Conversation:
        """Store an exported conversation for `owner` and return it.

        It keeps its id unless that id is taken (e.g. imported twice), then gets a new one.
        File bytes must match their SHA-256; a referenced file must already be in the media folder.
        """
        try:
            document = json.loads(text)
            if document.get("format") != EXPORT_FORMAT or document.get("version") != SCHEMA_VERSION:
                raise ValueError("not an exported conversation")
            data = document["conversation"]
            files = document.get("files") or {}
            conv = Conversation.from_dict(data)
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise UserFacingError(f"That file is not a conversation exported from this app ({error}).") from error
        for attachment in conv.attachments(None):
            attachment.path = str(self._import_file(attachment, files.get(attachment.sha256)))
        if self.exists(conv.id):
            conv.id = new_id()
        self.save(owner, conv)
        return conv

    def _import_file(self, attachment: Attachment, encoded: str | None) -> Path:
        """The local copy of an imported attachment; its name comes from the hash, never from the document."""
        sha = attachment.sha256
        suffix = Path(attachment.path).suffix.lower()
        if not _SHA256.fullmatch(sha) or (suffix and not _SUFFIX.fullmatch(suffix)):
            raise UserFacingError(f"The attachment '{attachment.name}' has an invalid hash or file name.")
        target = self.media_dir / sha[:2] / f"{sha}{suffix}"
        if encoded is not None:
            content = base64.b64decode(encoded, validate=True)
            if hashlib.sha256(content).hexdigest() != sha:
                raise UserFacingError(f"The attachment '{attachment.name}' does not match its checksum.")
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f"{target.name}.{new_id()}.partial")
                tmp.write_bytes(content)
                tmp.replace(target)
        elif not target.is_file():
            raise UserFacingError(f"The attachment '{attachment.name}' is not included in the file "
                                  "and not on this server; export it again with its files.")
        return target

    # -- internals ---------------------------------------------------------------------
    def _transaction(self):
        return _Transaction(self._db, self._lock)

    def _relative(self, path: Path) -> str:
        """Attachment paths are kept relative to the data directory (which may move)."""
        try:
            return Path(path).resolve().relative_to(self.data_dir).as_posix()
        except ValueError:
            return str(path)

    def _insert_turn(self, conv_id: str, position: int, turn: Turn) -> None:
        key = self._db.execute(
            "INSERT INTO turns (conversation_id, position, id, role, text, created, interrupted, notice)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING key",
            (conv_id, position, turn.id, turn.role.value, turn.text, turn.created, int(turn.interrupted),
             int(turn.notice))).fetchone()[0]
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


class _Transaction:
    """BEGIN (one writer at a time) ... COMMIT under the store's lock; rolled back on any error."""

    def __init__(self, db: _SQLite | _Postgres, lock: threading.RLock):
        self.db, self.lock = db, lock

    def __enter__(self) -> None:
        self.lock.acquire()
        try:
            self.db.begin()
        except BaseException:
            self.lock.release()
            raise

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self.lock.release()


# -- the two databases: everything that differs between their SQL is here -----------------------
class _SQLite:
    """A file in the data directory, in WAL mode: one server process (or a few on one machine)."""

    def __init__(self, path: Path):
        self.where = path
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

    def create_schema(self, schema: str, version: int) -> None:
        # Statement by statement: executescript() would commit the open transaction.
        for statement in filter(str.strip, schema.split(";")):
            self.conn.execute(statement)
        self.conn.execute(f"PRAGMA user_version = {version}")

    def close(self) -> None:
        self.conn.close()


class _Postgres:
    """A PostgreSQL database shared by any number of app copies (psycopg 3).

    The shared SQL is written for SQLite (`?` placeholders); it is portable apart
    from the placeholder and a few column types, translated here. Write
    transactions take one advisory lock, so writers queue exactly as SQLite's do
    and `append`'s check-then-insert stays atomic across processes.
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

    def create_schema(self, schema: str, version: int) -> None:
        schema = (schema.replace("INTEGER PRIMARY KEY", "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY")
                  .replace("INTEGER NOT NULL REFERENCES", "BIGINT NOT NULL REFERENCES")
                  .replace(" REAL ", " DOUBLE PRECISION "))
        for statement in filter(str.strip, schema.split(";")):
            self.conn.execute(statement)
        self.conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))

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
