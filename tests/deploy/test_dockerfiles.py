"""The two Dockerfiles: hadolint, plus the project's rules read from the parsed instructions. No image is
built here (no Docker engine); the wheel `pip install .` would install is built and inspected instead."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.deploy.conftest import ROOT, tool

DOCKERFILES = {"control-plane": ROOT / "services" / "Dockerfile", "worker": ROOT / "workers" / "Dockerfile"}
EXACT_TAG = re.compile(r"^[\w./-]+:\d+\.\d+\.\d+[\w.-]*(@sha256:[0-9a-f]{64})?$")


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue
        buf += " " + stripped.removesuffix("\\").strip() if buf else stripped.removesuffix("\\").strip()
        if not stripped.endswith("\\"):
            op, _, args = buf.partition(" ")
            out.append((op.upper(), args.strip()))
            buf = ""
    # An empty parse would make every rule below pass vacuously.
    assert any(op == "FROM" for op, _ in out), f"{path}: parsed no FROM instruction (is the parser broken?)"
    return out


def test_the_parser_reads_instructions_continuations_and_comments(tmp_path):
    sample = tmp_path / "Dockerfile"
    sample.write_text("# syntax=docker/dockerfile:1\nARG BASE=python:3.11.9\nFROM ${BASE} AS build\n\n"
                      "RUN apt-get update \\\n    # a comment inside a continuation\n    && apt-get install -y git\n"
                      "copy a b\n")
    assert instructions(sample) == [("ARG", "BASE=python:3.11.9"), ("FROM", "${BASE} AS build"),
                                    ("RUN", "apt-get update && apt-get install -y git"), ("COPY", "a b")]
    for name, path in DOCKERFILES.items():
        ops = {op for op, _ in instructions(path)}
        assert {"FROM", "RUN", "COPY", "USER", "HEALTHCHECK", "ENTRYPOINT"} <= ops, f"{name}: parsed only {ops}"


def final_stage(instrs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last = max(i for i, (op, _) in enumerate(instrs) if op == "FROM")
    return instrs[last:]


def arg_defaults(instrs: list[tuple[str, str]]) -> dict[str, str]:
    return dict(a.split("=", 1) for op, a in instrs if op == "ARG" and "=" in a)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_passes(name):
    proc = subprocess.run([tool("hadolint"), "--no-color", str(DOCKERFILES[name])], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, f"hadolint {DOCKERFILES[name].relative_to(ROOT)}:\n{proc.stdout}{proc.stderr}"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_base_images_are_pinned_to_an_exact_release(name):
    instrs = instructions(DOCKERFILES[name])
    args = arg_defaults(instrs)
    for op, rest in instrs:
        if op != "FROM":
            continue
        image = rest.split()[0]
        resolved = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m[1], m[0]), image)
        assert EXACT_TAG.match(resolved), f"FROM {image} -> {resolved}: pin an exact version (x.y.z), never latest"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_runtime_stage_is_non_root_with_a_healthcheck_and_the_cli(name):
    stage = final_stage(instructions(DOCKERFILES[name]))
    users = [a for op, a in stage if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), "the runtime stage must end as a non-root user"
    assert users[-1].split(":")[0].isdigit(), "use a numeric USER so runAsNonRoot can verify it"
    health = [a for op, a in stage if op == "HEALTHCHECK"]
    assert health and "crucible" in health[0] and "probe" in health[0]
    assert ("ENTRYPOINT", '["crucible"]') in stage


def test_control_plane_has_no_torch_and_the_worker_pins_it_like_pyproject():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = dict(re.match(r"([\w-]+)==(.+)", d).groups() for d in pyproject["project"]["optional-dependencies"]["worker"]
                if "==" in d)
    control = " ".join(f"{op} {a}" for op, a in instructions(DOCKERFILES["control-plane"]))
    assert "torch" not in control.lower() and "[worker]" not in control, "the control plane image must stay slim"
    args = arg_defaults(instructions(DOCKERFILES["worker"]))
    assert args["TORCH_VERSION"] == pins["torch"] == "2.14.1"
    assert args["TORCHVISION_VERSION"] == pins["torchvision"] == "0.29.1"
    assert '".[worker]"' in DOCKERFILES["worker"].read_text()


def test_worker_image_swaps_faiss_cpu_for_the_pinned_faiss_gpu():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "faiss-cpu==1.15.1" in extras["worker"] and extras["worker-gpu"] == ["faiss-gpu==1.15.1"]
    args = arg_defaults(instructions(DOCKERFILES["worker"]))
    assert args["FAISS_GPU_VERSION"] == "1.15.1"
    (install,) = [a for op, a in instructions(DOCKERFILES["worker"]) if op == "RUN" and '".[worker]"' in a]
    steps = [s.strip() for s in install.split("&&")]
    uninstall = steps.index("pip uninstall --yes faiss-cpu")
    assert steps.index('pip install --no-cache-dir "faiss-gpu==${FAISS_GPU_VERSION}"') == uninstall + 1


def test_worker_image_does_not_expose_all_gpus():
    # NVIDIA_VISIBLE_DEVICES=all in an image hands every GPU of a node to a pod that requested none.
    envs = [args for op, args in instructions(DOCKERFILES["worker"]) if op == "ENV"]
    assert envs, "the worker Dockerfile sets no ENV: the parser or the file changed"
    assert not [e for e in envs if "NVIDIA_VISIBLE_DEVICES" in e]


def test_build_context_holds_what_the_images_copy():
    ignore = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
              if ln.strip() and not ln.startswith("#")]
    assert ignore[0] == "**", ".dockerignore is an allow-list: it must start by excluding everything"
    allowed = {ln.removeprefix("!").rstrip("/") for ln in ignore if ln.startswith("!")}
    checked = 0
    for path in DOCKERFILES.values():
        for op, args in instructions(path):
            if op == "COPY" and not args.startswith("--from"):
                for src in args.split()[:-1]:
                    checked += 1
                    assert (ROOT / src).exists(), f"{path.relative_to(ROOT)} copies {src}, which does not exist"
                    assert src.rstrip("/") in allowed, f"{src} is excluded from the build context by .dockerignore"
    assert checked, "no COPY from the build context was found: nothing was checked"
    for secret in (".env", ".venv", ".git"):
        assert secret not in allowed


def test_the_wheel_the_images_install_ships_migrations_and_the_cli(tmp_path):
    """`pip install .` in the Dockerfiles installs this wheel, not the source tree: everything `crucible db
    upgrade` needs at run time must be inside it."""
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = tmp_path.glob("crucible-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for required in ("migrations/env.py", "migrations/script.py.mako", "services/cli/probes.py",
                     "services/metrics/router.py", "shared/db.py"):
        assert required in names, f"{required} is not in the wheel"
    assert [n for n in names if re.match(r"migrations/versions/\w+\.py$", n)], "no migration versions in the wheel"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "crucible = services.cli.main:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
