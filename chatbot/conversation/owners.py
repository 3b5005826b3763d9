"""Who is chatting: owners of conversations, their keys, and a tab's place in them.

Every conversation belongs to one owner. A signed-in user (--auth) is an owner on
any browser; otherwise a browser keeps a random key in its local storage, and an
API client is its Gradio session (or a key it chose). Only hashes of keys are stored.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from pathlib import Path

from chatbot import media
from chatbot.errors import UserFacingError

MIN_KEY_LENGTH = 16


def new_owner_key() -> str:
    """A secret that identifies one browser (kept in its local storage) or one API user."""
    return secrets.token_urlsafe(32)


def resolve_owner(*, user: str | None = None, key: str | None = None, session_hash: str | None = None) -> str:
    """The owner of the conversations a request may see.

    A signed-in user (--auth) owns their conversations on every browser. Otherwise
    an owner key does (browsers keep a random one in local storage; API clients may
    choose one); only a hash of the key is stored. Failing both, the Gradio session:
    one API client sees only its own conversations, for as long as it lives.
    """
    if user:
        return f"user:{user}"
    if key:
        if len(key) < MIN_KEY_LENGTH:
            raise UserFacingError(f"An owner key must be at least {MIN_KEY_LENGTH} characters long.")
        return "key:" + hashlib.sha256(key.encode()).hexdigest()
    if session_hash:
        return f"session:{session_hash}"
    raise UserFacingError("This request has no session; reload the page.")


def persistent_secret(path: Path) -> str:
    """A random secret created once and kept in `path` (readable by this user only)."""
    path = Path(path)
    if not path.exists():
        try:  # exclusive: when two starts race, the first secret written is the one both use
            media.write_bytes(path, secrets.token_urlsafe(32).encode(), exclusive=True)
        except FileExistsError:
            pass
    return path.read_text().strip()


@dataclass
class ChatSession:
    """One browser tab's or API client's place: whose conversations, and which one is open.

    It holds no conversation data (that is loaded from the store for every request),
    so a session costs a few bytes and nothing is lost when it ends.
    """

    owner: str = ""
    conversation_id: str | None = None
    title: str = ""  # a name given to a new chat before its first message (stored with that message)
