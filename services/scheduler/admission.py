"""Which queued jobs start now, where, and why the others wait: a pure function over a snapshot.

``plan(snapshot, policy)`` is the whole scheduling decision. The dispatcher builds the snapshot from Postgres
(services/scheduler/snapshot.py: per-project heads with LIMIT, the running jobs, quotas, recent usage) and
publishes what the plan says; ``bench/scheduler_sim.py`` builds it from simulated jobs and calls the same function.

Policy (README "Scheduling: quotas, fair share, GPU-aware admission"):

* **Order.** Higher ``priority`` first; among equal priority, the project with the least *load* (decayed average
  GPUs held lately, see fairshare.py, plus GPUs held now, including those this plan just gave it), then the
  oldest job. Every job dispatched raises its project's load at once, so one project's hundred heads interleave
  with the others'.
* **Quotas.** A job whose project would exceed ``max_gpus`` or ``max_jobs`` waits (``quota: ...``); it holds
  nothing back for anyone else.
* **GPU-aware admission.** A job asking for ``gpus > 0`` of a worker kind that has pools (``CRUCIBLE_GPU_POOLS``)
  goes only to a pool of its class (``any``: every pool of the kind) with that many GPUs free, best fit first.
  Jobs without GPUs, or of kinds without pools, keep the per-queue message window (``QUEUE_WINDOW``).
* **Backfill with reservation.** A job that does not fit does not block the jobs behind it: smaller ones that
  fit start (backfill). Against starvation of large jobs, before the fair pass, multi-GPU jobs that have waited
  ``reserve_after_s`` go oldest first, one per pool per cycle: each starts on a pool where it fits, or else
  *reserves* the eligible pool closest to fitting it: nothing else starts there until it has, so the pool
  drains for it. The oldest such job therefore waits at most about ``reserve_after_s`` plus the longest
  remaining runtime on its pool.
* **Preemption** (``policy.preemption``, off by default). A blocked job may stop lower-priority running jobs on
  one eligible pool (lowest priority first, then the most recently started: the least work lost) when that
  frees enough GPUs; the pool is reserved for it while they checkpoint and exit.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.scheduler.fairshare import average_gpus

ANY_CLASS = "any"


@dataclass(frozen=True, slots=True)
class Candidate:
    """A queued job the planner may start."""

    job_id: Hashable
    project: Hashable
    worker_kind: str
    priority: int
    queued_at: float  # seconds on the snapshot's clock
    gpus: int = 0
    gpu_class: str = ANY_CLASS
    seq: int = 0  # last tie-break: submission order


@dataclass(frozen=True, slots=True)
class Active:
    """A dispatched or running job: it holds its GPUs (on ``pool``) and counts towards its project's quota."""

    job_id: Hashable
    project: Hashable
    worker_kind: str
    gpus: int = 0
    pool: str | None = None  # None: published to the kind's plain queue (no GPU accounting)
    priority: int = 0
    started_at: float | None = None
    dispatched: bool = False  # published, not claimed yet (counts against the plain queue's window)
    preempting: bool = False  # asked to stop for a preemption; its GPUs are about to be free


@dataclass(frozen=True, slots=True)
class Pool:
    """GPUs of one class that serve one worker kind; its Celery queue is ``crucible.<worker_kind>.<gpu_class>``."""

    worker_kind: str
    gpu_class: str
    capacity: int

    @property
    def name(self) -> str:
        return f"{self.worker_kind}.{self.gpu_class}"


@dataclass(frozen=True, slots=True)
class Quota:
    max_gpus: int | None = None
    max_jobs: int | None = None


@dataclass
class Snapshot:
    now: float
    candidates: Sequence[Candidate]
    active: Sequence[Active] = ()
    pools: Sequence[Pool] = ()
    window: Mapping[str, int] = field(default_factory=dict)  # worker kind -> messages allowed in flight (plain queue)
    usage: Mapping[Any, float] = field(default_factory=dict)  # project -> decayed GPU-seconds
    quotas: Mapping[Any, Quota] = field(default_factory=dict)
    names: Mapping[Any, str] = field(default_factory=dict)  # project -> display name, for reasons


@dataclass(frozen=True)
class Policy:
    fair_share: bool = True  # False: priority, then age (the priority-FIFO baseline)
    backfill: bool = True  # False: a job that does not fit blocks its pools for everyone behind it
    quotas: bool = True
    reserve_after_s: float = 900.0
    half_life_s: float = 3600.0
    preemption: bool = False


FIFO = Policy(fair_share=False, backfill=False, quotas=False)


@dataclass
class Plan:
    dispatch: list[tuple[Candidate, str | None]] = field(default_factory=list)  # (job, pool name | None)
    waiting: dict[Hashable, str] = field(default_factory=dict)  # job id -> why it waits
    preempt: list[Hashable] = field(default_factory=list)  # running jobs to stop (checkpoint, re-queue)
    reserved: dict[str, Hashable] = field(default_factory=dict)  # pool name -> the job it drains for


@dataclass
class _PoolState:
    pool: Pool
    free: int
    incoming: int = 0  # GPUs of jobs asked to stop for a preemption
    blocked_by: Hashable | None = None  # reserved for this job (or blocked by it, in FIFO)
    victims: list[Active] = field(default_factory=list)


def plan(snap: Snapshot, policy: Policy = Policy()) -> Plan:
    """Decide this cycle: O(C log P) over C candidates from P projects (the snapshot holds heads, not the queue)."""
    out = Plan()
    pools: dict[str, list[_PoolState]] = defaultdict(list)
    by_name: dict[str, _PoolState] = {}
    for p in snap.pools:
        st = _PoolState(p, p.capacity)
        pools[p.worker_kind].append(st)
        by_name[p.name] = st
    gpus_now: dict[Hashable, int] = defaultdict(int)
    jobs_now: dict[Hashable, int] = defaultdict(int)
    window = dict(snap.window)
    for a in snap.active:
        gpus_now[a.project] += a.gpus
        jobs_now[a.project] += 1
        held = by_name.get(a.pool) if a.pool else None
        if held is not None:
            held.free -= a.gpus
            if a.preempting:
                held.incoming += a.gpus
            elif not a.dispatched:  # only a running job can be stopped (a published one starts first)
                held.victims.append(a)
        elif a.dispatched:
            window[a.worker_kind] = window.get(a.worker_kind, 0) - 1

    def load(project: Hashable) -> float:
        if not policy.fair_share:
            return 0.0
        return average_gpus(snap.usage.get(project, 0.0), policy.half_life_s) + gpus_now[project]

    def order(c: Candidate) -> tuple[int, float, float, int]:
        return (-c.priority, load(c.project), c.queued_at, c.seq)

    first = _reserve(snap, policy, pools, gpus_now, jobs_now, out) if policy.backfill else set()
    heads: dict[Hashable, list[Candidate]] = defaultdict(list)
    for c in snap.candidates:
        if c.job_id not in first:
            heads[c.project].append(c)
    heap: list[tuple[tuple[int, float, float, int], int, Hashable]] = []
    tie = 0  # projects need not be orderable
    for project, cs in heads.items():
        cs.sort(key=lambda c: (-c.priority, c.queued_at, c.seq), reverse=True)  # pop() takes the best
        heap.append((order(cs[-1]), tie, project))
        tie += 1
    heapq.heapify(heap)
    while heap:
        _, _, project = heapq.heappop(heap)
        c = heads[project].pop()
        admitted, pool = _admit(c, snap, policy, pools, window, gpus_now, jobs_now, out)
        if admitted:
            out.dispatch.append((c, pool))
            gpus_now[c.project] += c.gpus
            jobs_now[c.project] += 1
        if heads[project]:
            heapq.heappush(heap, (order(heads[project][-1]), tie, project))
            tie += 1
    return out


def _admit(c: Candidate, snap: Snapshot, policy: Policy, pools: Mapping[str, list[_PoolState]],
           window: dict[str, int], gpus_now: Mapping[Hashable, int], jobs_now: Mapping[Hashable, int],
           out: Plan) -> tuple[bool, str | None]:
    """(True, the pool ``c`` starts on; None: the plain queue), or (False, None) with ``out.waiting`` set."""
    if policy.quotas and (q := snap.quotas.get(c.project)) is not None:
        name = snap.names.get(c.project, str(c.project))
        if q.max_jobs is not None and jobs_now[c.project] + 1 > q.max_jobs:
            out.waiting[c.job_id] = f"quota: project {name} runs {jobs_now[c.project]}/{q.max_jobs} jobs"
            return False, None
        if c.gpus and q.max_gpus is not None and gpus_now[c.project] + c.gpus > q.max_gpus:
            out.waiting[c.job_id] = (f"quota: project {name} uses {gpus_now[c.project]}/{q.max_gpus} GPUs "
                                     f"(this job needs {c.gpus})")
            return False, None
    kind_pools = pools.get(c.worker_kind, [])
    if c.gpus == 0 or not kind_pools:
        if window.get(c.worker_kind, 0) > 0:
            window[c.worker_kind] -= 1
            return True, None
        out.waiting[c.job_id] = f"waiting for a free {c.worker_kind} worker (queue window full)"
        return False, None
    eligible = [s for s in kind_pools if c.gpu_class in (ANY_CLASS, s.pool.gpu_class)]
    big_enough = [s for s in eligible if s.pool.capacity >= c.gpus]
    if not big_enough:
        offered = ", ".join(f"{s.pool.gpu_class} ({s.pool.capacity})" for s in kind_pools)
        what = "no pool" if not eligible else "no pool large enough"
        out.waiting[c.job_id] = (f"{what} for {c.gpus} GPUs of class {c.gpu_class} on {c.worker_kind} "
                                 f"(pools: {offered}); it cannot start until one is configured")
        return False, None
    open_ = [s for s in big_enough if s.blocked_by in (None, c.job_id)]
    fits = [s for s in open_ if s.free >= c.gpus]
    if fits:
        best = min(fits, key=lambda s: (s.free, s.pool.name))  # best fit keeps big holes for big jobs
        best.free -= c.gpus
        return True, best.pool.name
    reason = f"no capacity for {c.gpus} GPUs of class {c.gpu_class}"
    if not policy.backfill:  # FIFO: head-of-line blocking on every pool it could use
        for s in open_:
            s.blocked_by = c.job_id
        out.waiting[c.job_id] = reason
        return False, None
    if policy.preemption and open_ and (victim_pool := _preempt(c, open_, out)) is not None:
        victim_pool.blocked_by = c.job_id
        out.reserved[victim_pool.pool.name] = c.job_id
        out.waiting[c.job_id] = f"{reason}; preempting lower-priority jobs on pool {victim_pool.pool.name}"
        return False, None
    held = [s.pool.name for s in open_ if s.blocked_by == c.job_id]
    if held:
        reason += f"; pool {held[0]} is reserved for it (waited over {policy.reserve_after_s:.0f}s)"
    out.waiting[c.job_id] = reason
    return False, None


def _reserve(snap: Snapshot, policy: Policy, pools: Mapping[str, list[_PoolState]], gpus_now: dict[Hashable, int],
             jobs_now: dict[Hashable, int], out: Plan) -> set[Hashable]:
    """Anti-starvation before the fair pass: multi-GPU jobs that have waited ``reserve_after_s``, oldest first
    (within priority), each take one pool: they start there if it fits now, else the pool is reserved for them
    (nothing else starts on it). At most one such job per pool per cycle, so under a long queue, where every job
    is old, the fair order still decides most starts. Returns the jobs handled here."""
    aged = sorted((c for c in snap.candidates if c.gpus > 1 and pools.get(c.worker_kind)
                   and snap.now - c.queued_at >= policy.reserve_after_s),
                  key=lambda c: (-c.priority, c.queued_at, c.seq))
    handled: set[Hashable] = set()
    touched: set[str] = set()
    for c in aged:
        mine = [s for s in pools[c.worker_kind] if s.blocked_by is None and s.pool.name not in touched
                and c.gpu_class in (ANY_CLASS, s.pool.gpu_class) and s.pool.capacity >= c.gpus]
        if not mine:
            continue
        q = snap.quotas.get(c.project) if policy.quotas else None
        if q is not None and ((q.max_gpus is not None and gpus_now[c.project] + c.gpus > q.max_gpus)
                              or (q.max_jobs is not None and jobs_now[c.project] + 1 > q.max_jobs)):
            continue  # over its quota: the fair pass says so; a quota'd job reserves nothing
        fits = [s for s in mine if s.free >= c.gpus]
        target = (min(fits, key=lambda s: (s.free, s.pool.name)) if fits
                  else max(mine, key=lambda s: (s.free + s.incoming, -s.pool.capacity, s.pool.name)))
        touched.add(target.pool.name)
        handled.add(c.job_id)
        if fits:
            target.free -= c.gpus
            out.dispatch.append((c, target.pool.name))
            gpus_now[c.project] += c.gpus
            jobs_now[c.project] += 1
        else:
            target.blocked_by = c.job_id
            out.reserved[target.pool.name] = c.job_id
            out.waiting[c.job_id] = (f"no capacity for {c.gpus} GPUs of class {c.gpu_class}; pool "
                                     f"{target.pool.name} is reserved for it (waited over "
                                     f"{policy.reserve_after_s:.0f}s)")
    return handled


def _preempt(c: Candidate, open_: list[_PoolState], out: Plan) -> _PoolState | None:
    """Pick the pool where stopping the fewest, least valuable lower-priority jobs makes room for ``c``."""
    best: tuple[tuple[int, int], _PoolState, list[Active]] | None = None
    for s in open_:
        have = s.free + s.incoming
        if have >= c.gpus:  # jobs already stopping free enough: wait for them, stop nobody else
            return s
        chosen: list[Active] = []
        for v in sorted((v for v in s.victims if v.priority < c.priority),
                        key=lambda v: (v.priority, -(v.started_at or 0.0))):
            chosen.append(v)
            have += v.gpus
            if have >= c.gpus:
                break
        if have >= c.gpus:
            cost = (max(v.priority for v in chosen), len(chosen))
            if best is None or cost < best[0]:
                best = (cost, s, chosen)
    if best is None:
        return None
    _, s, chosen = best
    for v in chosen:
        out.preempt.append(v.job_id)
        s.victims.remove(v)
        s.incoming += v.gpus
    return s
