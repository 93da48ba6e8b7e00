"""The real service stack the integration tests run against, started only where it is not already running.

* Postgres: ``CRUCIBLE_TEST_PG_URL`` or 127.0.0.1:5432 if it answers; otherwise a private cluster (initdb).
* Redis: ``CRUCIBLE_TEST_REDIS_URL`` or 127.0.0.1:6379 if it answers; otherwise a private ``redis-server``.
* S3: a private SeaweedFS ``weed mini`` (real auth, real multipart) on free ports.
* MLflow: a private tracking server backed by the test Postgres, artifacts proxied to the S3 server.

Whatever this module starts, it stops (``TestStack.stop``); whatever was already running it leaves alone.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from services import localstack

PG_DB = "crucible_test"
MLFLOW_DB = "crucible_test_mlflow"
S3_KEY, S3_SECRET, BUCKET = "crucible-test", "crucible-test-secret", "crucible-test"


class TestStack:
    __test__ = False  # not a test class

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.cleanups: list[tuple[str, list[str]]] = []
        self.env: dict[str, str] = {}
        self.mlflow_proc: subprocess.Popen[bytes] | None = None
        self.mlflow_url = ""

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> dict[str, str]:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        pg_admin = self._postgres()
        redis_url = self._redis()
        s3_port = localstack.free_port(grpc_offset=True)
        self.procs.append(localstack.start_weed(data_dir=self.run_dir / "s3", s3_port=s3_port, access_key=S3_KEY,
                                                secret_key=S3_SECRET, bucket=BUCKET, log_path=self.run_dir / "s3.log"))
        self._recreate_db(pg_admin, PG_DB)
        self._recreate_db(pg_admin, MLFLOW_DB)
        base = pg_admin.rsplit("/", 1)[0]
        self.env = {
            "CRUCIBLE_ENV": "test",
            "CRUCIBLE_HOME": str(self.run_dir / "home"),
            # not the machine-wide default in /tmp: a scheduler that ran outside the tests leaves that file stale
            "CRUCIBLE_SCHEDULER_ALIVE_FILE": str(self.run_dir / "scheduler.alive"),
            "CRUCIBLE_DATABASE_URL": f"{base}/{PG_DB}",
            "CRUCIBLE_BROKER_URL": redis_url,
            "CRUCIBLE_S3_ENDPOINT": f"127.0.0.1:{s3_port}",
            "CRUCIBLE_S3_ACCESS_KEY": S3_KEY,
            "CRUCIBLE_S3_SECRET_KEY": S3_SECRET,
            "CRUCIBLE_S3_BUCKET": BUCKET,
            # short timings so lost workers and lost messages are noticed within seconds
            "CRUCIBLE_LEASE_SECONDS": "8",
            "CRUCIBLE_HEARTBEAT_SECONDS": "2",
            "CRUCIBLE_POLL_SECONDS": "0.5",
            "CRUCIBLE_SCHEDULER_INTERVAL_SECONDS": "0.3",
            "CRUCIBLE_REDISPATCH_AFTER_SECONDS": "30",
            "CRUCIBLE_CANCEL_GRACE_SECONDS": "10",
            "CRUCIBLE_WORKER_TORCH_THREADS": "2",
        }
        self._start_mlflow(f"{base}/{MLFLOW_DB}")
        return self.env

    def stop(self) -> None:
        localstack.stop(self.mlflow_proc)
        for proc in reversed(self.procs):
            localstack.stop(proc)
        for _, cmd in reversed(self.cleanups):
            subprocess.run(cmd, capture_output=True, timeout=60)

    # --- MLflow (slow to start: started early, waited for late) ------------------------------
    def _start_mlflow(self, backend: str) -> None:
        from shared.config import Settings

        port = localstack.free_port()
        self.mlflow_url = f"http://127.0.0.1:{port}"
        # keywords are the settings' field names (values as strings, validated like the environment's)
        values: dict[str, Any] = {k.removeprefix("CRUCIBLE_"): v for k, v in self.env.items()
                                  if k.startswith("CRUCIBLE_") and k != "CRUCIBLE_HOME"}
        settings = Settings(**values)
        self.mlflow_proc = localstack.start_mlflow_server(
            backend_uri=backend.replace("postgresql://", "postgresql+psycopg://", 1), port=port,
            artifacts_destination=f"s3://{BUCKET}/mlflow-artifacts", settings=settings,
            log_path=self.run_dir / "mlflow.log")
        self.env["CRUCIBLE_MLFLOW_TRACKING_URI"] = self.mlflow_url

    def wait_mlflow(self, timeout: float = 180) -> None:
        def ok() -> bool:
            with urllib.request.urlopen(self.mlflow_url + "/health", timeout=2) as r:
                return r.status == 200

        localstack.wait_until(ok, timeout=timeout, what="the MLflow server", proc=self.mlflow_proc,
                              log=self.run_dir / "mlflow.log", interval=1.0)

    # --- Postgres ----------------------------------------------------------------------------
    def _postgres(self) -> str:
        url = os.environ.get("CRUCIBLE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
        u = urlparse(url)
        if localstack.port_open(u.hostname or "127.0.0.1", u.port or 5432):
            return url
        initdb = _pg_bin("initdb")
        if initdb is None:
            raise RuntimeError("no Postgres answers on 127.0.0.1:5432 and initdb is not installed: install "
                               "PostgreSQL (apt-get install postgresql) or set CRUCIBLE_TEST_PG_URL")
        port = localstack.free_port()
        data = self.run_dir / "pg"
        data.mkdir(parents=True, exist_ok=True)
        as_postgres = os.geteuid() == 0  # the server refuses to run as root
        if as_postgres:
            shutil.chown(data, "postgres", "postgres")
            shutil.chown(self.run_dir, "postgres", "postgres")

        def run(*cmd: str) -> None:
            full = ["su", "postgres", "-c", " ".join(cmd)] if as_postgres else list(cmd)
            subprocess.run(full, check=True, capture_output=True, timeout=120)

        pg_ctl = str(Path(initdb).parent / "pg_ctl")
        run(initdb, "-D", str(data / "data"), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        run(pg_ctl, "-D", str(data / "data"), "-l", str(data / "pg.log"), "-w", "start",
            "-o", f"'-c listen_addresses=127.0.0.1 -p {port} -k {data}'")
        stop = [pg_ctl, "-D", str(data / "data"), "-m", "fast", "stop"]
        self.cleanups.append(("postgres", ["su", "postgres", "-c", " ".join(stop)] if as_postgres else stop))
        return f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"

    def _recreate_db(self, admin_url: str, name: str) -> None:
        import psycopg

        conninfo = admin_url.replace("postgresql+psycopg://", "postgresql://", 1)
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            conn.execute(f'CREATE DATABASE "{name}"')

    # --- Redis -------------------------------------------------------------------------------
    def _redis(self) -> str:
        url = os.environ.get("CRUCIBLE_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
        u = urlparse(url)
        if not localstack.port_open(u.hostname or "127.0.0.1", u.port or 6379):
            server = shutil.which("redis-server")
            if server is None:
                raise RuntimeError("no Redis answers on 127.0.0.1:6379 and redis-server is not installed: install it "
                                   "(apt-get install redis-server) or set CRUCIBLE_TEST_REDIS_URL")
            port = localstack.free_port()
            rdir = self.run_dir / "redis"
            rdir.mkdir(parents=True, exist_ok=True)
            proc = subprocess.Popen([server, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                                     "--appendonly", "no", "--dir", str(rdir)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            self.procs.append(proc)
            localstack.wait_until(lambda: localstack.port_open("127.0.0.1", port), timeout=20, what="redis-server",
                                  proc=proc)
            url = f"redis://127.0.0.1:{port}/13"
        import redis

        redis.Redis.from_url(url).flushdb()
        self.redis_url = url
        return url


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for root in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (root / name).exists():
            return str(root / name)
    return None


def wait_http(url: str, timeout: float = 60) -> None:
    def ok() -> bool:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status < 500

    localstack.wait_until(ok, timeout=timeout, what=url)


def now() -> float:
    return time.monotonic()
