"""Memory bank (ssl.md 1.5): a FIFO ring buffer of L2-normalised target embeddings.

Shared by the bank-based methods. What differs between them is only *when* they write relative to the
search - MSF/CMSF push the batch BEFORE searching (each target finds itself), ISD/CompRess compute
similarities BEFORE pushing - so the bank exposes ``push`` and ``topk_neighbours`` separately and the
method decides the order.

Memory: rows are ``[K, d]`` fp32 (K = 1.024M, d = 512 is 2.1 GB, saved in every checkpoint). The search
is chunked over the bank, so it never builds the full ``B x K`` similarity matrix (1 GB at B = 256,
K = 1M); for the loss, callers gather the ``k`` selected rows (``B x k x d``) with ``gather`` and take
a batched dot product instead of computing the online side against every row.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Rows compared per chunk in the search: B x 65,536 fp32 similarities = 64 MiB at B = 256.
DEFAULT_CHUNK_ROWS = 65_536

# (bank row start, bank row end) -> bool mask [B, end - start] of allowed rows (e.g. CMSF constraints).
MaskFn = Callable[[int, int], Tensor]


class MemoryBank(nn.Module):
    """``K`` rows of unit-norm ``dim``-vectors, with a label per row (-1 = unknown) and, optionally, the
    dataset index of the image each row came from (per-sample caches such as CMSF's need it).

    Rows start as random unit vectors (as in the reference), labels/indices as -1. Everything,
    including the write pointer, is in ``state_dict`` so a resumed run continues bit-exactly.
    """

    rows: Tensor
    labels: Tensor
    indices: Tensor

    def __init__(self, size: int, dim: int, *, track_indices: bool = False,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"bank size and dim must be >= 1, got {size} x {dim}")
        self.size, self.dim = size, dim
        self.register_buffer("rows", F.normalize(torch.randn(size, dim, generator=generator), dim=1))
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.long))
        if track_indices:
            self.register_buffer("indices", torch.full((size,), -1, dtype=torch.long))
        self.track_indices = track_indices
        # Host-side counters (saved through extra_state): reading a device tensor every step would force a
        # GPU sync.
        self.ptr = 0
        self.num_pushed = 0

    def get_extra_state(self) -> dict[str, Any]:
        return {"ptr": self.ptr, "num_pushed": self.num_pushed}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.ptr, self.num_pushed = int(state["ptr"]), int(state["num_pushed"])

    @property
    def is_full(self) -> bool:
        """True once every random initial row has been overwritten (before that purity is meaningless)."""
        return self.num_pushed >= self.size

    @torch.no_grad()
    def push(self, x: Tensor, labels: Tensor | None = None, indices: Tensor | None = None) -> Tensor:
        """Write a batch at the pointer (rows are L2-normalised here) and advance it by ``B`` (mod K).

        Returns the bank slots written (``[B]``), so callers can find "their" rows.
        """
        b = x.shape[0]
        if self.size % b:
            raise ValueError(f"bank size {self.size} is not a multiple of the batch size {b}; the bank is "
                             "written a batch at a time - choose bank_size = n * batch_size and drop_last=True")
        slots = torch.arange(self.ptr, self.ptr + b, device=self.rows.device)
        self.rows[self.ptr:self.ptr + b] = F.normalize(x.detach().float(), dim=1)
        self.labels[self.ptr:self.ptr + b] = -1 if labels is None else labels.to(self.labels.device)
        if self.track_indices:
            if indices is None:
                raise ValueError("this bank tracks dataset indices; pass indices= to push()")
            self.indices[self.ptr:self.ptr + b] = indices.to(self.indices.device)
        self.ptr = (self.ptr + b) % self.size
        self.num_pushed += b
        return slots

    @torch.no_grad()
    def topk_neighbours(self, query: Tensor, k: int, *, mask_fn: MaskFn | None = None,
                        chunk_rows: int = DEFAULT_CHUNK_ROWS) -> tuple[Tensor, Tensor]:
        """The ``k`` most similar bank rows (cosine) of each query row: ``(sims [B, k], slots [B, k])``.

        Max cosine == min squared distance ``2 - 2 cos`` for unit vectors, so this is the distance top-k of
        the reference. See ``chunked_topk`` for the memory bound (``B x chunk_rows``, never ``B x K``).

        Args:
            query: ``[B, d]``; normalised here.
            k: neighbours per query (<= K).
            mask_fn: optional ``(start, end) -> bool [B, end - start]``; disallowed rows get similarity
                ``-inf`` and are only returned when fewer than ``k`` rows are allowed (check ``sims``).
            chunk_rows: bank rows per chunk.
        """
        if not 1 <= k <= self.size:
            raise ValueError(f"k={k} must be between 1 and the bank size {self.size}")
        return chunked_topk(query, lambda s, e: self.rows[s:e], self.size, k, mask_fn=mask_fn,
                            chunk_rows=chunk_rows)

    def gather(self, slots: Tensor) -> Tensor:
        """Bank rows at ``slots`` (any shape ``S``) -> ``S + [d]`` (e.g. ``[B, k, d]`` neighbours)."""
        return self.rows[slots]


@torch.no_grad()
def chunked_topk(query: Tensor, keys: Callable[[int, int], Tensor], size: int, k: int, *,
                 mask_fn: MaskFn | None = None, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> tuple[Tensor, Tensor]:
    """Exact top-``k`` cosine search of ``query [B, d]`` over ``size`` key rows served chunk by chunk.

    ``keys(start, end)`` returns rows ``[end - start, d]`` (unit norm; e.g. a slice of the bank, or cached
    embeddings gathered by the bank's dataset indices for CMSF's constraint space). Each chunk's ``B x
    chunk`` similarities are reduced to their top-k and merged with the running best, so peak memory is
    ``B x chunk_rows`` (64 MiB at B = 256) whatever ``size`` is - a 1M-row bank never builds the 1 GB
    ``B x K`` matrix. Similarities are fp32 (outside any autocast): near-ties decide neighbours.

    Returns:
        ``(sims [B, k'], rows [B, k'])`` with ``k' = min(k, size)``, best first; rows masked out by
        ``mask_fn`` carry ``-inf`` and come last.
    """
    k = min(k, size)
    with torch.autocast(device_type=query.device.type, enabled=False):
        q = F.normalize(query.detach().float(), dim=1)
        best_sims: Tensor | None = None
        best_rows: Tensor | None = None
        for start in range(0, size, chunk_rows):
            end = min(start + chunk_rows, size)
            sims = q @ keys(start, end).float().T
            if mask_fn is not None:
                sims = sims.masked_fill(~mask_fn(start, end), float("-inf"))
            s, i = sims.topk(min(k, end - start), dim=1)
            i = i + start
            if best_sims is None or best_rows is None:
                best_sims, best_rows = s, i
            else:  # merge this chunk's winners with the running best
                merged = torch.cat([best_sims, s], dim=1)
                s, j = merged.topk(min(k, merged.shape[1]), dim=1)
                best_sims, best_rows = s, torch.cat([best_rows, i], dim=1).gather(1, j)
        assert best_sims is not None and best_rows is not None
        return best_sims, best_rows
