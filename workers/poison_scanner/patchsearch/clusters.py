"""Stage (a), §2.1: cluster the L2-normalised embeddings with faiss k-means; the cluster-assignment head; the
per-cluster test set and search queues.

* k-means: ``workers.common.faiss_ops.kmeans`` (flat L2 index, ``iters`` Lloyd iterations, as the reference).
  faiss re-splits empty clusters, so no centroid is NaN; a cluster can still end with no member (then it has
  no test image and no queue: guarded, unlike the reference's IndexError).
* assignment of any embedding: its nearest centroid in L2 (what the reference's faiss index search gives).
* the head for Grad-CAM: ``s_j(x) = cos(f(x), c_j)`` (a scalar to differentiate, the library's default target
  being the image's own top cluster, ``argmax_j s_j``).
* test set (``test_images`` = s): ``floor(s / l)`` members nearest their centroid from every cluster; when
  ``l > s``, the nearest member of ``s`` random clusters. These are training images (reference behaviour).
* queues: every cluster's members in a seeded random order (the search scores them front to back).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from workers.common.faiss_ops import kmeans


@dataclass
class Clusters:
    centroids: Tensor  # [l, D] float32
    assignments: np.ndarray  # [n] int64
    distances: np.ndarray  # [n] squared L2 to the own centroid
    test_set: np.ndarray  # training-row indices
    queues: list[np.ndarray]  # per cluster, members in random order (empty for an empty cluster)

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])

    def assign(self, feats: Tensor) -> Tensor:
        """Nearest centroid (L2) of unit feature rows ``[B, D]`` -> ``[B]`` cluster ids."""
        c = self.centroids.to(feats.device)
        d = (feats * feats).sum(1, keepdim=True) - 2 * feats @ c.T + (c * c).sum(1)[None]
        return d.argmin(dim=1)

    def head(self, feats: Tensor) -> Tensor:
        """The cluster-assignment logits ``cos(f, c_j)`` ``[B, l]`` (differentiable in ``feats``)."""
        c = torch.nn.functional.normalize(self.centroids.to(feats.device), dim=1)
        return torch.nn.functional.normalize(feats, dim=1) @ c.T


def build_clusters(feats: Tensor, k: int, *, iters: int, test_images: int, seed: int) -> Clusters:
    """k-means of unit rows ``feats`` ``[n, D]`` and the structures the search uses."""
    res = kmeans(feats.numpy(), k, iters=iters, seed=seed)
    centroids = torch.from_numpy(res.centroids.copy())
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(res.assignments == j) for j in range(res.centroids.shape[0])]
    nearest = [m[np.argsort(res.distances[m], kind="stable")] for m in members]
    used = [j for j, m in enumerate(members) if len(m)]
    per = test_images // len(used) if used else 0
    if per >= 1:
        test = np.concatenate([nearest[j][:per] for j in used])
    else:  # more clusters than test images: the nearest member of s random clusters
        chosen = rng.choice(np.asarray(used), size=min(test_images, len(used)), replace=False)
        test = np.asarray([nearest[j][0] for j in chosen], dtype=np.int64)
    queues = [rng.permutation(m) for m in members]
    return Clusters(centroids, res.assignments.astype(np.int64), res.distances.astype(np.float32),
                    np.sort(test.astype(np.int64)), queues)
