"""Every worker kind that has job kinds registered (shared/kinds.py) is deployed: a service in
docker-compose.yml and a worker Deployment in every k8s overlay. Derived from the registry, so a new kind
without its deployment fails here."""

from __future__ import annotations

from typing import Any

from shared.kinds import JobKind, WorkerKind, deployed_worker_kinds, registered
from tests.deploy.conftest import OVERLAYS
from tests.deploy.test_compose import resolved
from tests.deploy.test_k8s_rules import workers


def compose_worker_kinds(services: dict[str, Any]) -> set[str]:
    """Worker kinds a compose service runs on its own (`worker --kind K`; `--kind all` is the CPU catch-all)."""
    out = set()
    for svc in services.values():
        cmd = svc.get("command") or []
        if cmd[:2] == ["worker", "--kind"] and cmd[2] != "all":
            out.update(cmd[2].split(","))
    return out


def undeployed(rendered: dict[str, list[dict[str, Any]]], services: dict[str, Any]) -> list[str]:
    missing = [f"docker-compose.yml: no service runs `worker --kind {k}`"
               for k in deployed_worker_kinds() if k not in compose_worker_kinds(services)]
    for overlay, docs in rendered.items():
        have = workers(docs)
        missing += [f"k8s {overlay}: no worker Deployment with `--kind {k}`"
                    for k in deployed_worker_kinds() if k not in have]
    return missing


def test_every_worker_kind_with_job_kinds_is_deployed_everywhere(rendered):
    assert set(rendered) == set(OVERLAYS) and deployed_worker_kinds(), "nothing to check"
    assert {"ssl-trainer", "distiller"} <= set(deployed_worker_kinds())
    assert undeployed(rendered, resolved()["services"]) == []


def test_a_registered_kind_without_a_deployment_is_reported(rendered):
    toy = JobKind("toy", "tests.unit.toy_kind:ToySpec", "toy-worker", "tests.unit.toy_kind:run", "counts")
    with registered(WorkerKind("toy-worker", "runs toys"), toy):
        problems = undeployed(rendered, resolved()["services"])
    assert problems == ["docker-compose.yml: no service runs `worker --kind toy-worker`",
                        *(f"k8s {o}: no worker Deployment with `--kind toy-worker`" for o in rendered)]
