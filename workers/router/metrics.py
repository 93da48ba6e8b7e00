"""Prometheus metrics of a router replica, per expert (``expert="__base__"`` is the fallback to the base).

Served by the replica itself (``serve(port)``; its URL is in the replica's announcement, and k8s scrapes the
pod's ``metrics`` port). Names follow the control plane's (services/metrics/collectors.py): ``crucible_`` prefix,
seconds, ``_total`` counters.

=================================================  =========  ===============================================
crucible_router_requests_total{op,expert}          counter    requests answered (route / generate)
crucible_router_errors_total{op,expert,reason}     counter    requests that failed (bad_input, busy, ...)
crucible_router_latency_seconds{op,expert}         histogram  control plane send → reply sent (queue + work)
crucible_router_adapter_loads_total{expert}        counter    adapter loads into the base
crucible_router_adapter_evictions_total{expert}    counter    LRU evictions
crucible_router_adapter_resident{expert}           gauge      1 while the adapter is loaded
crucible_router_resident_adapters                  gauge      adapters loaded now
crucible_router_batch_size{op}                     histogram  rows per batched call
crucible_router_fallbacks_total                    counter    generations sent to the base (low margin)
=================================================  =========  ===============================================
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

BASE_LABEL = "__base__"


class ReplicaMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.requests = Counter("crucible_router_requests", "Requests answered", ["op", "expert"], registry=r)
        self.errors = Counter("crucible_router_errors", "Requests that failed", ["op", "expert", "reason"],
                              registry=r)
        self.latency = Histogram("crucible_router_latency_seconds", "From the control plane's send to the reply",
                                 ["op", "expert"], registry=r,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.loads = Counter("crucible_router_adapter_loads", "Adapter loads", ["expert"], registry=r)
        self.evictions = Counter("crucible_router_adapter_evictions", "Adapter evictions", ["expert"], registry=r)
        self.resident = Gauge("crucible_router_adapter_resident", "1 while loaded", ["expert"], registry=r)
        self.resident_count = Gauge("crucible_router_resident_adapters", "Adapters loaded now", registry=r)
        self.batch = Histogram("crucible_router_batch_size", "Rows per batched call", ["op"], registry=r,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.fallbacks = Counter("crucible_router_fallbacks", "Generations sent to the base model", registry=r)

    def loaded(self, expert: str) -> None:
        self.loads.labels(expert).inc()
        self.resident.labels(expert).set(1)
        self.resident_count.inc()

    def evicted(self, expert: str) -> None:
        self.evictions.labels(expert).inc()
        self.resident.labels(expert).set(0)
        self.resident_count.dec()

    def serve(self, port: int) -> tuple[Any, int]:
        """Start ``/metrics`` on ``port`` (0: any free one); returns (server, the port it listens on)."""
        from prometheus_client import start_http_server

        server, _thread = start_http_server(port, registry=self.registry)
        return server, int(server.server_port)


def expert_label(expert: str | None) -> str:
    return BASE_LABEL if expert is None else expert
