"""Shared fixtures. Unit tests need nothing; anything touching ``stack`` runs against real Postgres, Redis,
an S3 server and an MLflow server (tests/stack.py starts what is not already running, and stops it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    # Every checkpoint is stored in the tests (the production default stores them at most CHECKPOINT_DUTY of the
    # time): the kill/resume tests choose the epoch a job is killed at and count the checkpoints it left. Set
    # here, not at import: the benchmarks import this module's helpers and must run with the defaults.
    os.environ.setdefault("CRUCIBLE_CHECKPOINT_DUTY", "1")


def _apply_env(env: dict[str, str]) -> None:
    os.environ.update(env)
    from shared.celery_app import reset_celery
    from shared.config import reset_settings
    from shared.db import dispose_engine

    reset_settings()
    dispose_engine()
    reset_celery()


@pytest.fixture(scope="session")
def stack() -> Iterator[object]:
    from tests.stack import TestStack

    run_dir = Path(tempfile.mkdtemp(prefix="crucible-test-stack-"))
    s = TestStack(run_dir)
    saved = dict(os.environ)
    try:
        _apply_env(s.start())
        from shared.db import upgrade_to_head

        upgrade_to_head()
        yield s
    finally:
        s.stop()
        os.environ.clear()
        os.environ.update(saved)
        if not os.environ.get("CRUCIBLE_KEEP_TEST_STACK"):  # S3 volumes and checkpoints: gigabytes per run
            shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def mlflow_ready(stack: object) -> object:
    stack.wait_mlflow()  # type: ignore[attr-defined]
    return stack


@pytest.fixture(scope="session")
def client(stack: object) -> Iterator[object]:
    from fastapi.testclient import TestClient

    from services.api.app import create_app

    with TestClient(create_app()) as c:
        yield c


def new_project_key(prefix: str = "t") -> tuple[str, str]:
    from services.projects.service import create_key
    from shared.db import session_scope

    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    with session_scope() as s:
        _, token = create_key(session=s, project_name=name)
    return name, token


@pytest.fixture
def auth(stack: object) -> dict[str, str]:
    """Headers of a fresh project's key: each test gets its own project, so tests never see each other's rows."""
    _, token = new_project_key()
    return {"Authorization": f"Bearer {token}"}


# --- real processes (e2e) ---------------------------------------------------------------------------------------
class Procs:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = open(self.log_dir / f"{name}.log", "ab")
        proc = subprocess.Popen([sys.executable, "-m", "services.cli.main", *args], cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, start_new_session=True)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop_all(self) -> None:
        from services.localstack import stop

        for proc in self.procs.values():
            stop(proc, timeout=20)


@pytest.fixture
def procs(stack: object, tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    try:
        yield p
    finally:
        p.stop_all()


def wait_for(predicate: Callable[[], object], *, timeout: float, interval: float = 0.5, what: str = "condition",
              on_timeout: Callable[[], str] | None = None) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    extra = on_timeout() if on_timeout else ""
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{extra}")
