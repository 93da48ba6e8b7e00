"""Real processes for end-to-end tests: `crucible api` (uvicorn), `crucible scheduler`, `crucible worker`."""

from __future__ import annotations

import os
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from services import localstack
from tests.conftest import Procs, new_project_key, wait_for
from tests.stack import wait_http

TERMINAL = {"succeeded", "failed", "cancelled", "pruned"}


class Platform:
    def __init__(self, procs: Procs, url: str, token: str) -> None:
        self.procs, self.url = procs, url
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
        self._workers = 0

    def submit(self, spec: dict[str, Any]) -> dict[str, Any]:
        r = self.http.post("/v1/jobs", json=spec)
        assert r.status_code == 201, r.text
        return r.json()

    def job(self, job_id: str) -> dict[str, Any]:
        return self.http.get(f"/v1/jobs/{job_id}").json()

    def events(self, job_id: str, types: list[str] | None = None) -> list[dict[str, Any]]:
        return self.http.get(f"/v1/jobs/{job_id}/events", params={"type": types or [], "limit": 5000}).json()

    def start_worker(self, kind: str = "ssl-trainer") -> Any:
        """Start a worker, after stopping the ones earlier tests started: the job must run on the worker a test
        watches or kills, and one training process at a time keeps 2 cores usable."""
        from services.localstack import stop

        for name, proc in self.procs.procs.items():
            if name.startswith("worker"):
                stop(proc, timeout=20)
        self._workers += 1
        return self.procs.start(f"worker{self._workers}", "worker", "--kind", kind)

    def diagnostics(self, job_id: str | None = None) -> str:
        parts = [f"--- {name} ---\n{self.procs.log(name)[-4000:]}" for name in self.procs.procs]
        if job_id:
            lines = [f"{e['type']}: {e['data']}" for e in self.events(job_id)][-60:]
            parts.append("--- job events ---\n" + "\n".join(lines))
        return "\n".join(parts)

    def wait_status(self, job_id: str, statuses: set[str], timeout: float) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            job = self.job(job_id)
            return job if job["status"] in statuses else None

        return wait_for(check, timeout=timeout, what=f"job {job_id} to reach {statuses}",
                        on_timeout=lambda: self.diagnostics(job_id))  # type: ignore[return-value]

    def wait_event(self, job_id: str, predicate: Any, timeout: float, what: str) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            return next((e for e in self.events(job_id) if predicate(e)), None)

        return wait_for(check, timeout=timeout, interval=0.3, what=what,
                        on_timeout=lambda: self.diagnostics(job_id))  # type: ignore[return-value]


@pytest.fixture(scope="module")
def platform(stack: Any, mlflow_ready: Any) -> Iterator[Platform]:
    procs = Procs(Path(tempfile.mkdtemp(prefix="crucible-e2e-")))
    port = localstack.free_port()
    procs.start("api", "api", "--port", str(port))
    procs.start("scheduler", "scheduler")
    _, token = new_project_key("e2e")
    p = Platform(procs, f"http://127.0.0.1:{port}", token)
    try:
        wait_http(f"{p.url}/healthz", timeout=60)
        yield p
    finally:
        procs.stop_all()


def processes_of_job(job_id: str) -> list[int]:
    """PIDs whose environment carries this job's id (the supervisor sets it on the method's process)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if f"CRUCIBLE_JOB_ID={job_id}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def sigkill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
