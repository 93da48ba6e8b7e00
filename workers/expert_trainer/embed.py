"""``embed`` job: a vector per document of a text corpus (MoIN §5.4 step 1), with an embedder of
``workers.text.embedders``. The checkpoint holds the matrix (fp16, as §5.4 suggests), the split and ground-truth
topic of every row, the corpus digest and the embedder's state (a fitted TF-IDF+SVD travels with it)."""

from __future__ import annotations

import time

import numpy as np

from shared.specs.experts import EmbedSpec
from workers.common.context import MethodContext
from workers.text.embedders import build_embedder, corpus_digest, embedder_state


def run(ctx: MethodContext[EmbedSpec]) -> None:
    from workers.text.corpora import load_corpus

    spec = ctx.spec
    corpus = load_corpus(ctx.inputs.get("dataset") or {"uri": spec.dataset})
    train_texts, _ = corpus.subset("train")
    t0 = time.perf_counter()
    emb = build_embedder(spec.embedder, train_texts)
    ctx.log(f"embedder {emb.kind} ready in {time.perf_counter() - t0:.1f}s; embedding {len(corpus.texts)} documents")
    t0 = time.perf_counter()
    parts = []
    step = 256
    for i in range(0, len(corpus.texts), step):
        parts.append(emb.embed(corpus.texts[i:i + step]))
        ctx.progress(min(i + step, len(corpus.texts)), len(corpus.texts))
    x = np.concatenate(parts)
    secs = time.perf_counter() - t0
    ctx.log(f"embedded {len(x)} documents into {x.shape[1]}-d vectors in {secs:.1f}s")
    import torch

    ctx.save_checkpoint({"embeddings": torch.from_numpy(x).half(), "splits": corpus.splits, "topics": corpus.topics,
                         "corpus_digest": corpus_digest(corpus), "embedder": embedder_state(emb)},
                        epoch=1, step=len(x), final=True)
    ctx.set_result({"documents": float(len(x)), "dim": float(x.shape[1]), "embed_seconds": secs})
