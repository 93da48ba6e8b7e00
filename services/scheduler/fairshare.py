"""Recent GPU usage per project: exponentially decayed GPU-seconds (the fair-share input).

A job that held ``g`` GPUs over ``[start, end]`` contributes, at time ``now``,

    g * integral_start^end 2^(-(now - t) / H) dt  =  g * H / ln 2 * (2^(-(now - end) / H) - 2^(-(now - start) / H))

GPU-seconds, with ``H`` the half-life (``CRUCIBLE_FAIR_SHARE_HALF_LIFE_SECONDS``): a GPU-hour used one half-life
ago counts half as much as one used now. This is HTCondor's decayed user priority written as an integral
(Condor updates ``prio = b * prio + (1 - b) * in_use`` with ``b = 0.5^(dt / H)``); dividing by ``H / ln 2`` turns
it into "GPUs held on average lately", the unit ``admission.plan`` compares with GPUs held now.

Pure functions: the dispatcher feeds them rows from Postgres, ``bench/scheduler_sim.py`` its simulated jobs.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Hashable, Iterable, Mapping
from typing import Any

# Intervals that ended more than this many half-lives ago are below 2^-8 (0.4 %) of their weight: not read.
HORIZON_HALF_LIVES = 8.0


def decayed_gpu_seconds(gpus: float, start: float, end: float | None, now: float, half_life: float) -> float:
    """Decayed GPU-seconds of one allocation (``end=None``: still running, counted up to ``now``)."""
    if gpus <= 0 or half_life <= 0:
        return 0.0
    end = now if end is None else min(end, now)
    if end <= start:
        return 0.0
    k = math.log(2) / half_life
    return gpus / k * (math.exp(-k * (now - end)) - math.exp(-k * (now - start)))


def usage_by_project(intervals: Iterable[tuple[Hashable, float, float, float | None]], now: float,
                     half_life: float) -> dict[Hashable, float]:
    """Sum of ``decayed_gpu_seconds`` per project over ``(project, gpus, start, end)`` rows."""
    out: dict[Hashable, float] = defaultdict(float)
    for project, gpus, start, end in intervals:
        out[project] += decayed_gpu_seconds(gpus, start, end, now, half_life)
    return dict(out)


def average_gpus(usage_gpu_seconds: float, half_life: float) -> float:
    """Decayed GPU-seconds as the decayed average number of GPUs held (the weight integrates to H / ln 2)."""
    return usage_gpu_seconds * math.log(2) / half_life if half_life > 0 else 0.0


class DecayedLedger:
    """Incremental form of ``usage_by_project`` for finished allocations (the simulator's bookkeeping).

    ``value(p, t)`` equals the sum of ``decayed_gpu_seconds`` over every allocation of ``p`` recorded with
    ``add`` (all ended at or before ``t``), in O(1) per call instead of a pass over the history.
    """

    def __init__(self, half_life: float) -> None:
        self.half_life = half_life
        self._value: dict[Hashable, float] = defaultdict(float)
        self._at: dict[Hashable, float] = {}

    def _decay_to(self, project: Hashable, now: float) -> None:
        at = self._at.get(project, now)
        if now > at:
            self._value[project] *= 2.0 ** (-(now - at) / self.half_life)
        self._at[project] = max(at, now)

    def add(self, project: Hashable, gpus: float, start: float, end: float) -> None:
        self._decay_to(project, end)
        self._value[project] += decayed_gpu_seconds(gpus, start, end, self._at[project], self.half_life)

    def value(self, project: Hashable, now: float) -> float:
        self._decay_to(project, now)
        return self._value[project]

    def snapshot(self, now: float, running: Mapping[Any, Iterable[tuple[float, float]]] | None = None,
                 ) -> dict[Hashable, float]:
        """Every project's usage at ``now``, plus running allocations ``{project: [(gpus, start), ...]}``."""
        out = {p: self.value(p, now) for p in list(self._value)}
        for p, allocs in (running or {}).items():
            out[p] = out.get(p, 0.0) + sum(decayed_gpu_seconds(g, s, None, now, self.half_life) for g, s in allocs)
        return out
