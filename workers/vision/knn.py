"""k-NN evaluation of a frozen backbone (ssl.md 1.9).

Features: pooled backbone output (not the projection), eval mode, no grad, L2-normalised. Search:
exact inner product with a FAISS flat IP index (== cosine on unit vectors == L2 order), on the GPU when
there is one (``workers.common.faiss_ops``).

Two protocols, reported under different names because their numbers are not interchangeable:

* ``knn_top1_k{k}`` - the reference's UNWEIGHTED majority vote over the k nearest training images,
  ties broken at random (seeded, so a result is reproducible);
* ``knn_weighted_top1_k200`` - the InstDisc/lightly weighted vote: class score = sum over the 200
  neighbours of ``exp(cos / 0.1)``.

Accuracies are fractions in [0, 1].

``evaluate_knn`` results are cached on the worker's local disk (``CRUCIBLE_DATA_CACHE_DIR/knn``) under a
digest of everything they depend on - the backbone's weights and buffers, both splits' pixels and labels, the
normalisation and the evaluation settings - so the deterministic random-init baseline of a (dataset, backbone,
seed) is computed once per worker, and a hit can never be a different evaluation. ``CRUCIBLE_LOCAL_CACHE=false``
turns it off.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from workers.common import faiss_ops
from workers.common.device import autocast
from workers.vision.data import EvalDataset, eval_loader

WEIGHTED_K = 200
WEIGHTED_T = 0.1


@torch.no_grad()
def extract_features(backbone: nn.Module, dataset: EvalDataset, *, device: torch.device,
                     batch_size: int = 512, amp_dtype: torch.dtype | None = None,
                     memory_format: torch.memory_format = torch.contiguous_format,
                     num_workers: int = 0) -> np.ndarray:
    """L2-normalised float32 features ``[N, D]`` of every image, in dataset order.

    The backbone is switched to eval mode (BN running statistics) and restored to its previous mode.
    """
    was_training = backbone.training
    backbone.eval()
    feats = []
    try:
        for _, x, _ in eval_loader(dataset, batch_size, num_workers=num_workers,
                                   pin_memory=device.type == "cuda"):
            x = x.to(device, non_blocking=True).contiguous(memory_format=memory_format)
            with autocast(device, amp_dtype):
                f = backbone(x)
            feats.append(F.normalize(f.float(), dim=1).cpu())
    finally:
        backbone.train(was_training)
    return torch.cat(feats).numpy() if feats else np.zeros((0, 0), np.float32)


def search(train_feats: np.ndarray, query_feats: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` inner-product search: ``(similarities [Q, k], train indices [Q, k])`` (GPU when there is one)."""
    return faiss_ops.search(train_feats, query_feats, k, metric="ip")


def majority_vote(neighbour_labels: np.ndarray, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Most frequent label per row; ties broken uniformly at random (the reference shuffles before max)."""
    q = neighbour_labels.shape[0]
    counts = np.zeros((q, num_classes), dtype=np.float64)
    np.add.at(counts, (np.repeat(np.arange(q), neighbour_labels.shape[1]), neighbour_labels.ravel()), 1.0)
    # Counts are integers, so a jitter in [0, 0.5) only reorders classes that are tied.
    return np.argmax(counts + 0.5 * rng.random(counts.shape), axis=1)


def weighted_vote(neighbour_labels: np.ndarray, sims: np.ndarray, num_classes: int,
                  temperature: float = WEIGHTED_T) -> np.ndarray:
    """InstDisc-style vote: class score = sum of ``exp(sim / T)`` over the neighbours of that class."""
    q = neighbour_labels.shape[0]
    scores = np.zeros((q, num_classes), dtype=np.float64)
    weights = np.exp(sims.astype(np.float64) / temperature)
    np.add.at(scores, (np.repeat(np.arange(q), neighbour_labels.shape[1]), neighbour_labels.ravel()),
              weights.ravel())
    return np.argmax(scores, axis=1)


def knn_accuracy(train_feats: np.ndarray, train_labels: np.ndarray, test_feats: np.ndarray,
                 test_labels: np.ndarray, *, ks: Iterable[int], num_classes: int, seed: int = 0,
                 weighted: bool = True) -> dict[str, float]:
    """Top-1 accuracies ``{"knn_top1_k1": .., "knn_top1_k20": .., "knn_weighted_top1_k200": ..}``.

    ``k`` larger than the training set is clamped to its size (the key keeps the requested k).
    """
    ks = sorted(set(ks))
    n_train = len(train_feats)
    if n_train == 0 or len(test_feats) == 0:
        raise ValueError("k-NN needs at least one training and one test image")
    kmax = min(n_train, max(ks + ([WEIGHTED_K] if weighted else [])))
    sims, idx = search(train_feats, test_feats, kmax)
    labels = np.asarray(train_labels)[idx]
    test_labels = np.asarray(test_labels)
    rng = np.random.default_rng(seed)
    out = {}
    for k in ks:
        pred = majority_vote(labels[:, :min(k, kmax)], num_classes, rng)
        out[f"knn_top1_k{k}"] = float((pred == test_labels).mean())
    if weighted:
        kw = min(WEIGHTED_K, kmax)
        pred = weighted_vote(labels[:, :kw], sims[:, :kw], num_classes)
        out[f"knn_weighted_top1_k{WEIGHTED_K}"] = float((pred == test_labels).mean())
    return out


def evaluate_knn(backbone: nn.Module, train: EvalDataset, test: EvalDataset, *, ks: Sequence[int],
                 num_classes: int, device: torch.device, seed: int = 0, amp_dtype: torch.dtype | None = None,
                 memory_format: torch.memory_format = torch.contiguous_format, batch_size: int = 512,
                 num_workers: int = 0) -> dict[str, float]:
    """Extract features of both splits with ``backbone`` and return ``knn_accuracy`` (cached, see above)."""
    cache = _cache_file(backbone, train, test, ks=sorted(set(ks)), num_classes=num_classes, device=device.type,
                        seed=seed, amp=str(amp_dtype), fmt=str(memory_format), batch=batch_size)
    if cache is not None and cache.is_file():
        try:
            return {str(k): float(v) for k, v in json.loads(cache.read_text()).items()}
        except (OSError, ValueError, AttributeError):
            cache.unlink(missing_ok=True)
    result = _evaluate_knn(backbone, train, test, ks=ks, num_classes=num_classes, device=device, seed=seed,
                           amp_dtype=amp_dtype, memory_format=memory_format, batch_size=batch_size,
                           num_workers=num_workers)
    if cache is not None:
        _write_atomic(cache, json.dumps(result))
    return result


def _evaluate_knn(backbone: nn.Module, train: EvalDataset, test: EvalDataset, *, ks: Sequence[int],
                  num_classes: int, device: torch.device, seed: int, amp_dtype: torch.dtype | None,
                  memory_format: torch.memory_format, batch_size: int, num_workers: int) -> dict[str, float]:
    f_train, f_test = (
        extract_features(backbone, ds, device=device, batch_size=batch_size, amp_dtype=amp_dtype,
                         memory_format=memory_format, num_workers=num_workers)
        for ds in (train, test)
    )
    return knn_accuracy(f_train, train.labels.numpy(), f_test, test.labels.numpy(), ks=ks,
                        num_classes=num_classes, seed=seed)


# --- the cache hook -------------------------------------------------------------------------------------------
def _cache_file(backbone: nn.Module, train: EvalDataset, test: EvalDataset, **settings: object) -> Path | None:
    from shared.config import get_settings

    conf = get_settings()
    if not conf.LOCAL_CACHE:
        return None
    h = hashlib.blake2b(digest_size=20)
    h.update(json.dumps({"v": 1, "model": type(backbone).__name__, **settings}, sort_keys=True).encode())
    for name, t in backbone.state_dict().items():
        _hash_tensor(h, name, t)
    for split, ds in (("train", train), ("test", test)):
        _hash_tensor(h, f"{split}.images", ds.images)
        _hash_tensor(h, f"{split}.labels", ds.labels)
        _hash_tensor(h, f"{split}.mean", ds.transform.mean)
        _hash_tensor(h, f"{split}.std", ds.transform.std)
    return conf.data_cache_dir / "knn" / f"{h.hexdigest()}.json"


def _hash_tensor(h: hashlib.blake2b, name: str, t: torch.Tensor) -> None:
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    h.update(f"{name}:{flat.dtype}:{tuple(t.shape)};".encode())
    h.update(flat.view(torch.uint8).numpy().data)  # the array's own buffer: no copy


def _write_atomic(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".part-")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError:
        pass  # a full disk costs only the cache
