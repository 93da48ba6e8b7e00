"""CMSF constraints (ssl.md 3.1-3.6): which bank rows ``j`` may be neighbours of query ``i`` (the mask C_ij).

Two families, both searched chunk by chunk over the bank (bounded memory at any bank size):

* **label constraints** - ``C_ij = [key_i == key_j]``: ground-truth labels (``supervised``), k-means
  cluster ids (``kmeans``), confident pseudo-labels (``semi-supervised``, in ``pseudo_labels.py``). The
  disallowed rows get similarity ``-inf`` inside the top-k - the reference's "distance + 5" trick, with
  an explicit validity flag instead of a magic constant;
* **neighbourhood constraints** - ``C_i`` = the k' bank rows nearest to ``i`` in an AUXILIARY embedding
  space: the older of each image's two cached target embeddings (``2q``), or a frozen other model
  (``cross-modal``); then ``N_i^C`` = the k rows of ``C_i`` nearest in the current space.

Guard (ssl.md 3.9): when a query has fewer than k allowed rows the reference's top-k silently spills into
disallowed rows. Here ``neighbours`` returns a ``valid`` mask; the loss averages over valid neighbours
only and ``constraint_short`` (share of such rows) is logged - a disallowed row is never used.

Rows never written (the bank's random initial rows, dataset index -1) satisfy no image-based constraint.
(The reference looked their cache up at index -1, i.e. the LAST image's cache - a silent wrap-around.)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workers.common import faiss_ops
from workers.common.distributed import Comm
from workers.runtime.context import JobConfigError
from workers.ssl_trainer.base import Pushed
from workers.vision.augment import EvalTransform
from workers.vision.backbones import create_backbone, load_backbone
from workers.vision.bank import MemoryBank, chunked_topk
from workers.vision.data import to_chw_tensor
from workers.vision.heads import MLPHead


@dataclass
class Neighbours:
    slots: Tensor  # [B, k] bank rows
    valid: Tensor  # [B, k] bool: False only where C_i had fewer than k rows


class Constraint(nn.Module):
    """Interface of a CMSF constraint; state (caches, cluster ids, heads) lives in its buffers/sub-modules."""

    name: ClassVar[str] = ""
    with_msf_term: ClassVar[bool] = True  # self-supervised: L = (L_C + L_MSF) / 2; label-given: L_C only
    needs_indices: ClassVar[bool] = False  # the bank must record each row's dataset index

    def __init__(self, comm: Comm | None = None) -> None:
        super().__init__()
        self.comm = comm or Comm()
        self.step_metrics: dict[str, Tensor] = {}

    def query_keys(self, u: Tensor, labels: Tensor | None, indices: Tensor | None) -> Tensor | None:
        """Per-query keys computed BEFORE the push (e.g. pseudo-labels); also written with the batch."""
        return None

    def after_push(self, bank: MemoryBank, pushed: Pushed, keys: Tensor | None) -> None:
        """Update caches with the global batch just written (same on every rank)."""

    def neighbours(self, bank: MemoryBank, u: Tensor, indices: Tensor | None, keys: Tensor | None,
                   k: int) -> Neighbours | None:
        """``N_i^C`` for this rank's queries, or None when there is no constraint (yet): plain MSF."""
        raise NotImplementedError

    def on_fit_start(self, ctx: Any, *, resumed: bool) -> dict[str, float]:
        return {}

    def on_step_end(self, ctx: Any, *, epoch: int, step_in_epoch: int, steps_per_epoch: int) -> dict[str, float]:
        return {}

    def on_epoch_end(self, ctx: Any, *, epoch: int, last: bool) -> dict[str, float]:
        return {}


# --- the two search patterns --------------------------------------------------------------------------
def label_neighbours(bank: MemoryBank, u: Tensor, k: int, query_keys: Tensor, row_keys: Any) -> Neighbours:
    """Top-k by current cosine among rows with ``row_keys(start, end) == query_keys``; a query key < 0
    means "no constraint for this row" (plain MSF row, semi-supervised fallback)."""
    free = (query_keys < 0).unsqueeze(1)

    def allowed(start: int, end: int) -> Tensor:
        return (query_keys.unsqueeze(1) == row_keys(start, end).unsqueeze(0)) | free

    sims, slots = bank.topk_neighbours(u, k, mask_fn=allowed)
    return Neighbours(slots, torch.isfinite(sims))


def neighbourhood_neighbours(bank: MemoryBank, u: Tensor, k: int, k_prime: int, aux_query: Tensor,
                             aux_rows: Any) -> Neighbours:
    """``C_i`` = top-k' bank rows by cosine between ``aux_query[i]`` and ``aux_rows(dataset index of j)``
    (== smallest ``||a_i - a_j||^2`` for unit vectors); ``N_i^C`` = top-k of ``C_i`` by current cosine.

    Equivalent to the reference's "-5 on the k' allowed distances, then top-k" without building ``B x K``.
    """
    b = u.shape[0]
    written = bank.indices >= 0

    def keys(start: int, end: int) -> Tensor:
        return aux_rows(bank.indices[start:end].clamp_min(0))

    csims, cand = chunked_topk(aux_query, keys, bank.size, k_prime,
                               mask_fn=lambda s, e: written[s:e].unsqueeze(0).expand(b, -1))
    cand_ok = torch.isfinite(csims)
    with torch.autocast(device_type=u.device.type, enabled=False):
        cur = (F.normalize(u.float(), dim=1).unsqueeze(1) * bank.gather(cand)).sum(-1)
    cur = cur.masked_fill(~cand_ok, float("-inf"))
    s, j = cur.topk(min(k, cur.shape[1]), dim=1)
    return Neighbours(cand.gather(1, j), torch.isfinite(s))


# --- variants -----------------------------------------------------------------------------------------
class SupervisedConstraint(Constraint):
    """``C_ij = [y_i = y_j]`` with ground-truth labels (ssl.md 3.4); L = L_C only, purity 1 by construction
    whenever the bank holds >= k rows of the query's class."""

    name = "supervised"
    with_msf_term = False

    def query_keys(self, u: Tensor, labels: Tensor | None, indices: Tensor | None) -> Tensor | None:
        if labels is None:
            raise ValueError("cmsf constraint 'supervised' needs the labels of every batch")
        return labels

    def neighbours(self, bank: MemoryBank, u: Tensor, indices: Tensor | None, keys: Tensor | None,
                   k: int) -> Neighbours | None:
        assert keys is not None
        return label_neighbours(bank, u, k, keys, lambda s, e: bank.labels[s:e])


class TwoQueueConstraint(Constraint):
    """CMSF-2Q (ssl.md 3.2): the constraint space is each image's PREVIOUS target embedding.

    ``pool[2, N, d]`` keeps the two latest target embeddings of every training image and ``next_slot[n]``
    the slot written next, which after a write holds the OLDER one (a different augmentation, embedded by an
    older target - from the previous epoch). The pool starts as random UNIT rows (the reference used raw
    Gaussian noise, which breaks the ``2 - 2 cos`` distance during epoch 1).
    """

    name = "2q"
    needs_indices = True
    pool: Tensor
    next_slot: Tensor

    def __init__(self, num_train: int, dim: int, *, topk_constraint: int, generator: torch.Generator | None = None,
                 comm: Comm | None = None) -> None:
        super().__init__(comm)
        self.k_prime = topk_constraint
        self.register_buffer("pool", F.normalize(torch.randn(2, num_train, dim, generator=generator), dim=2))
        self.register_buffer("next_slot", torch.zeros(num_train, dtype=torch.long))

    def older(self, ids: Tensor) -> Tensor:
        return self.pool[self.next_slot[ids], ids]

    def after_push(self, bank: MemoryBank, pushed: Pushed, keys: Tensor | None) -> None:
        ids = pushed.indices
        assert ids is not None
        self.pool[self.next_slot[ids], ids] = pushed.u.float()
        self.next_slot[ids] = 1 - self.next_slot[ids]

    def neighbours(self, bank: MemoryBank, u: Tensor, indices: Tensor | None, keys: Tensor | None,
                   k: int) -> Neighbours | None:
        assert indices is not None
        return neighbourhood_neighbours(bank, u, k, self.k_prime, self.older(indices), self.older)


class CrossModalConstraint(Constraint):
    """Constraint from another model's embedding space (ssl.md 3.6, paper (a); no reference code exists).

    ``embeddings[n]`` = frozen, L2-normalised features of training image n from a checkpoint given as an
    input (computed once; recomputed on resume rather than stored, hence not persistent).
    """

    name = "cross-modal"
    needs_indices = True
    embeddings: Tensor

    def __init__(self, embeddings: Tensor, *, topk_constraint: int, comm: Comm | None = None) -> None:
        super().__init__(comm)
        self.k_prime = topk_constraint
        self.register_buffer("embeddings", F.normalize(embeddings.float(), dim=1), persistent=False)

    def neighbours(self, bank: MemoryBank, u: Tensor, indices: Tensor | None, keys: Tensor | None,
                   k: int) -> Neighbours | None:
        assert indices is not None
        return neighbourhood_neighbours(bank, u, k, self.k_prime, self.embeddings[indices],
                                        lambda ids: self.embeddings[ids])


class KMeansConstraint(Constraint):
    """CMSF-KM (ssl.md 3.3): ``C_ij = [c(n_i) = c(n_j)]`` with k-means clusters of the latest embeddings.

    ``pool[N, d]`` caches every image's latest target embedding; after each epoch (but the last, whose
    clusters nothing would use) rank 0 clusters it with FAISS and broadcasts the ids. Before the first
    clustering there is no constraint: epoch 1 is plain MSF, exactly (the reference got there by giving
    every image cluster 0).
    """

    name = "kmeans"
    needs_indices = True
    pool: Tensor
    clusters: Tensor

    def __init__(self, num_train: int, dim: int, *, clusters: int, iters: int, seed: int,
                 generator: torch.Generator | None = None, comm: Comm | None = None) -> None:
        super().__init__(comm)
        self.num_clusters = min(clusters, num_train)
        self.iters, self.seed = iters, seed
        self.ready = False
        self.register_buffer("pool", F.normalize(torch.randn(num_train, dim, generator=generator), dim=1))
        self.register_buffer("clusters", torch.zeros(num_train, dtype=torch.long))

    def get_extra_state(self) -> dict[str, Any]:
        return {"ready": self.ready}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.ready = bool(state["ready"])

    def after_push(self, bank: MemoryBank, pushed: Pushed, keys: Tensor | None) -> None:
        assert pushed.indices is not None
        self.pool[pushed.indices] = pushed.u.float()

    def neighbours(self, bank: MemoryBank, u: Tensor, indices: Tensor | None, keys: Tensor | None,
                   k: int) -> Neighbours | None:
        if not self.ready:
            return None
        assert indices is not None

        def row_keys(start: int, end: int) -> Tensor:
            ids = bank.indices[start:end]
            return torch.where(ids >= 0, self.clusters[ids.clamp_min(0)], torch.full_like(ids, -1))

        return label_neighbours(bank, u, k, self.clusters[indices], row_keys)

    def on_epoch_end(self, ctx: Any, *, epoch: int, last: bool) -> dict[str, float]:
        if last:
            return {}
        t0 = time.perf_counter()
        objective = 0.0
        if self.comm.is_main:
            ids, objective = run_kmeans(self.pool, self.num_clusters, iters=self.iters, seed=self.seed + epoch)
            self.clusters.copy_(ids.to(self.clusters.device))
        self.comm.broadcast_(self.clusters)
        self.ready = True
        used = int(torch.unique(self.clusters).numel())
        return {"kmeans_objective": objective, "kmeans_clusters_used": float(used),
                "kmeans_time_s": time.perf_counter() - t0}


def run_kmeans(x: Tensor, k: int, *, iters: int, seed: int) -> tuple[Tensor, float]:
    """FAISS k-means (L2, on unit rows as the reference; GPU when there is one) -> (cluster id per row, objective)."""
    result = faiss_ops.kmeans(x, k, iters=iters, seed=seed)
    return torch.from_numpy(result.assignments), result.objective


# --- cross-modal embeddings ---------------------------------------------------------------------------
@torch.no_grad()
def cross_modal_embeddings(ref: dict[str, Any], images: np.ndarray, *, features: str, device: torch.device,
                           fallback_normalization: tuple[Any, Any], batch_size: int = 256) -> Tensor:
    """Frozen features ``[N, d_e]`` of every training image from another job's checkpoint.

    ``features="backbone"``: its pooled backbone output; ``"projection"``: its online projection head on top
    (needs a checkpoint that exports ``projector``). Images get the OTHER model's normalisation and input
    size (from its ``meta``), without augmentation, in eval mode.
    """
    path = ref.get("path")
    if not path:
        raise JobConfigError("cmsf 'cross-modal' needs the checkpoint input cmsf.cross_modal_checkpoint; it was "
                             "not provided to this job (resubmit with cmsf.cross_modal_checkpoint set)")
    state = torch.load(path, map_location="cpu", weights_only=False)
    meta = state.get("meta") if isinstance(state, dict) else None
    if not meta or "backbone" not in state:
        raise JobConfigError(f"{ref.get('ref') or path} is not a model checkpoint with 'backbone' and 'meta' "
                             "(use the checkpoint of an ssl-train or distill job)")
    net: nn.Module = create_backbone(meta["backbone"], stem=meta.get("stem", "cifar"))
    try:
        load_backbone(net, state["backbone"])
    except ValueError as exc:
        raise JobConfigError(f"cross-modal checkpoint: {exc}") from exc
    if features == "projection":
        dims = meta.get("projector")
        if not dims or state.get("projector") is None:
            raise JobConfigError("the cross-modal checkpoint has no projection head (e.g. ISD-r18, or an older "
                                 "checkpoint); set cmsf.cross_modal_features to 'backbone'")
        head = MLPHead(dims["in"], dims["hidden"], dims["out"])
        head.load_state_dict(state["projector"])
        net = nn.Sequential(net, head)
    net.to(device).eval()
    norm = meta.get("normalization") or {}
    mean, std = norm.get("mean", fallback_normalization[0]), norm.get("std", fallback_normalization[1])
    transform = EvalTransform(mean, std)
    size = int(meta.get("image_size") or images.shape[1])
    chw = to_chw_tensor(images)
    out = []
    for start in range(0, len(chw), batch_size):
        x = transform(chw[start:start + batch_size])
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out.append(F.normalize(net(x.to(device)).float(), dim=1))
    return torch.cat(out)
