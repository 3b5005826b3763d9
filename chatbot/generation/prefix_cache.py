"""Reuse of attention key/value caches across prompts that start the same way.

Each turn of a chat resends the whole conversation, but all of it except the
newest exchange was already read by the model last turn. Keeping the KV cache
of recent prompts lets the decoder read only the new tail, so the time to the
first token does not grow with the length of the history.
"""

from __future__ import annotations

import copy
import itertools
import weakref
from dataclasses import dataclass

import torch
from transformers import Cache


@dataclass(eq=False)  # entries are compared by identity; tensors have no truth value
class _Entry:
    ids: torch.Tensor  # the tokens the cache holds, 1-D
    cache: Cache
    conversation: str | None  # whose prompt it was read for, if known
    since: int  # when its window began: a cache handed over and extended keeps it, a new or copied one gets a new one


def common_prefix_length(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(len(a), len(b))
    same = a[:n] == b[:n]
    return n if bool(same.all()) else int(same.to(torch.int8).argmin())


class PrefixCache:
    """A few recent KV caches, looked up by longest shared token prefix, within a memory budget.
    Not thread-safe: the decoder uses it under its generation lock.

    The budget matters: Qwen2.5-0.5B's cache is 24 KB per token, 50 MB for a full 2,048-token window,
    and eight slots of those made up a third of the app's memory after a long chat. The decoder gives
    it room for two full windows and a system prompt (`budget_for`); windows left behind go first.
    """

    def __init__(self, slots: int = 8, min_reuse: int = 8, max_bytes: int = 112 * 2**20):
        self.slots = slots
        self.min_reuse = min_reuse  # shorter matches are not worth a copy
        self.max_bytes = max_bytes  # the newest entry is kept even if it alone is larger
        self._entries: list[_Entry] = []  # least recently used first
        self._began = itertools.count()
        self._out: weakref.WeakKeyDictionary[Cache, int] = weakref.WeakKeyDictionary()  # `since` of caches taken

    def take(self, ids: torch.Tensor, conversation: str | None = None, ahead: bool = False) -> Cache | None:
        """A private copy of the best cache for prompt `ids`, cropped to the shared prefix.

        `conversation`: whose prompt `ids` is; `ahead`: it is read ahead of a reply, not for one. A reply
        that starts from a window begun after the conversation's others (one read ahead for the moved
        window, or a new one) has moved on: the windows it left would not be used again and are dropped
        (39 MB, a third of the pool, after bench_app's 40-turn chat).
        """
        best, best_len = None, 0
        for entry in self._entries:
            length = common_prefix_length(entry.ids, ids)
            if length > best_len:
                best, best_len = entry, length
        # At least one prompt token must still go through the model to produce the next-token logits.
        keep = min(best_len, len(ids) - 1)
        if best is None or keep < self.min_reuse:
            cache, since = None, next(self._began)
        elif keep >= len(best.ids) // 2:
            # The same conversation, a turn later: the entry is handed over, not copied (a copy of a full
            # window is 50 MB more at every turn), and comes back extended through `put`.
            self._entries.remove(best)
            cache, since = best.cache, best.since
            cache.crop(keep - cache.get_seq_length())
        else:
            # Another conversation sharing a beginning (the system prompt): the stored entry stays valid.
            cache, since = _copy_prefix(best.cache, keep), next(self._began)
        if conversation is not None and not ahead:
            self._entries = [e for e in self._entries if e.conversation != conversation or e.since > since]
        if cache is not None:
            self._out[cache] = since
        return cache

    def put(self, ids: torch.Tensor, cache: Cache, conversation: str | None = None) -> None:
        """Remember that `cache` (from `take`, or new) holds the keys/values of `ids`, read for `conversation`."""
        ids = ids[: cache.get_seq_length()].clone()
        # An entry this one extends is superseded (the same conversation, one turn later).
        self._entries = [e for e in self._entries if common_prefix_length(e.ids, ids) < len(e.ids)]
        since = self._out.pop(cache, None)
        self._entries.append(_Entry(ids, cache, conversation, next(self._began) if since is None else since))
        del self._entries[: -self.slots]
        while len(self._entries) > 1 and sum(map(_nbytes, self._entries)) > self.max_bytes:
            del self._entries[0]

    def __len__(self) -> int:
        return len(self._entries)


def budget_for(config, context_tokens: int, spare: int = 0) -> int:
    """Bytes for two full windows of `context_tokens` and a system prompt, for a model of this config.

    Two, because a conversation's window and the moved window its read-ahead prepared (turns before it
    is needed) must both stay: with room for one (64 MB), the read-ahead was evicted by the next turn and
    the turn that moved the window read all of it again (1,513 tokens instead of 31, bench_app's chat).
    Each window may also hold up to `spare` positions of room behind its tokens, where the next read is written.
    """
    text = getattr(config, "text_config", None) or config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    per_token = text.num_hidden_layers * 2 * kv_heads * head_dim * 4  # keys and values, float32 on the CPU
    return (2 * (context_tokens + spare) + 256) * per_token


def _copy_prefix(cache: Cache, length: int) -> Cache:
    """A deep copy of `cache` holding its first `length` positions.

    Its tensors are copied as their first `length` positions (given to deepcopy as already copied): a deep copy
    of the whole copies their whole storage, a window of 39 MB where 114 tokens of a system prompt (3 MB) were
    wanted, and a cache that grows in place keeps that storage. Sliding-window layers (whose positions are not
    their tensors' rows) are copied whole and cropped as transformers does.
    """
    layers = getattr(cache, "layers", ())
    if any(getattr(layer, "is_sliding", False) for layer in layers):
        copied = copy.deepcopy(cache)
    else:
        copied = copy.deepcopy(cache, memo={id(t): t[..., :length, :].clone() for layer in layers
                                            for t in (layer.keys, layer.values) if isinstance(t, torch.Tensor)})
    copied.crop(length - copied.get_seq_length())
    return copied


def _nbytes(entry: _Entry) -> int:
    """Memory held by an entry's cache: whole storages (a cropped cache still holds its uncropped tensors)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for layer in getattr(entry.cache, "layers", ()) for t in (layer.keys, layer.values)
                if isinstance(t, torch.Tensor)}
    return sum(storages.values())
