"""Shared benchmark plumbing: the real service stack (same as the tests) and the platform's processes."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPU cores ({cpu}), {gpu}, torch {torch.__version__}"


@contextmanager
def real_stack() -> Iterator[dict[str, str]]:
    """Postgres, Redis, S3 and MLflow (started where not running, as in the tests), env applied."""
    from tests.conftest import _apply_env
    from tests.stack import TestStack

    stack = TestStack(Path(tempfile.mkdtemp(prefix="crucible-bench-")))
    saved = dict(os.environ)
    try:
        env = stack.start()
        _apply_env(env)
        from shared.db import upgrade_to_head

        upgrade_to_head()
        stack.wait_mlflow()
        yield env
    finally:
        stack.stop()
        os.environ.clear()
        os.environ.update(saved)


@contextmanager
def processes(*commands: list[str], tree: Path = ROOT,
              env: dict[str, str] | None = None) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``crucible`` role processes (api, scheduler, worker) run from ``tree`` (another checkout: a baseline), in
    their own sessions, logs under a temp dir; all stopped (and reaped) together on exit."""
    from services.localstack import stop_pids

    logdir = Path(tempfile.mkdtemp(prefix="crucible-bench-logs-"))
    child_env = None if env is None else {**env, "PYTHONPATH": str(tree)}
    procs = []
    try:
        for i, cmd in enumerate(commands):
            log = open(logdir / f"{i}-{cmd[0]}.log", "ab")
            procs.append(subprocess.Popen([sys.executable, "-m", "services.cli.main", *cmd], cwd=tree, stdout=log,
                                          stderr=subprocess.STDOUT, env=child_env, start_new_session=True))
        yield procs
    finally:
        stop_pids([p.pid for p in procs], timeout=20)


def new_key() -> str:
    import uuid

    from services.projects.service import create_key
    from shared.db import session_scope

    with session_scope() as s:
        _, token = create_key(session=s, project_name=f"bench-{uuid.uuid4().hex[:6]}")
    return token
