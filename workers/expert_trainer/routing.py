"""MoIN's router (§5.2): embed the query with the corpus' embedder, take the nearest topic centroid (cosine),
sequence-level top-1, no learned gate; the cosine margin between the best two centroids is its confidence (§5.6).

NOTE for the lead: the router helper's ``workers/text/expert_set.py`` owns the serving-side routing; this minimal
``route`` exists so evaluation does not wait for it. Dedupe onto theirs once both are merged.
"""

from __future__ import annotations

import numpy as np


def route(vectors: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(expert ids [n], margins [n])`` for L2-normalised query rows and centroid rows.

    The margin is cos(top-1) - cos(top-2) (``inf`` with a single centroid: nothing to confuse it with).
    """
    v = np.asarray(vectors, dtype=np.float32)
    c = np.asarray(centroids, dtype=np.float32)
    if v.ndim != 2 or c.ndim != 2 or v.shape[1] != c.shape[1]:
        raise ValueError(f"vectors {v.shape} and centroids {c.shape} must be [n, d] and [k, d]")
    sims = v @ c.T
    ids = np.argmax(sims, axis=1)
    if c.shape[0] == 1:
        return ids.astype(np.int64), np.full(len(v), np.inf, dtype=np.float32)
    top2 = -np.partition(-sims, 1, axis=1)[:, :2]
    return ids.astype(np.int64), (top2[:, 0] - top2[:, 1]).astype(np.float32)
