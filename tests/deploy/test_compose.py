"""docker-compose.yml: the real `docker compose config` (Compose v2 needs no engine for it), the compose-spec
JSON schema, and the project rules on the resolved model."""

from __future__ import annotations

import copy
import importlib.resources
import json
import os
import re
import subprocess
from functools import cache
from typing import Any

import jsonschema
import pytest
import yaml

from shared.kinds import WORKER_KINDS
from tests.deploy.conftest import ROOT, compose_binary

COMPOSE_FILE = ROOT / "docker-compose.yml"
REQUIRED = {"POSTGRES_PASSWORD": "pg-test-password", "MINIO_ROOT_USER": "crucible",
            "MINIO_ROOT_PASSWORD": "minio-test-password"}
SECRETISH = re.compile(r"PASSWORD|SECRET|_KEY$|ACCESS_KEY|DATABASE_URL|BACKEND_STORE_URI")


def run_compose(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # A clean environment: the developer's shell (or a stray .env) must not make the check pass.
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run([compose_binary(), "--project-directory", str(ROOT), "-f", str(COMPOSE_FILE), *args],
                          capture_output=True, text=True, timeout=120, env={**base, **(env or {})}, cwd=ROOT)


@cache
def resolved() -> dict[str, Any]:
    proc = run_compose("--profile", "gpu", "--profile", "cpu", "config", "--format", "json", env=REQUIRED)
    assert proc.returncode == 0, f"docker compose config failed:\n{proc.stderr}"
    return json.loads(proc.stdout)


def seconds(duration: str) -> float:
    """Go duration as compose prints it ('5m0s', '1h2m3s', '30s')."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s)", duration)
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1, "ms": 0.001}[u] for n, u in parts)


def test_compose_config_accepts_the_file_with_every_profile():
    for profiles in ([], ["--profile", "gpu"], ["--profile", "cpu"]):
        proc = run_compose(*profiles, "config", "--quiet", env=REQUIRED)
        assert proc.returncode == 0, f"docker compose {' '.join(profiles)} config: {proc.stderr}"


@pytest.mark.parametrize("missing", sorted(REQUIRED))
def test_every_secret_is_required(missing):
    env = {k: v for k, v in REQUIRED.items() if k != missing}
    proc = run_compose("config", "--quiet", env=env)
    assert proc.returncode != 0, f"compose accepted a missing {missing}"
    assert missing in proc.stderr and "set " in proc.stderr, f"the error must say what to set: {proc.stderr}"


def compose_schema() -> dict[str, Any]:
    # The compose-spec schema vendored in the check-jsonschema wheel (no copy in this repository).
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads((vendor / "compose-spec.json").read_text())


def test_file_matches_the_compose_spec_schema():
    doc = yaml.safe_load(COMPOSE_FILE.read_text())
    validator = jsonschema.validators.validator_for(compose_schema())(compose_schema())
    errors = [f"{e.json_path}: {e.message}" for e in validator.iter_errors(doc)]
    assert not errors, "\n".join(errors)
    broken = copy.deepcopy(doc)
    broken["services"]["api"]["healtcheck"] = broken["services"]["api"].pop("healthcheck")
    assert list(validator.iter_errors(broken)), "the schema must reject an unknown (misspelt) service key"


def test_images_are_pinned():
    for name, svc in resolved()["services"].items():
        image = svc["image"]
        ref, _, digest = image.partition("@")
        tag = ref.rsplit(":", 1)[1] if ":" in ref.rsplit("/", 1)[-1] else ""
        assert (tag or digest) and tag != "latest", f"service {name}: image {image} must have a fixed tag"


def test_one_gpu_worker_per_kind_and_a_cpu_worker():
    services = resolved()["services"]
    for kind in WORKER_KINDS:
        svc = services.get(f"worker-{kind}")
        assert svc is not None, f"no compose service worker-{kind}"
        assert svc["command"] == ["worker", "--kind", kind] and svc["profiles"] == ["gpu"]
        (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        assert device.get("device_ids") or device.get("count"), f"worker-{kind}: reserves no GPU"
        assert seconds(svc["stop_grace_period"]) >= 120, f"worker-{kind}: stop grace shorter than a checkpoint"
        assert svc["healthcheck"]["test"][1:4] == ["crucible", "probe", "worker"]
        assert svc["image"].split("/")[-1].startswith("worker:")
    cpu = services["worker-cpu"]
    assert cpu["profiles"] == ["cpu"] and "deploy" not in cpu and cpu["command"] == ["worker", "--kind", "all"]
    gpu_services = {n for n, s in services.items() if "deploy" in s}
    assert all(services[n].get("profiles") == ["gpu"] for n in gpu_services), \
        "GPU reservations only in the gpu profile: a CPU-only host must be able to start the rest"


def test_healthchecks_and_startup_order():
    services = resolved()["services"]
    for name, svc in services.items():
        one_shot = svc.get("restart") == "no"
        disabled = (svc.get("healthcheck") or {}).get("disable", False)
        assert one_shot or (svc.get("healthcheck") and not disabled), f"{name}: long-running without a healthcheck"
        for dep, cond in (svc.get("depends_on") or {}).items():
            target = services[dep]
            if cond["condition"] == "service_healthy":
                assert target.get("healthcheck") and not target["healthcheck"].get("disable"), \
                    f"{name} waits for {dep} to be healthy, but {dep} has no healthcheck"
            if cond["condition"] == "service_completed_successfully":
                assert target.get("restart") == "no", f"{name} waits for {dep} to finish, but {dep} restarts"
    assert services["migrations"]["command"] == ["db", "upgrade"]
    assert services["migrations"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    gated = [n for n in services if n in ("api", "scheduler") or n.startswith("worker-")]
    for name in gated:
        assert services[name]["depends_on"]["migrations"]["condition"] == "service_completed_successfully", name


def test_mlflow_server_allows_its_service_name_and_uses_postgres():
    mlflow = resolved()["services"]["mlflow"]
    args = mlflow["command"]
    allowed = next(a for a in args if a.startswith("--allowed-hosts="))
    assert "mlflow:5000" in allowed.split("=", 1)[1].split(",")
    backend = mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"]
    assert backend.startswith("postgresql+psycopg://") and backend.endswith("@postgres:5432/mlflow")
    assert "--serve-artifacts" in args and "--artifacts-destination=s3://mlflow/artifacts" in args
    assert resolved()["services"]["api"]["environment"]["CRUCIBLE_MLFLOW_TRACKING_URI"] == "http://mlflow:5000"


def _secret_values(node: Any, path: str = "") -> list[tuple[str, str]]:
    """(path, value) of every environment-like entry whose name looks secret, in the raw (uninterpolated) file."""
    out = []
    if isinstance(node, dict):
        for k, v in node.items():
            if isinstance(v, str) and SECRETISH.search(str(k)):
                out.append((f"{path}.{k}", v))
            out.extend(_secret_values(v, f"{path}.{k}"))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out.extend(_secret_values(v, f"{path}[{i}]"))
    return out


def test_no_secret_values_in_the_file():
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    found = _secret_values(raw)
    assert found, "the secret-name pattern matched nothing: the check would be vacuous"
    for where, value in found:
        assert re.search(r"\$\{[A-Z_]+:\?[^}]+\}", value), \
            f"{where} = {value!r}: secrets must be required variables (${{VAR:?message}}), never literal values"
    for name, svc in resolved()["services"].items():
        for arg in [*(svc.get("entrypoint") or []), *(svc.get("command") or [])]:
            assert not re.search(r"://[^/\s:@]+:[^/\s@]+@", arg), f"{name}: credentials on the command line"
