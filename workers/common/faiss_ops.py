"""FAISS in one place: exact (flat) inner-product / L2 search and k-means, on the GPU when there is one.

Every k-NN evaluation and every k-means of the platform (CMSF-KM, PatchSearch's clusters, MoIN's topics)
goes through here, so the GPU/CPU choice and its settings live once:

* GPU when CUDA is available AND the installed faiss has GPU support (the worker image's ``faiss-gpu``); the
  index goes to the current CUDA device (each DDP rank's own). ``faiss-cpu`` (tests, CPU hosts) and hosts
  without CUDA take the CPU index. ``use_gpu=True`` insists (an error when it cannot), ``False`` forbids.
* Flat indexes are exact, so both give the same neighbours up to float rounding and the order of exact ties
  (a GPU flat index also caps ``k`` at 2048). ``float16=True`` stores GPU vectors in half precision (PatchSearch
  clusters so); it is ignored on the CPU.
* k-means is ``faiss.Clustering`` over that flat index with the parameters ``faiss.Kmeans`` would use, so a
  CPU clustering is exactly what ``faiss.Kmeans(d, k, niter=, seed=, min_points_per_centroid=1)`` gives.

faiss is imported on first use: only the evaluations and clusterings need it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

import numpy as np

Metric = Literal["ip", "l2"]
GPU_MAX_K = 2048
_gpu_resources: dict[int, Any] = {}
_lock = threading.Lock()


def _faiss() -> ModuleType:
    import faiss

    return faiss


def faiss_has_gpu() -> bool:
    """The installed faiss was built with GPU support and sees at least one GPU."""
    faiss = _faiss()
    return hasattr(faiss, "StandardGpuResources") and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


def gpu_device(use_gpu: bool | None = None) -> int | None:
    """The CUDA device an index should live on, or None for the CPU (see the module docstring)."""
    if use_gpu is False:
        return None
    import torch

    if torch.cuda.is_available() and faiss_has_gpu():
        return int(torch.cuda.current_device())
    if use_gpu:
        raise RuntimeError("a GPU faiss index was requested but " + (
            "CUDA is not available" if not torch.cuda.is_available() else
            "the installed faiss has no GPU support (install faiss-gpu instead of faiss-cpu)"))
    return None


def _resources(device: int) -> Any:
    # One StandardGpuResources per device and process: each one reserves scratch memory on creation.
    with _lock:
        if device not in _gpu_resources:
            _gpu_resources[device] = _faiss().StandardGpuResources()
        return _gpu_resources[device]


def flat_index(dim: int, *, metric: Metric = "ip", use_gpu: bool | None = None, float16: bool = False) -> Any:
    """An empty exact index (``IndexFlatIP`` / ``IndexFlatL2``), moved to the GPU when there is one."""
    faiss = _faiss()
    if metric not in ("ip", "l2"):
        raise ValueError(f"metric must be 'ip' or 'l2', got {metric!r}")
    index = faiss.IndexFlatIP(dim) if metric == "ip" else faiss.IndexFlatL2(dim)
    device = gpu_device(use_gpu)
    if device is None:
        return index
    options = faiss.GpuClonerOptions()
    options.useFloat16 = float16
    return faiss.index_cpu_to_gpu(_resources(device), device, index, options)


def _f32(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().float().cpu().numpy()
    arr = np.ascontiguousarray(x, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-d [N, D] array, got shape {arr.shape}")
    return arr


def search(database: Any, queries: Any, k: int, *, metric: Metric = "ip", use_gpu: bool | None = None,
           ) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k``: ``(scores [Q, k], database indices [Q, k])``, best first.

    Scores are inner products (``metric="ip"``, the largest first; cosine on unit rows) or squared L2
    distances (``"l2"``, the smallest first). ``k`` is clamped to the database size.
    """
    db, q = _f32(database), _f32(queries)
    if db.shape[1] != q.shape[1]:
        raise ValueError(f"database rows are {db.shape[1]}-d but queries are {q.shape[1]}-d")
    k = min(int(k), len(db))
    if k < 1:
        raise ValueError("search needs a non-empty database and k >= 1")
    if k > GPU_MAX_K:  # beyond what a GPU flat index can return
        if use_gpu:
            raise ValueError(f"a GPU faiss search returns at most k={GPU_MAX_K}, asked for {k}")
        use_gpu = False
    index = flat_index(db.shape[1], metric=metric, use_gpu=use_gpu)
    index.add(db)
    scores, idx = index.search(q, k)
    return scores, idx.astype(np.int64, copy=False)


@dataclass
class KMeansResult:
    centroids: np.ndarray    # [k, d] float32
    assignments: np.ndarray  # [n] int64: each row's nearest centroid
    distances: np.ndarray    # [n]: squared L2 to it (spherical: its inner product)
    objective: float         # the last iteration's objective (sum of squared distances; spherical: of sims)
    iterations: int

    @property
    def clusters_used(self) -> int:
        return int(np.unique(self.assignments).size)


def kmeans(x: Any, k: int, *, iters: int = 20, seed: int = 1234, spherical: bool = False,
           init: Literal["random", "kmeans++"] = "random", use_gpu: bool | None = None, float16: bool = False,
           min_points_per_centroid: int = 1, max_points_per_centroid: int = 256) -> KMeansResult:
    """Lloyd k-means of the rows of ``x`` (``faiss.Clustering``), initial centroids drawn with ``seed``.

    ``init="random"`` (faiss' default and the references'): k distinct random rows; ``"kmeans++"``:
    D^2-weighted sampling, less prone to merging two true clusters. ``spherical=True`` keeps the centroids on
    the unit sphere and assigns by inner product (cosine k-means on normalised rows). ``k`` is clamped to the
    number of rows. faiss subsamples to ``max_points_per_centroid * k`` rows (its default, 256 per centroid)
    and re-splits empty clusters, so no centroid is NaN.
    """
    faiss = _faiss()
    data = _f32(x)
    n, d = data.shape
    k = min(int(k), n)
    if k < 1:
        raise ValueError("k-means needs at least one row and k >= 1")
    params = faiss.ClusteringParameters()
    params.niter, params.seed, params.spherical = int(iters), int(seed), bool(spherical)
    params.min_points_per_centroid, params.max_points_per_centroid = min_points_per_centroid, max_points_per_centroid
    params.verbose = False
    if init == "kmeans++":
        params.init_method = faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS
    elif init != "random":
        raise ValueError(f"init must be 'random' or 'kmeans++', got {init!r}")
    clustering = faiss.Clustering(d, k, params)
    index = flat_index(d, metric="ip" if spherical else "l2", use_gpu=use_gpu, float16=float16)
    clustering.train(data, index)
    centroids = faiss.vector_float_to_array(clustering.centroids).reshape(k, d)
    stats = clustering.iteration_stats
    objective = float(stats.at(stats.size() - 1).obj) if stats.size() else 0.0
    # The index holds the final centroids: one more search gives each row's cluster under them.
    index.reset()
    index.add(np.ascontiguousarray(centroids))
    dist, assign = index.search(data, 1)
    return KMeansResult(centroids=centroids, assignments=assign[:, 0].astype(np.int64), distances=dist[:, 0],
                        objective=objective, iterations=int(stats.size()))
