"""``cluster``: the topics of MoIN-5k (§5.2: "K-means directly on embeddings"), as spherical k-means with faiss
(``workers.common.faiss_ops.kmeans(spherical=True)``: cosine k-means on normalised rows, §5.6).

It clusters the TRAINING documents. A cluster with fewer than ``min_cluster_size`` of them would make an
under-trained expert (§5.6), so the smallest such cluster is merged into the cluster whose centroid is nearest to
its own, repeatedly, until none is left (or one cluster remains); merged centroids are the normalised mean of their
members. Clusters are then renumbered 0..K'-1 (by decreasing size) and test documents get their nearest centroid
(the router's choice). With ground-truth topics it logs the purity (share of documents in their cluster's majority
topic) and the majority topic of every cluster (oracle routing maps a topic to the cluster it dominates most).

Outputs: the checkpoint (assignments, centroids, sizes, purity) and ``clusters`` = ``[0, 1, ..., K'-1]``, the list
a pipeline fans ``train-expert`` out over.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from shared.specs.experts import ClusterSpec
from workers.common.context import MethodContext
from workers.common.faiss_ops import kmeans
from workers.runtime.context import JobConfigError
from workers.text.embedders import l2_normalise
from workers.text.expert_set import route


def centroids_of(x: np.ndarray, assign: np.ndarray, k: int) -> np.ndarray:
    """Normalised mean of each cluster's rows (``k`` rows; an empty cluster keeps a zero row)."""
    c = np.zeros((k, x.shape[1]), dtype=np.float64)
    np.add.at(c, assign, x)
    return l2_normalise(c)


def merge_small(x: np.ndarray, assign: np.ndarray, centroids: np.ndarray,
                min_size: int) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """Merge clusters below ``min_size`` rows into their nearest cluster (by centroid cosine) until none is
    left; returns ``(assignments renumbered 0..K'-1 by decreasing size, centroids [K', d], merges)`` where
    ``merges`` lists ``(merged, into)`` in the original numbering. Empty clusters are dropped."""
    assign = np.asarray(assign, dtype=np.int64).copy()
    cents = np.asarray(centroids, dtype=np.float32).copy()
    alive = {int(c) for c in np.unique(assign)}
    merges: list[tuple[int, int]] = []
    while len(alive) > 1:
        sizes = Counter(int(a) for a in assign)
        smallest = min(alive, key=lambda c: (sizes[c], c))
        if sizes[smallest] >= min_size:
            break
        others = sorted(alive - {smallest})
        sims = cents[others] @ cents[smallest]
        into = others[int(np.argmax(sims))]
        assign[assign == smallest] = into
        alive.discard(smallest)
        merges.append((smallest, into))
        members = x[assign == into]
        cents[into] = l2_normalise(members.mean(axis=0, keepdims=True))[0]
    order = sorted(alive, key=lambda c: (-int((assign == c).sum()), c))
    renumber = {old: new for new, old in enumerate(order)}
    new_assign = np.array([renumber[int(a)] for a in assign], dtype=np.int64)
    return new_assign, centroids_of(x, new_assign, len(order)), merges


def purity(assign: np.ndarray, topics: list[str]) -> float:
    """Share of documents whose topic is their cluster's majority topic."""
    total = 0
    for c in np.unique(assign):
        members = [topics[i] for i in np.flatnonzero(assign == c)]
        total += Counter(members).most_common(1)[0][1]
    return total / max(1, len(topics))


def majority_topics(assign: np.ndarray, topics: list[str]) -> dict[int, str]:
    return {int(c): Counter(topics[i] for i in np.flatnonzero(assign == c)).most_common(1)[0][0]
            for c in np.unique(assign)}


def oracle_map(assign: np.ndarray, topics: list[str]) -> dict[str, int]:
    """Topic -> the cluster holding most of that topic's documents (oracle routing, "true topic -> cluster")."""
    out = {}
    for t in sorted(set(topics)):
        members = Counter(int(assign[i]) for i, tt in enumerate(topics) if tt == t)
        out[t] = members.most_common(1)[0][0]
    return out


def cluster_embeddings(x: np.ndarray, spec: ClusterSpec) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """Spherical k-means of normalised rows, then the merge of tiny clusters."""
    x = l2_normalise(x)
    if len(x) < 1:
        raise JobConfigError("no training documents to cluster")
    km = kmeans(x, spec.k, iters=spec.iters, seed=spec.seed, spherical=True, init=spec.init)
    return merge_small(x, km.assignments, km.centroids, spec.min_cluster_size)


def run(ctx: MethodContext[ClusterSpec]) -> None:
    import torch

    spec = ctx.spec
    entry = (ctx.inputs.get("checkpoints") or {}).get("embeddings")
    if not entry or not entry.get("path"):
        raise JobConfigError("the job has no 'embeddings' input (the embed job's checkpoint)")
    emb = torch.load(entry["path"], map_location="cpu", weights_only=False)
    if "embeddings" not in emb:
        raise JobConfigError(f"{spec.embeddings} is not an embed job's checkpoint (no embeddings in it)")
    x_all = emb["embeddings"].float().numpy()
    splits, topics = list(emb["splits"]), list(emb["topics"])
    train = np.array([i for i, s in enumerate(splits) if s == "train"])
    test = np.array([i for i, s in enumerate(splits) if s == "test"])
    if spec.k > len(train):
        raise JobConfigError(f"k={spec.k} exceeds the {len(train)} training documents; use k <= {len(train)}")
    assign, centroids, merges = cluster_embeddings(x_all[train], spec)
    k = len(centroids)
    sizes = np.bincount(assign, minlength=k).tolist()
    test_assign, test_margin = route(l2_normalise(x_all[test]), centroids) if len(test) else (np.zeros(0), None)
    result: dict[str, float] = {"clusters": float(k), "merged": float(len(merges)), "min_size": float(min(sizes)),
                                "max_size": float(max(sizes))}
    ctx.log(f"{k} clusters (k={spec.k}, {len(merges)} merged below {spec.min_cluster_size}): sizes {sizes}")
    have_topics = all(t is not None for t in topics)
    majority: dict[int, str] = {}
    oracle: dict[str, int] = {}
    cluster_purity: dict[int, float] = {}
    if have_topics:
        train_topics = [topics[i] for i in train]
        result["purity"] = purity(assign, train_topics)
        majority = majority_topics(assign, train_topics)
        oracle = oracle_map(assign, train_topics)
        cluster_purity = {c: sum(train_topics[i] == majority[c] for i in np.flatnonzero(assign == c)) / sizes[c]
                          for c in majority}
        ctx.log(f"purity {result['purity']:.3f}; majority topics: "
                + ", ".join(f"{c}:{t}({sizes[c]})" for c, t in sorted(majority.items())))
    ctx.log_metrics({f"cluster_size/{c}": float(n) for c, n in enumerate(sizes)} | result, step=0)
    ctx.save_checkpoint({"centroids": torch.from_numpy(centroids), "train_index": train.tolist(),
                         "test_index": test.tolist(), "assignments": assign.tolist(),
                         "test_assignments": np.asarray(test_assign, dtype=np.int64).tolist(),
                         "sizes": sizes, "merges": merges, "majority_topic": majority, "oracle": oracle,
                         "corpus_digest": emb["corpus_digest"], "embedder": emb["embedder"],
                         "num_documents": len(splits), "purity": result.get("purity"),
                         "cluster_purity": cluster_purity},
                        epoch=1, step=len(train), final=True)
    save_output = getattr(ctx, "save_output", None)  # JobContext and LocalContext have it; the protocol not yet
    if save_output is not None:
        save_output("clusters", list(range(k)))
    ctx.set_result(result)
