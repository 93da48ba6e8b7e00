"""Query embedding for routing: the embedder the set's documents were clustered with (MoIN §5.2 router).

An expert set names its embedder (``expert_set.EmbedderSpec``: ``minilm``, ``base-mean`` or ``tfidf-svd``); a
query must be embedded exactly like the documents or the nearest centroid means nothing, so the replica uses
the expert-trainer's own embedders (``workers.text.embedders.load_embedder``), built once per replica. The one
difference: ``base-mean`` reuses the replica's loaded base, run with the adapters disabled (peft injects the
LoRA layers into the base's own modules, so the plain base forward would include the active expert).

Where ``workers.text.embedders`` is not installed (the router alone), ``base-mean`` falls back to the same
mean pooling written here; the other kinds need that module. Rows come back L2-normalised, float32.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from workers.text.expert_set import EmbedderSpec


def base_mean(model: Any, tokenizer: Any, texts: Sequence[str], *, max_length: int) -> np.ndarray:
    """Mean-pooled last hidden state over each text's first ``max_length`` tokens (padding masked out)."""
    import torch

    side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        enc = tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True, max_length=max_length,
                        add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    device = next(iter(model.parameters())).device
    with torch.inference_mode():
        out = model(input_ids=enc.input_ids.to(device), attention_mask=enc.attention_mask.to(device),
                    output_hidden_states=True)
    h = out.hidden_states[-1]
    mask = enc.attention_mask.to(device).unsqueeze(-1).to(h.dtype)
    pooled = ((h * mask).sum(1) / mask.sum(1).clamp(min=1)).float().cpu().numpy()
    return _normalise(pooled)


def _normalise(x: Any) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(n == 0, 1.0, n)).astype(np.float32)


class QueryEmbedder:
    """``embed(texts) -> [N, d]`` for one expert set. ``base`` is the replica's loaded base (``BaseLM``) and
    ``adapters_off`` a context that disables its adapters (peft's ``disable_adapter``), for ``base-mean``."""

    def __init__(self, spec: EmbedderSpec, root: Path, *, base: Any = None,
                 adapters_off: Any = None) -> None:
        self.spec, self.root, self.base = spec, Path(root), base
        self._adapters_off = adapters_off
        self._impl: Any = None

    def load(self) -> QueryEmbedder:
        config = self.spec.model_dump(exclude_none=True)
        embedders: Any
        try:  # the expert-trainer's embedders: the same code as the embed job
            embedders = importlib.import_module("workers.text.embedders")
        except ImportError:
            embedders = None
        if self.spec.kind == "base-mean":
            if self.base is None:
                raise ValueError("the base-mean embedder needs the replica's base model")
            if embedders is not None:
                self._impl = embedders.BaseMeanEmbedder(self.base.ref, int(config.get("max_length", 256)),
                                                        base=self.base)
        elif embedders is None:
            raise ValueError(f"the {self.spec.kind} embedder needs workers.text.embedders (the expert-trainer's "
                             "embedders), which this worker image lacks")
        else:
            self._impl = embedders.load_embedder(config, self.root)
        return self

    def _off(self) -> AbstractContextManager[Any]:
        return self._adapters_off() if self._adapters_off is not None else nullcontext()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if self._impl is None and self.spec.kind != "base-mean":
            self.load()
        if self._impl is not None:
            with self._off():
                return _normalise(self._impl.embed(list(texts)))
        limit = min(self.spec.max_length or 256, self.base.max_positions)
        with self._off():
            return base_mean(self.base.model, self.base.tokenizer, texts, max_length=limit)
