"""Stage (c), §2.3: the iterative search - score a few images per surviving cluster, prune the weakest clusters.

    candidates = every non-empty cluster; score[:] = 0 (unscored images count as 0, as in the reference)
    repeat:
        take up to m = samples_per_iteration unscored images from each candidate's queue
        if there are none: stop                                     (every candidate exhausted)
        score them
        cluster_score[j] = max score over the members of j
        sort the candidates by cluster_score, best first (stable: ties keep their order)
        drop the last max(1, floor(p * |candidates|))               (p = prune_fraction)
        if no candidate is left: stop

**Stop rule.** The reference drops ``floor(0.25 n)`` with the slice ``[:-n_drop]``; once fewer than 4
candidates remain ``n_drop = 0`` and ``[:-0]`` empties the list - the search ends by accident, with the best
three clusters scored no further. Here at least one cluster is pruned per round, so the search narrows down to
the single best cluster, scores it once more, and ends when the candidate list is empty or every candidate's
queue is exhausted. The number of rounds is bounded by ``|clusters|`` and each image is scored at most once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from workers.poison_scanner.patchsearch.score import Scored


def n_pruned(candidates: int, fraction: float) -> int:
    """Clusters dropped this round: ``max(1, floor(fraction * candidates))`` (never the ``[:-0]`` accident)."""
    return min(candidates, max(1, math.floor(fraction * candidates)))


@dataclass
class SearchResult:
    scores: np.ndarray  # [n] float: poison score of every training image (0 where unscored)
    scored: np.ndarray  # [n] bool
    windows: dict[int, torch.Tensor] = field(default_factory=dict)  # row -> best window [3, w, w]
    boxes: dict[int, tuple[int, int]] = field(default_factory=dict)
    rounds: list[dict[str, float]] = field(default_factory=list)  # per round: candidates, scored, best score

    @property
    def scored_fraction(self) -> float:
        return float(self.scored.mean()) if len(self.scored) else 0.0

    def order(self) -> np.ndarray:
        """Rows by score, best first; ties: scored before unscored, then by row."""
        n = len(self.scores)
        return np.lexsort((np.arange(n), ~self.scored, -self.scores))


def iterative_search(queues: list[np.ndarray], n: int, score: Callable[[np.ndarray], Scored], *,
                     samples_per_iteration: int, prune_fraction: float,
                     on_round: Callable[[SearchResult], None] | None = None) -> SearchResult:
    """Run the search over clusters whose members are ``queues`` (random order); ``score`` scores rows."""
    result = SearchResult(np.zeros(n, dtype=np.float64), np.zeros(n, dtype=bool))
    candidates = [j for j, q in enumerate(queues) if len(q)]
    taken = dict.fromkeys(candidates, 0)
    while candidates:
        batch: list[int] = []
        for j in candidates:
            q, start = queues[j], taken[j]
            batch.extend(int(i) for i in q[start:start + samples_per_iteration])
            taken[j] = min(len(q), start + samples_per_iteration)
        if not batch:
            break
        rows = np.asarray(batch, dtype=np.int64)
        out = score(rows)
        result.scores[rows] = out.scores
        result.scored[rows] = True
        for i, r in enumerate(batch):
            result.windows[r] = out.windows[i]
            result.boxes[r] = (int(out.boxes[i, 0]), int(out.boxes[i, 1]))
        cluster_score = {j: float(result.scores[queues[j]].max()) for j in candidates}
        candidates.sort(key=lambda j: -cluster_score[j])  # stable
        result.rounds.append({"candidates": float(len(candidates)), "scored": float(result.scored.sum()),
                              "best_score": float(cluster_score[candidates[0]])})
        candidates = candidates[:len(candidates) - n_pruned(len(candidates), prune_fraction)]
        if on_round is not None:
            on_round(result)
    return result
