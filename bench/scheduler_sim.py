"""The scheduler's admission code on a simulated 64-GPU cluster: fair share + backfill vs priority-FIFO, one run.

The decision each cycle is ``services.scheduler.admission.plan``, the very function the dispatcher calls on its
Postgres snapshot; here the snapshot comes from simulated queues instead (per-project heads, the running jobs,
decayed usage from ``fairshare.DecayedLedger``). Workers are simulated: a dispatched job starts at once and ends
after its runtime; the clock jumps from event to event and the scheduler runs after every arrival and completion
(as the LISTEN/NOTIFY wake-up does).

Trace (seeded): several thousand jobs from six projects of very different appetite (one submits a burst of
hundreds at t=0 and keeps submitting), GPU demands 1/2/4/8, GPU class any/a100/h100/l4, log-normal runtimes
(median 30 min, capped at 8 h), priorities -10/0/+10; pools a100: 32, h100: 16, l4: 16 GPUs (64 in all).
Offered load is about the cluster's size while jobs arrive (``--load``), plus the burst, so a queue builds
and the policy matters.

Policies, side by side: **fair** (production defaults: fair share, backfill, reservation after 15 min), **fair, no
reservation** (the same without the anti-starvation pre-pass, to show what it costs and buys),
**fifo** (plain priority-FIFO: priority then age, a job that does not fit blocks its pools) and **fifo+backfill**
(priority then age, skip what does not fit; no fair share, no reservation).

Metrics: GPU utilisation while jobs arrive (and the makespan), queueing delay p50/p99 per project, Jain's index of
GPU share (sampled every 5 simulated minutes over the projects with work: each one's GPUs divided by its max-min
fair share of the 64 GPUs given its demand, running + queued; 1.0 = every project gets its fair share), and the
decision time per dispatched job with 1k, 10k and 100k jobs queued (heads + plan, the production path's pure
part; beside it, what one sort of the whole queue costs, for scale).

    python -m bench.scheduler_sim [--jobs 4000] [--seed 0] [--queued 1000 10000 100000]
"""

from __future__ import annotations

import argparse
import heapq
import math
import random
import statistics
import time
from collections import defaultdict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from services.scheduler.admission import FIFO, Active, Candidate, Policy, Pool, Snapshot, plan
from services.scheduler.fairshare import DecayedLedger

KIND = "ssl-trainer"
POOLS = [Pool(KIND, "a100", 32), Pool(KIND, "h100", 16), Pool(KIND, "l4", 16)]
CAPACITY = sum(p.capacity for p in POOLS)
PROJECTS = {  # name: (share of the jobs, burst at t=0)
    "vision": (0.40, 600), "nlp": (0.20, 0), "speech": (0.15, 0), "robotics": (0.10, 0), "rl": (0.10, 0),
    "ops": (0.05, 0)}
HEADS = 16  # CRUCIBLE_SCHEDULER_HEADS
POLICIES = {
    "fair": Policy(),
    "fair, no reservation": Policy(reserve_after_s=math.inf),
    "fifo": FIFO,
    "fifo+backfill": Policy(fair_share=False, backfill=True, quotas=False, reserve_after_s=math.inf),
}


@dataclass
class SimJob:
    id: int
    project: str
    submit: float
    runtime: float
    gpus: int
    gpu_class: str
    priority: int
    start: float | None = None
    pool: str | None = None

    def candidate(self) -> Candidate:
        return Candidate(job_id=self.id, project=self.project, worker_kind=KIND, priority=self.priority,
                         queued_at=self.submit, gpus=self.gpus, gpu_class=self.gpu_class, seq=self.id)


def trace(n: int, seed: int, load: float) -> list[SimJob]:
    rnd = random.Random(seed)
    mean_gpu_s = 2.4 * 30 * 60 * math.exp(0.5)  # E[gpus] x E[runtime]
    span = n * mean_gpu_s / (load * CAPACITY)  # arrivals spread so the offered load is `load` x the cluster
    jobs: list[SimJob] = []
    names, weights = list(PROJECTS), [s for s, _ in PROJECTS.values()]
    bursts = [(p, b) for p, (_, b) in PROJECTS.items() if b]
    for p, b in bursts:
        for _ in range(b):
            jobs.append(_job(rnd, len(jobs), p, 0.0))
    while len(jobs) < n:
        jobs.append(_job(rnd, len(jobs), rnd.choices(names, weights)[0], rnd.uniform(0, span)))
    jobs.sort(key=lambda j: (j.submit, j.id))
    for i, j in enumerate(jobs):
        j.id = i
    return jobs


def _job(rnd: random.Random, i: int, project: str, at: float) -> SimJob:
    gpus = rnd.choices([1, 2, 4, 8], [50, 25, 15, 10])[0]
    if project == "rl":  # a project of large jobs
        gpus = rnd.choice([4, 8])
    cls = rnd.choices(["any", "a100", "h100", "l4"], [50, 30, 15, 5])[0]
    runtime = min(8 * 3600.0, max(60.0, rnd.lognormvariate(math.log(1800), 1.0)))
    prio = rnd.choices([0, 10, -10], [85, 10, 5])[0]
    return SimJob(i, project, at, runtime, gpus, cls, prio)


class Queues:
    """Queued jobs per project, one FIFO per priority: the heads are read in O(k), like the LATERAL … LIMIT k."""

    def __init__(self) -> None:
        self.by_project: dict[str, dict[int, deque[SimJob]]] = defaultdict(lambda: defaultdict(deque))
        self.gone: set[int] = set()
        self.size = 0
        self.demand: dict[str, int] = defaultdict(int)  # queued GPUs per project

    def push(self, j: SimJob) -> None:
        self.by_project[j.project][j.priority].append(j)
        self.size += 1
        self.demand[j.project] += j.gpus

    def remove(self, j: SimJob) -> None:
        self.gone.add(j.id)
        self.size -= 1
        self.demand[j.project] -= j.gpus

    def heads(self, k: int) -> Iterator[SimJob]:
        for levels in self.by_project.values():
            taken = 0
            for prio in sorted(levels, reverse=True):
                q = levels[prio]
                while q and q[0].id in self.gone:
                    self.gone.discard(q.popleft().id)
                for j in q:
                    if taken == k:
                        break
                    if j.id not in self.gone:
                        taken += 1
                        yield j
                if taken == k:
                    break


@dataclass
class Result:
    util: float = 0.0
    makespan: float = 0.0
    delays: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    gpu_s: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    jain: float = 0.0
    cycles: int = 0
    plan_s: float = 0.0


def max_min_share(demand: dict[str, int], capacity: int) -> dict[str, float]:
    share, left, active = dict.fromkeys(demand, 0.0), float(capacity), {p for p, d in demand.items() if d > 0}
    while active and left > 1e-9:
        each = left / len(active)
        for p in sorted(active, key=lambda p: demand[p]):
            give = min(each, demand[p] - share[p])
            share[p] += give
            left -= give
        active = {p for p in active if demand[p] - share[p] > 1e-9}
    return share


def jain(xs: list[float]) -> float:
    return sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs)) if xs and any(xs) else 1.0


def simulate(jobs: list[SimJob], policy: Policy) -> Result:
    jobs = [SimJob(j.id, j.project, j.submit, j.runtime, j.gpus, j.gpu_class, j.priority) for j in jobs]
    res, queues, ledger = Result(), Queues(), DecayedLedger(policy.half_life_s)
    running: dict[int, SimJob] = {}
    ends: list[tuple[float, int]] = []
    arrivals = deque(jobs)
    last_arrival = jobs[-1].submit
    busy_gpu_s, now, next_sample, samples = 0.0, 0.0, 0.0, []
    used = 0
    while arrivals or ends:
        t = min(arrivals[0].submit if arrivals else math.inf, ends[0][0] if ends else math.inf)
        while next_sample <= min(t, last_arrival):  # fairness samples while jobs arrive
            demand: dict[str, int] = defaultdict(int, queues.demand)
            alloc: dict[str, int] = defaultdict(int)
            for r in running.values():
                demand[r.project] += r.gpus
                alloc[r.project] += r.gpus
            fair = max_min_share(dict(demand), CAPACITY)
            xs = [alloc[p] / fair[p] for p in demand if fair[p] > 0]
            if len(xs) >= 2:
                samples.append(jain(xs))
            next_sample += 300.0
        busy_gpu_s += used * (min(t, last_arrival) - min(now, last_arrival))
        now = t
        while arrivals and arrivals[0].submit <= now:
            queues.push(arrivals.popleft())
        while ends and ends[0][0] <= now:
            _, jid = heapq.heappop(ends)
            j = running.pop(jid)
            used -= j.gpus
            assert j.start is not None
            ledger.add(j.project, j.gpus, j.start, now)
        active = [Active(job_id=r.id, project=r.project, worker_kind=KIND, gpus=r.gpus, pool=r.pool,
                         priority=r.priority, started_at=r.start) for r in running.values()]
        run_allocs: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for r in running.values():
            run_allocs[r.project].append((r.gpus, r.start or now))
        snap = Snapshot(now=now, candidates=[j.candidate() for j in queues.heads(HEADS)], active=active,
                        pools=POOLS, usage=ledger.snapshot(now, run_allocs) if policy.fair_share else {})
        started = time.perf_counter()
        decided = plan(snap, policy)
        res.plan_s += time.perf_counter() - started
        res.cycles += 1
        for c, pool in decided.dispatch:
            j = jobs[int(c.job_id)]  # type: ignore[call-overload]  # simulated ids are ints
            j.start, j.pool = now, pool
            queues.remove(j)
            running[j.id] = j
            used += j.gpus
            heapq.heappush(ends, (now + j.runtime, j.id))
            res.delays[j.project].append(now - j.submit)
            res.gpu_s[j.project] += j.gpus * j.runtime
    res.util = busy_gpu_s / (CAPACITY * last_arrival)
    res.makespan = now
    res.jain = statistics.fmean(samples) if samples else 1.0
    return res


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] if s else 0.0


def decision_time(n_queued: int, *, seed: int, rounds: int = 200) -> tuple[float, float]:
    """Seconds per dispatched job (heads + plan) with ``n_queued`` waiting, and one full sort of that queue."""
    rnd = random.Random(seed)
    queues = Queues()
    jobs = [_job(rnd, i, rnd.choice(list(PROJECTS)), float(i)) for i in range(n_queued)]
    for j in jobs:
        queues.push(j)
    ledger = DecayedLedger(3600.0)
    for p in PROJECTS:
        ledger.add(p, rnd.randint(1, 32), 0.0, 3000.0)
    spent, dispatched = 0.0, 0
    for r in range(rounds):  # each round: 8 GPUs came free, the rest of the cluster is busy
        busy = [Active(job_id=-i - 1, project="ops", worker_kind=KIND, gpus=4, pool=p.name)
                for p in POOLS for i in range(p.capacity // 4) if not (p is POOLS[r % 3] and i < 2)]
        started = time.perf_counter()
        snap = Snapshot(now=10.0 * n_queued, candidates=[j.candidate() for j in queues.heads(HEADS)], active=busy,
                        pools=POOLS, usage=ledger.snapshot(10.0 * n_queued))
        decided = plan(snap, Policy())
        spent += time.perf_counter() - started
        for c, _ in decided.dispatch:
            queues.remove(jobs[int(c.job_id)])  # type: ignore[call-overload]  # simulated ids are ints
            new = _job(rnd, len(jobs), rnd.choice(list(PROJECTS)), 10.0 * n_queued)  # keep n queued
            jobs.append(new)
            queues.push(new)
        dispatched += len(decided.dispatch)
    started = time.perf_counter()
    sorted(jobs, key=lambda j: (-j.priority, j.submit, j.id))
    full_sort = time.perf_counter() - started
    return spent / max(dispatched, 1), full_sort


def postgres_decision_time(sizes: list[int], *, seed: int, rounds: int = 10) -> list[tuple[int, float, float]]:
    """The production path on real Postgres: ``dispatch_once`` (lock, snapshot queries, plan, publish to a
    recording broker) with n jobs queued over six projects, each cycle rolled back so every one sees the same
    queue. Returns (n, seconds per cycle, jobs dispatched per cycle)."""
    from sqlalchemy import text as sql

    from bench.common import real_stack
    from services.projects.service import get_or_create_experiment, get_or_create_project
    from services.scheduler.dispatcher import dispatch_once
    from shared.config import get_settings
    from shared.db import get_engine, session_scope

    class Broker:
        def send_task(self, name: str, args: list[object], queue: str, retry: bool) -> None:
            pass

    out = []
    with real_stack():
        settings = get_settings().model_copy(update={"GPU_POOLS": {p.name: p.capacity for p in POOLS}})
        with session_scope() as s:
            projects = []
            for name in PROJECTS:
                pid = get_or_create_project(session=s, name=f"sim-{name}-{seed}").id
                projects.append((pid, get_or_create_experiment(session=s, project_id=pid, name="sim").id))
        have = 0
        for n in sorted(sizes):
            with session_scope() as s:
                for i, (pid, eid) in enumerate(projects):
                    k = (n - have) // len(projects) + (1 if i < (n - have) % len(projects) else 0)
                    s.execute(sql(_INSERT_QUEUED), {"pid": pid, "eid": eid, "n": k, "seed": seed + i})
                s.execute(sql("INSERT INTO outbox (job_id, attempt, queue, priority, created_at, publish_attempts) "
                              "SELECT j.id, 1, 'crucible.ssl-trainer', j.priority, j.queued_at, 0 FROM jobs j "
                              "WHERE j.status = 'queued' AND j.experiment_id = ANY(:eids) AND NOT EXISTS "
                              "(SELECT 1 FROM outbox o WHERE o.job_id = j.id)"), {"eids": [e for _, e in projects]})
            have = n
            with get_engine().connect() as conn:
                conn.execute(sql("ANALYZE jobs"))
                conn.execute(sql("ANALYZE outbox"))
                conn.commit()
            times, sent = [], 0
            for _ in range(rounds):
                from sqlalchemy.orm import Session

                with Session(get_engine()) as s:
                    started = time.perf_counter()
                    stats = dispatch_once(s, Broker(), settings)
                    s.flush()
                    times.append(time.perf_counter() - started)
                    sent += stats.published
                    s.rollback()
            out.append((n, statistics.median(times), sent / rounds))
    return out


# n queued ssl-train jobs for one project: 1/2/4/8 GPUs, classes any/a100/h100/l4, priorities -10/0/10.
_INSERT_QUEUED = """
INSERT INTO jobs (id, project_id, experiment_id, kind, worker_kind, spec, inputs, priority, status, attempt,
                  infra_failures, user_failures, max_infra_retries, max_user_retries, cancel_requested,
                  preempt_requested, progress, result, outputs, queued_at, created_at, updated_at)
SELECT gen_random_uuid(), :pid, :eid, 'ssl-train', 'ssl-trainer',
       jsonb_build_object('kind', 'ssl-train', 'resources', jsonb_build_object(
           'gpus', (ARRAY[1, 1, 1, 1, 2, 2, 4, 8])[1 + (g * 7 + :seed) % 8],
           'gpu_class', (ARRAY['any', 'any', 'a100', 'h100', 'l4'])[1 + (g * 3 + :seed) % 5])),
       '{}'::jsonb, (ARRAY[0, 0, 0, 0, 0, 0, 10, -10])[1 + (g * 5 + :seed) % 8], 'queued', 1, 0, 0, 3, 0, false,
       false, 0.0, '{}'::jsonb, '{}'::jsonb, now() - make_interval(secs => g), now(), now()
FROM generate_series(1, :n) AS g
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--load", type=float, default=1.0, help="offered GPU load while jobs arrive (1.0: the cluster)")
    ap.add_argument("--queued", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--postgres", action="store_true",
                    help="also time dispatch_once on real Postgres (tests/stack.py) at each --queued size")
    args = ap.parse_args()
    jobs = trace(args.jobs, args.seed, args.load)
    print(f"trace: {len(jobs)} jobs, {len(PROJECTS)} projects, {CAPACITY} GPUs "  # noqa: T201
          f"({', '.join(f'{p.gpu_class} {p.capacity}' for p in POOLS)}), arrivals over "
          f"{jobs[-1].submit / 3600:.1f} h, offered {sum(j.gpus * j.runtime for j in jobs) / 3600:.0f} GPU-h")
    results = {}
    for name, policy in POLICIES.items():
        started = time.perf_counter()
        results[name] = simulate(jobs, policy)
        r = results[name]
        print(f"  simulated {name}: {r.cycles} cycles in {time.perf_counter() - started:.1f}s, "  # noqa: T201
              f"plan() {1e3 * r.plan_s / r.cycles:.2f} ms/cycle")
    _table(results)
    print("\ndecision time per dispatched job (heads + plan), vs one sort of the whole queue:")  # noqa: T201
    print(f"{'queued':>8} | {'per job':>10} | {'full sort':>10}")  # noqa: T201
    for n in args.queued:
        per_job, full = decision_time(n, seed=args.seed)
        print(f"{n:>8} | {per_job * 1e3:>7.3f} ms | {full * 1e3:>7.1f} ms")  # noqa: T201
    if args.postgres:
        print("\ndispatch_once on real Postgres (lock + snapshot queries + plan + publish), median of 10 cycles:")  # noqa: T201
        print(f"{'queued':>8} | {'per cycle':>10} | {'dispatched':>10} | {'per job':>9}")  # noqa: T201
        for n, per_cycle, sent in postgres_decision_time(args.queued, seed=args.seed):
            print(f"{n:>8} | {per_cycle * 1e3:>7.1f} ms | {sent:>10.0f} | "  # noqa: T201
                  f"{per_cycle / max(sent, 1) * 1e3:>6.2f} ms")


def _table(results: dict[str, Result]) -> None:
    names = list(results)
    print("\n| metric | " + " | ".join(names) + " |")  # noqa: T201
    print("|---|" + "---|" * len(names))  # noqa: T201
    row = " | ".join(f"{results[n].util * 100:.1f}%" for n in names)
    print(f"| GPU utilisation while jobs arrive | {row} |")  # noqa: T201
    print(f"| makespan (h) | {' | '.join(f'{results[n].makespan / 3600:.1f}' for n in names)} |")  # noqa: T201
    print(f"| Jain's index of GPU share vs max-min fair | {' | '.join(f'{results[n].jain:.3f}' for n in names)} |")  # noqa: T201
    for p in PROJECTS:
        cells = " | ".join(f"{pct(results[n].delays[p], 0.5) / 60:.0f} / {pct(results[n].delays[p], 0.99) / 60:.0f}"
                           for n in names)
        print(f"| {p}: queueing delay p50 / p99 (min) | {cells} |")  # noqa: T201
    cells = " | ".join(f"{pct([d for ds in results[n].delays.values() for d in ds], 0.5) / 60:.0f} / "
                       f"{pct([d for ds in results[n].delays.values() for d in ds], 0.99) / 60:.0f}" for n in names)
    print(f"| all: queueing delay p50 / p99 (min) | {cells} |")  # noqa: T201


if __name__ == "__main__":
    main()
