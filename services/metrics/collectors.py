"""Prometheus metrics of the control plane.

Job-path metrics are computed at scrape time from one snapshot (services/metrics/snapshot.py), so they are
the same on every API replica and survive restarts. Request latency is a normal in-process histogram.

Metric names (the Grafana dashboard in k8s/monitoring/ and the README use them):

=============================================  =========  =============================================
crucible_jobs{state,kind}                      gauge      jobs per state and job kind
crucible_queue_depth{queue}                    gauge      messages waiting in the broker queue
crucible_queue_demand{queue}                   gauge      queued + dispatched + running jobs (workers wanted)
crucible_queue_oldest_waiting_age_seconds      gauge      age of the oldest queued/dispatched job
crucible_dispatch_latency_seconds{queue}       histogram  queued → dispatched, jobs dispatched in the window
crucible_job_attempts_total{kind}              counter    attempts started or pending, all jobs
crucible_job_retries_total{kind}               counter    attempts beyond the first
crucible_job_infra_failures_total{kind}        counter    attempts ended by preemption or a lost worker
crucible_job_user_failures_total{kind}         counter    attempts ended by an exception in the method
crucible_worker_heartbeat_age_seconds{...}     gauge      per live worker process
crucible_workers{kind,state}                   gauge      idle / busy / stale workers
crucible_api_request_duration_seconds{...}     histogram  time to response headers, by route template
crucible_metrics_read_errors{part}             gauge      1 when a part of the snapshot could not be read
=============================================  =========  =============================================
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeHistogramMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.metrics import snapshot as snapshot_mod
from shared.config import get_settings
from shared.kinds import WORKER_KINDS

REGISTRY = CollectorRegistry(auto_describe=False)

# Buckets from a health probe (ms) to a 2 GiB dataset upload (minutes).
API_LATENCY = Histogram(
    "crucible_api_request_duration_seconds",
    "Time from request to response headers (SSE streams count until their first byte), by route template.",
    ["method", "route", "status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0),
    registry=REGISTRY,
)


class JobPathCollector(Collector):
    """Turns one snapshot into metric families at every scrape."""

    def collect(self) -> Iterator[Metric]:
        snap = snapshot_mod.current_snapshot()
        yield from _job_families(snap)
        yield from _queue_families(snap)
        yield from _worker_families(snap)
        errors = GaugeMetricFamily("crucible_metrics_read_errors",
                                   "1 when this part of the job-path snapshot could not be read (see the API log)",
                                   labels=["part"])
        for part in ("jobs", "dispatch", "workers", "broker"):
            errors.add_metric([part], 1.0 if part in snap.errors else 0.0)
        yield errors


def _job_families(snap: snapshot_mod.Snapshot) -> Iterator[Metric]:
    jobs = GaugeMetricFamily("crucible_jobs", "Jobs per state and job kind", labels=["state", "kind"])
    for (state, kind), n in sorted(snap.jobs.items()):
        jobs.add_metric([state, kind], n)
    yield jobs
    for name, doc, values in (
        ("crucible_job_attempts", "Attempts of all jobs (sum of jobs.attempt)", snap.attempts),
        ("crucible_job_retries", "Attempts beyond each job's first (infrastructure and user retries)", snap.retries),
        ("crucible_job_infra_failures", "Attempts ended by the infrastructure: preempted (SIGTERM, checkpointed) "
                                        "or a lost worker (lease expired)", snap.infra_failures),
        ("crucible_job_user_failures", "Attempts ended by an exception in the method", snap.user_failures),
    ):
        fam = CounterMetricFamily(name, doc, labels=["kind"])
        for kind, n in sorted(values.items()):
            fam.add_metric([kind], n)
        yield fam


def _queue_families(snap: snapshot_mod.Snapshot) -> Iterator[Metric]:
    depth = GaugeMetricFamily(
        "crucible_queue_depth",
        "Messages waiting in the worker queue: Redis LLEN when the broker is Redis, else dispatched-but-unclaimed "
        "jobs. Bounded by the dispatcher's QUEUE_WINDOW: scale on crucible_queue_demand.", labels=["queue", "source"])
    demand = GaugeMetricFamily("crucible_queue_demand", "Jobs queued, dispatched or running: the workers this "
                                                        "queue could use now", labels=["queue", "worker_kind"])
    age = GaugeMetricFamily("crucible_queue_oldest_waiting_age_seconds",
                            "Age of the oldest job that is queued or dispatched but not yet running (0 if none)",
                            labels=["queue"])
    for kind, q in sorted(snap.queues.items()):
        depth.add_metric([q.queue, snap.depth_source], q.depth)
        demand.add_metric([q.queue, kind], q.demand)
        age.add_metric([q.queue], snap.oldest_waiting_age(kind))
    yield from (depth, demand, age)

    latency = GaugeHistogramMetricFamily(
        "crucible_dispatch_latency_seconds",
        f"Queued → dispatched delay of jobs dispatched in the last {snapshot_mod.DISPATCH_WINDOW_SECONDS:.0f}s",
        labels=["queue"])
    for queue in sorted(q.queue for q in snap.queues.values()):
        samples = snap.dispatch_latencies.get(queue, [])
        buckets = [(_le(b), sum(1 for s in samples if s <= b)) for b in snapshot_mod.DISPATCH_BUCKETS]
        buckets.append(("+Inf", len(samples)))
        latency.add_metric([queue], buckets, gsum_value=sum(samples))
    yield latency


def _worker_families(snap: snapshot_mod.Snapshot) -> Iterator[Metric]:
    stale_after = 3 * get_settings().HEARTBEAT_SECONDS  # the dispatcher's own freshness rule
    ages = GaugeMetricFamily("crucible_worker_heartbeat_age_seconds", "Seconds since each worker's last heartbeat",
                             labels=["worker", "kind", "hostname"])
    states: Counter[tuple[str, str]] = Counter()
    for w in snap.workers:
        ages.add_metric([w.id, w.kind, w.hostname], w.heartbeat_age)
        states[(w.kind, "stale" if w.heartbeat_age > stale_after else "busy" if w.busy else "idle")] += 1
    yield ages
    workers = GaugeMetricFamily("crucible_workers", "Registered workers by kind and state (stale: no heartbeat for "
                                                    "3 heartbeat intervals)", labels=["kind", "state"])
    for kind in sorted({*WORKER_KINDS, *(k for k, _ in states)}):
        for state in ("idle", "busy", "stale"):
            workers.add_metric([kind, state], states.get((kind, state), 0))
    yield workers


def _le(bound: float) -> str:
    return f"{bound:g}" if bound != int(bound) else f"{bound:.1f}"


REGISTRY.register(JobPathCollector())
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
