"""The router on Kubernetes: the router worker pods serve the replicas' per-expert metrics, Prometheus may scrape
them (and nothing else may reach the pods), and the PodMonitor selects exactly those pods."""

from __future__ import annotations

import pytest

from tests.deploy.conftest import OVERLAYS, find, pod_labels, selector_matches, workloads
from tests.deploy.test_k8s_rules import _allowed, workers


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_router_pods_expose_the_replica_metrics_port_and_only_it(rendered, overlay):
    docs = rendered[overlay]
    dep = workers(docs)["router"]
    container = dep["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "metrics", "containerPort": 9464, "protocol": "TCP"} in container["ports"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["CRUCIBLE_ROUTER_METRICS_PORT"] == "9464"  # workers/router/replica.py reads it
    policy = find(docs, "NetworkPolicy", "crucible-router-metrics-ingress")["spec"]
    assert selector_matches(policy["podSelector"], pod_labels(dep))
    others = [w for w in workers(docs).values() if w is not dep]
    assert others and not any(selector_matches(policy["podSelector"], pod_labels(w)) for w in others)
    (rule,) = policy["ingress"]
    assert rule["ports"] == [{"port": 9464, "protocol": "TCP"}]  # the metrics port, nothing else
    # and the worker policy still takes no ingress at all: requests reach replicas through Redis only
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    assert not _allowed(policies, "ingress", pod_labels(dep), pod_labels(others[0]), 8000)


def test_podmonitor_scrapes_the_router_pods(rendered):
    docs = rendered["gpu-cluster"]
    pm = find(docs, "PodMonitor", "crucible-router")
    selected = [w for w in workloads(docs) if selector_matches(pm["spec"]["selector"], pod_labels(w))]
    assert [w["metadata"]["name"] for w in selected] == ["crucible-worker-router"]
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
