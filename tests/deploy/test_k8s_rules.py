"""Project rules for the rendered Kubernetes manifests (k8s/README.md lists them)."""

from __future__ import annotations

import re
from typing import Any

import pytest

from services.metrics.router import router as metrics_router
from shared.kinds import WORKER_KINDS, queue_for
from tests.deploy.conftest import OVERLAYS, component, find, pod_labels, pod_spec, selector_matches, workloads

GPU_OVERLAYS = ("base", "gpu-cluster")
SECRETISH = re.compile(r"PASSWORD|SECRET|TOKEN|_KEY$|ACCESS_KEY|DATABASE_URL|BROKER_URL|BACKEND_STORE_URI")
CREDENTIALS_IN_URL = re.compile(r"://[^/\s:@]+:[^/\s@]+@")
CHECKPOINT_GRACE_MIN_S = 120  # a checkpoint plus its upload must fit (README: raise it for big models)


def containers(obj: dict[str, Any], *, init: bool = True) -> list[dict[str, Any]]:
    spec = pod_spec(obj) or {}
    return [*(spec.get("initContainers", []) if init else []), *spec.get("containers", [])]


def workers(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """worker kind -> its Deployment, read from the container's `--kind` argument."""
    out = {}
    for d in docs:
        if d["kind"] == "Deployment" and component(d) == "worker":
            args = d["spec"]["template"]["spec"]["containers"][0]["args"]
            assert args[:2] == ["worker", "--kind"], f"{d['metadata']['name']}: unexpected args {args}"
            assert args[2] not in out, f"two Deployments serve worker kind {args[2]}"
            out[args[2]] = d
    return out


# --- resources, probes, images ---------------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_requests_and_limits(rendered, overlay):
    missing = [f"{w['kind']} {w['metadata']['name']} / {c['name']}: {part}.{res}"
               for w in workloads(rendered[overlay]) for c in containers(w)
               for part in ("requests", "limits") for res in ("cpu", "memory")
               if res not in (c.get("resources", {}).get(part) or {})]
    assert not missing, "containers without resource requests/limits:\n" + "\n".join(missing)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_long_running_container_has_readiness_and_liveness_probes(rendered, overlay):
    missing = [f"{w['kind']} {w['metadata']['name']} / {c['name']}: {probe}"
               for w in workloads(rendered[overlay]) if w["kind"] in ("Deployment", "StatefulSet")
               for c in containers(w, init=False) for probe in ("readinessProbe", "livenessProbe") if probe not in c]
    assert not missing, "containers without probes:\n" + "\n".join(missing)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_are_pinned_and_crucible_images_share_one_release(rendered, overlay):
    tags = set()
    for w in workloads(rendered[overlay]):
        for c in containers(w):
            image = c["image"]
            name, _, digest = image.partition("@")
            tag = name.rsplit(":", 1)[1] if ":" in name.rsplit("/", 1)[-1] else ""
            assert digest or tag, f"{w['metadata']['name']}/{c['name']}: image {image} has no tag or digest"
            assert tag != "latest", f"{w['metadata']['name']}/{c['name']}: image {image} uses the latest tag"
            if "crucible/" in name:
                tags.add(tag)
    assert len(tags) == 1, f"control-plane and worker images must be the same release, got tags {sorted(tags)}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_secret_values_in_the_manifests(rendered, overlay):
    docs = rendered[overlay]
    assert not [d for d in docs if d["kind"] == "Secret"], \
        "a Secret is committed: create crucible-secrets out of band (k8s/README.md step 3)"
    for cm in (d for d in docs if d["kind"] == "ConfigMap"):
        for key, value in (cm.get("data") or {}).items():
            assert not SECRETISH.search(key), f"ConfigMap {cm['metadata']['name']} holds {key}: put it in the Secret"
            assert not CREDENTIALS_IN_URL.search(value), f"ConfigMap {cm['metadata']['name']}.{key} has credentials"
    for w in workloads(docs):
        for c in containers(w):
            for env in c.get("env", []):
                if SECRETISH.search(env["name"]):
                    assert "secretKeyRef" in (env.get("valueFrom") or {}), \
                        f"{w['metadata']['name']}/{c['name']}: {env['name']} must come from a secretKeyRef"
            for arg in [*c.get("command", []), *c.get("args", [])]:
                assert not CREDENTIALS_IN_URL.search(arg), f"{w['metadata']['name']}: credentials in an argument"


# --- GPU workers ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", GPU_OVERLAYS)
def test_every_worker_kind_has_a_gpu_deployment(rendered, overlay):
    by_kind = workers(rendered[overlay])
    assert sorted(by_kind) == sorted(WORKER_KINDS), "one worker Deployment per kind in shared/kinds.py"
    for kind, dep in by_kind.items():
        spec = dep["spec"]["template"]["spec"]
        res = spec["containers"][0]["resources"]
        assert int(res["limits"].get("nvidia.com/gpu", 0)) >= 1, f"{kind}: no nvidia.com/gpu limit"
        assert res["requests"].get("nvidia.com/gpu", res["limits"]["nvidia.com/gpu"]) == res["limits"]["nvidia.com/gpu"]
        assert spec["nodeSelector"].get("nvidia.com/gpu.present") == "true", f"{kind}: not pinned to GPU nodes"
        assert any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", [])), f"{kind}: no GPU toleration"
        assert spec["terminationGracePeriodSeconds"] >= CHECKPOINT_GRACE_MIN_S, f"{kind}: grace < a checkpoint"
        assert any(v.get("emptyDir", {}).get("medium") == "Memory" and v["name"] == "dshm" for v in spec["volumes"]), \
            f"{kind}: no shared-memory volume for DataLoader workers"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_worker_probes_use_the_heartbeat_not_celery_ping(rendered, overlay):
    by_kind = workers(rendered[overlay])
    assert sorted(by_kind) == sorted(WORKER_KINDS), f"{overlay}: found worker Deployments for {sorted(by_kind)}"
    for kind, dep in by_kind.items():
        c = dep["spec"]["template"]["spec"]["containers"][0]
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            cmd = c[probe]["exec"]["command"]
            assert cmd[:3] == ["crucible", "probe", "worker"], f"{kind} {probe}: {cmd}"
            assert "inspect" not in " ".join(cmd)


def test_dev_overlay_is_cpu_only_with_one_replica_each(rendered):
    docs = rendered["dev"]
    assert "nvidia.com/gpu" not in repr(docs), "the dev overlay must not ask for GPUs anywhere"
    for d in docs:
        if d["kind"] == "Deployment":
            assert d["spec"].get("replicas") == 1, f"{d['metadata']['name']}: {d['spec'].get('replicas')} replicas"
            assert "nodeSelector" not in d["spec"]["template"]["spec"], d["metadata"]["name"]
    assert sorted(workers(docs)) == sorted(WORKER_KINDS)


# --- ordering: migrations before the API ------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_migration_job_gates_every_crucible_process(rendered, overlay):
    docs = rendered[overlay]
    job = find(docs, "Job", "crucible-migrate")
    (migrate,) = job["spec"]["template"]["spec"]["containers"]
    assert migrate["args"] == ["db", "upgrade"] and job["spec"]["template"]["spec"]["restartPolicy"] == "OnFailure"
    release = migrate["image"].rsplit(":", 1)[1]
    gated = []
    for d in docs:
        if d["kind"] != "Deployment":
            continue
        main = d["spec"]["template"]["spec"]["containers"][0]
        if main.get("command") == ["mlflow"] or "crucible/" not in main["image"]:
            continue  # the MLflow server and third-party images have their own schemas
        inits = d["spec"]["template"]["spec"].get("initContainers", [])
        waits = [i for i in inits if "until crucible db check" in " ".join(i.get("command", []))]
        assert waits, f"{d['metadata']['name']} does not wait for the migration Job (init: `crucible db check`)"
        assert waits[0]["image"].rsplit(":", 1)[1] == release, f"{d['metadata']['name']}: gate from another release"
        gated.append(d["metadata"]["name"])
    assert "crucible-api" in gated and "crucible-scheduler" in gated
    assert len(gated) == 2 + len(WORKER_KINDS)


# --- wiring: selectors, networking, ingress --------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_and_disruption_budgets_select_pods(rendered, overlay):
    docs = rendered[overlay]
    pods = [pod_labels(w) for w in workloads(docs) if w["kind"] != "Job"]
    for w in workloads(docs):
        if w["kind"] != "Job":
            assert selector_matches(w["spec"]["selector"], pod_labels(w)), f"{w['metadata']['name']}: selector"
    for svc in (d for d in docs if d["kind"] == "Service"):
        assert any(selector_matches({"matchLabels": svc["spec"]["selector"]}, p) for p in pods), \
            f"Service {svc['metadata']['name']} selects no pod"
    pdbs = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    for pdb in pdbs:
        assert sum(selector_matches(pdb["spec"]["selector"], p) for p in pods) == 1, \
            f"PodDisruptionBudget {pdb['metadata']['name']} must cover exactly one workload"
    covered = {d["metadata"]["name"] for d in docs if d["kind"] == "Deployment"
               and any(selector_matches(p["spec"]["selector"], pod_labels(d)) for p in pdbs)}
    assert {"crucible-api", "crucible-scheduler", *(f"crucible-worker-{k}" for k in WORKER_KINDS)} <= covered


def _allowed(policies: list[dict[str, Any]], direction: str, subject: dict[str, str], peer: dict[str, str],
             port: int) -> bool:
    """Whether NetworkPolicies admit traffic (same namespace) for `subject`'s ingress/egress from/to `peer`."""
    kind, key, peers = ("Ingress", "ingress", "from") if direction == "ingress" else ("Egress", "egress", "to")
    applying = [p for p in policies if kind in p["spec"]["policyTypes"]
                and selector_matches(p["spec"]["podSelector"], subject)]
    if not applying:
        return True
    for p in applying:
        for rule in p["spec"].get(key) or []:
            ports = [pp["port"] for pp in rule.get("ports") or []]
            if ports and port not in ports:
                continue
            sources = rule.get(peers)
            if sources is None or any("podSelector" in s and "namespaceSelector" not in s
                                      and selector_matches(s["podSelector"], peer) for s in sources):
                return True
    return False


def _can_reach(policies, src: dict[str, str], dst: dict[str, str], port: int) -> bool:
    return _allowed(policies, "egress", src, dst, port) and _allowed(policies, "ingress", dst, src, port)


@pytest.mark.parametrize("overlay", ("dev", "gpu-cluster"))
def test_network_policies(rendered, overlay):
    docs = rendered[overlay]
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    pods = {component(w): pod_labels(w) for w in workloads(docs)}
    ports = {"postgres": 5432, "redis": 6379, "minio": 9000, "tracking": 5000, "api": 8000}
    # Nothing reaches Postgres but the control plane, the workers and the MLflow server (its own database).
    assert {c for c in pods if _can_reach(policies, pods[c], pods["postgres"], 5432)} == \
        {"api", "scheduler", "migrate", "worker", "tracking"}
    # Workers reach only Redis, Postgres, MinIO and MLflow.
    reachable = {dst for dst, labels in pods.items() if dst in ports
                 and _can_reach(policies, pods["worker"], labels, ports[dst])}
    assert reachable == {"postgres", "redis", "minio", "tracking"}
    assert not _can_reach(policies, pods["worker"], pods["worker"], 8000), "workers must not reach each other"
    egress = find(docs, "NetworkPolicy", "crucible-worker-egress")["spec"]["egress"]
    assert not [r for r in egress if "ipBlock" in repr(r)], "no address ranges for workers beyond the services"
    # Nothing but the API takes traffic from outside the listed clients.
    assert _can_reach(policies, {"app": "anything"}, pods["api"], 8000)
    assert not _can_reach(policies, {"app": "anything"}, pods["redis"], 6379)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ingress_routes_the_api_but_not_metrics(rendered, overlay):
    ing = find(rendered[overlay], "Ingress", "crucible-api")
    paths = [p["path"] for r in ing["spec"]["rules"] for p in r["http"]["paths"]]
    assert "/v1" in paths and "/" not in paths and not [p for p in paths if p.startswith("/metrics")]


# --- autoscaling and monitoring (custom resources, checked structurally) ----------------------------------------
def test_gpu_cluster_scales_every_worker_kind_on_its_queue(rendered):
    docs = rendered["gpu-cluster"]
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    scaled = {d["spec"]["scaleTargetRef"]["name"]: d for d in docs if d["kind"] == "ScaledObject"}
    routes = {r.path for r in metrics_router.routes}
    by_kind = workers(docs)
    # Without this, a renamed label or a dropped base would find no workers and check nothing.
    assert sorted(by_kind) == sorted(WORKER_KINDS), f"gpu-cluster: found worker Deployments for {sorted(by_kind)}"
    for kind, dep in by_kind.items():
        name = dep["metadata"]["name"]
        assert name in scaled, f"worker {kind} has no ScaledObject"
        assert "replicas" not in dep["spec"], f"{name}: KEDA owns the replica count; drop spec.replicas"
        so = scaled[name]["spec"]
        assert so["minReplicaCount"] == 0 and so["maxReplicaCount"] >= 1, f"{kind}: must scale to zero"
        triggers = {t["type"]: t["metadata"] for t in so["triggers"]}
        assert triggers["redis"]["listName"] == queue_for(kind), f"{kind}: redis trigger watches the wrong list"
        host = triggers["redis"]["address"].split(".")[0]
        assert host in services and int(triggers["redis"]["address"].rsplit(":", 1)[1]) == 6379
        api = triggers["metrics-api"]
        assert api["valueLocation"] == f"{kind}.demand" and api["targetValue"] == "1"
        url = re.match(r"http://([^.]+)\.crucible\.svc\.cluster\.local:(\d+)(/.*)$", api["url"])
        assert url and url[1] == "crucible-api" and url[2] == "8000" and url[3] in routes, api["url"]
    assert len(scaled) == len(WORKER_KINDS)


def test_servicemonitor_scrapes_the_api_metrics_port(rendered):
    docs = rendered["gpu-cluster"]
    sm = find(docs, "ServiceMonitor", "crucible-api")
    svc = find(docs, "Service", "crucible-api")
    assert selector_matches(sm["spec"]["selector"], svc["metadata"]["labels"])
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics" and endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}
    dash = find(docs, "ConfigMap", "crucible-grafana-dashboard")
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1" and "crucible-dashboard.json" in dash["data"]
