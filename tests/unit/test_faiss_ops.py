"""workers.common.faiss_ops: the CPU index against brute-force torch, the GPU choice (mocked), real GPU (marker)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from workers.common import faiss_ops


def _points(n: int = 300, d: int = 12, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def _blobs(per: int = 40, k: int = 5, d: int = 8, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d)).astype(np.float32) * 20
    labels = np.repeat(np.arange(k), per)
    return centres[labels] + rng.standard_normal((k * per, d)).astype(np.float32) * 0.1, labels


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_cpu_search_equals_brute_force(metric: str) -> None:
    db, q = _points(300), _points(40, seed=1)
    scores, idx = faiss_ops.search(db, q, 7, metric=metric, use_gpu=False)  # type: ignore[arg-type]
    tdb, tq = torch.from_numpy(db).double(), torch.from_numpy(q).double()
    full = tq @ tdb.T if metric == "ip" else torch.cdist(tq, tdb) ** 2
    ref_scores, ref_idx = torch.topk(full, 7, dim=1, largest=metric == "ip")
    assert idx.shape == (40, 7) and idx.dtype == np.int64
    assert np.array_equal(idx, ref_idx.numpy())
    np.testing.assert_allclose(scores, ref_scores.numpy(), rtol=1e-4, atol=1e-3)


def test_search_clamps_k_and_accepts_tensors() -> None:
    db = torch.nn.functional.normalize(torch.randn(5, 4), dim=1)
    scores, idx = faiss_ops.search(db, db, 50)
    assert idx.shape == (5, 5) and (idx[:, 0] == np.arange(5)).all()  # each row is its own nearest neighbour
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="4-d"):
        faiss_ops.search(db, torch.randn(2, 3), 1)


@pytest.mark.parametrize("spherical", [False, True])
def test_kmeans_recovers_blobs_and_its_assignments_are_brute_force_nearest(spherical: bool) -> None:
    x, labels = _blobs()
    if spherical:
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
    res = faiss_ops.kmeans(x, 5, iters=20, seed=3, spherical=spherical, init="kmeans++", use_gpu=False)
    assert res.centroids.shape == (5, 8) and res.assignments.shape == (200,) and res.clusters_used == 5
    # The partition is the blobs (with k-means++ seeding; a random init can merge two and split another) ...
    pairs = set(zip(labels.tolist(), res.assignments.tolist(), strict=True))
    assert len(pairs) == 5
    # ... each centroid is its members' mean (normalised when spherical), and each row's id is the brute-force
    # nearest centroid with the reported distance.
    tx, tc = torch.from_numpy(x).double(), torch.from_numpy(res.centroids).double()
    for j in range(5):
        mean = tx[torch.from_numpy(res.assignments == j)].mean(0)
        mean = torch.nn.functional.normalize(mean, dim=0) if spherical else mean
        torch.testing.assert_close(tc[j], mean, rtol=1e-3, atol=1e-3)
    if spherical:
        sims = tx @ tc.T
        assert np.array_equal(res.assignments, sims.argmax(1).numpy())
        np.testing.assert_allclose(res.distances, sims.max(1).values.numpy(), atol=1e-4)
    else:
        d2 = torch.cdist(tx, tc) ** 2
        assert np.array_equal(res.assignments, d2.argmin(1).numpy())
        np.testing.assert_allclose(res.distances, d2.min(1).values.numpy(), rtol=1e-3, atol=1e-3)
        assert res.objective == pytest.approx(float(d2.min(1).values.sum()), rel=1e-3)


def test_kmeans_is_seeded_and_clamps_k() -> None:
    x = _points(60, 6)
    a, b = (faiss_ops.kmeans(x, 4, iters=5, seed=11, use_gpu=False) for _ in range(2))
    assert np.array_equal(a.assignments, b.assignments) and np.array_equal(a.centroids, b.centroids)
    assert faiss_ops.kmeans(x[:3], 10, iters=2, use_gpu=False).centroids.shape == (3, 6)


def test_cmsf_kmeans_goes_through_faiss_ops() -> None:
    from workers.ssl_trainer.constraints import run_kmeans

    x = torch.nn.functional.normalize(torch.from_numpy(_points(80, 8)), dim=1)
    ids, objective = run_kmeans(x, 6, iters=5, seed=2)
    ref = faiss_ops.kmeans(x, 6, iters=5, seed=2, use_gpu=False)
    assert torch.equal(ids, torch.from_numpy(ref.assignments)) and objective == ref.objective


class _FakeGpuFaiss:
    """Stands in for a GPU build of faiss: records the CPU->GPU clone, returns the CPU index."""

    def __init__(self, real: Any) -> None:
        self.real, self.cloned = real, []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def get_num_gpus(self) -> int:
        return 1

    class StandardGpuResources:
        pass

    class GpuClonerOptions:
        useFloat16 = False

    def index_cpu_to_gpu(self, res: Any, device: int, index: Any, options: Any) -> Any:
        self.cloned.append((device, type(index).__name__, options.useFloat16))
        return index


def test_gpu_index_is_used_when_cuda_and_faiss_gpu_are_there(monkeypatch: pytest.MonkeyPatch) -> None:
    import faiss

    fake = _FakeGpuFaiss(faiss)
    monkeypatch.setattr(faiss_ops, "_faiss", lambda: fake)
    monkeypatch.setattr(faiss_ops, "_gpu_resources", {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    x, _ = _blobs()
    faiss_ops.search(x, x[:3], 2)
    faiss_ops.kmeans(x, 5, iters=3, float16=True)
    assert fake.cloned == [(0, "IndexFlatIP", False), (0, "IndexFlatL2", True)]
    faiss_ops.search(x, x[:3], 2, use_gpu=False)  # forbidden: stays on the CPU
    assert len(fake.cloned) == 2
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    faiss_ops.search(x, x[:3], 2)  # no CUDA: CPU
    assert len(fake.cloned) == 2
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        faiss_ops.search(x, x[:3], 2, use_gpu=True)


def test_cpu_faiss_refuses_a_forced_gpu_index(monkeypatch: pytest.MonkeyPatch) -> None:
    if faiss_ops.faiss_has_gpu():
        pytest.skip("this faiss has GPU support")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="install faiss-gpu"):
        faiss_ops.flat_index(4, use_gpu=True)


@pytest.mark.gpu
def test_gpu_and_cpu_indexes_agree() -> None:
    if not (torch.cuda.is_available() and faiss_ops.faiss_has_gpu()):
        pytest.skip("needs CUDA and faiss-gpu")
    db, q = _points(2000, 32), _points(100, 32, seed=5)
    s_cpu, i_cpu = faiss_ops.search(db, q, 20, use_gpu=False)
    s_gpu, i_gpu = faiss_ops.search(db, q, 20, use_gpu=True)
    assert (i_cpu == i_gpu).mean() > 0.99  # exact ties may order differently
    np.testing.assert_allclose(s_cpu, s_gpu, rtol=1e-4, atol=1e-4)
    x, labels = _blobs(per=100, k=8, d=16)
    a = faiss_ops.kmeans(x, 8, iters=20, seed=0, use_gpu=False)
    b = faiss_ops.kmeans(x, 8, iters=20, seed=0, use_gpu=True)
    assert len(set(zip(a.assignments.tolist(), b.assignments.tolist(), strict=True))) == 8  # same partition
