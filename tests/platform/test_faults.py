"""Fault suite on real services: Postgres stopped and restarted, the S3 server frozen (SIGSTOP) and resumed, Redis
restarted, each while jobs are submitted over HTTP to a real ``crucible api`` process. Nothing may answer 500,
every 201 job must exist afterwards, and recovery needs no restart of ours.

Postgres and Redis are PRIVATE servers this module starts (initdb/pg_ctl, redis-server on free ports): the
machine's own servers are never stopped. The S3 server is the test stack's SeaweedFS (the suite holds the stack).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from services import localstack
from tests.stack import _pg_bin

ROOT = Path(__file__).resolve().parent.parent.parent
SPEC = {"kind": "ssl-train", "dataset": "builtin://shapes", "limit_train": 256, "batch_size": 64, "bank_size": 128,
        "epochs": 1, "experiment": "faults"}


def test_stop_pids_reaps_exited_children_at_once():
    """`crucible down`/`demo` stop their own children: an exited child is a zombie until reaped, and waiting
    for a zombie to vanish used to take the whole stop timeout per process."""
    procs = [subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True) for _ in range(3)]
    time.sleep(0.5)  # all exited, none reaped
    started = time.monotonic()
    localstack.stop_pids([p.pid for p in procs], timeout=20)
    assert time.monotonic() - started < 2


class PrivatePostgres:
    """A throwaway cluster on its own port; stopping it touches nothing else."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, localstack.free_port()
        self.data = root / "data"
        self.as_postgres = os.geteuid() == 0
        initdb = _pg_bin("initdb")
        if initdb is None:
            pytest.skip("initdb is not installed")
        self.pg_ctl = str(Path(initdb).parent / "pg_ctl")
        root.mkdir(parents=True, exist_ok=True)
        if self.as_postgres:
            shutil.chown(root, "postgres", "postgres")
        self._run(initdb, "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        self.start()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *cmd: str) -> None:
        full = ["su", "postgres", "-c", " ".join(cmd)] if self.as_postgres else list(cmd)
        subprocess.run(full, check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        self._run(self.pg_ctl, "-D", str(self.data), "-l", str(self.root / "pg.log"), "-w", "start",
                  "-o", f"'-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root}'")

    def stop(self) -> None:
        self._run(self.pg_ctl, "-D", str(self.data), "-m", "fast", "-w", "stop")


@pytest.fixture(scope="module")
def private_pg(stack: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivatePostgres]:
    # not under pytest's tmp dir: that is private to root, and the server runs as the postgres user
    root = Path(tempfile.mkdtemp(prefix="crucible-faults-pg-"))
    pg = PrivatePostgres(root)
    try:
        from shared.db import upgrade_to_head

        upgrade_to_head(pg.url)
        yield pg
    finally:
        try:
            pg.stop()
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not installed")
    port, rdir = localstack.free_port(), tmp_path_factory.mktemp("faults-redis")
    box: dict[str, object] = {"port": port}

    def start() -> None:
        box["proc"] = subprocess.Popen([server, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                                        "--appendonly", "no", "--dir", str(rdir)],
                                       stdout=subprocess.DEVNULL, start_new_session=True)
        localstack.wait_until(lambda: localstack.port_open("127.0.0.1", port), timeout=20, what="redis-server")

    box["start"] = start
    start()
    try:
        yield box
    finally:
        localstack.stop(box["proc"])  # type: ignore[arg-type]


def _service(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "services.cli.main", *args], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, **env}, start_new_session=True)


@pytest.fixture(scope="module")
def api(private_pg: PrivatePostgres, private_redis: dict[str, object],
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    from services.projects.service import create_key

    logs = tmp_path_factory.mktemp("faults-logs")
    env = {"CRUCIBLE_DATABASE_URL": private_pg.url, "CRUCIBLE_BROKER_URL": f"redis://127.0.0.1:{private_redis['port']}/0",
           "CRUCIBLE_S3_READ_TIMEOUT_SECONDS": "3", "CRUCIBLE_QUEUE_WINDOW": "1000",
           "CRUCIBLE_REDISPATCH_AFTER_SECONDS": "4", "CRUCIBLE_SCHEDULER_INTERVAL_SECONDS": "0.5",
           "CRUCIBLE_SCHEDULER_ALIVE_FILE": str(logs / "alive")}
    port = localstack.free_port()
    procs = [_service(["api", "--port", str(port)], env, logs / "api.log"),
             _service(["scheduler"], env, logs / "scheduler.log")]
    url = f"http://127.0.0.1:{port}"
    engine = create_engine(private_pg.url, pool_pre_ping=True)
    try:
        localstack.wait_until(lambda: httpx.get(f"{url}/healthz", timeout=2).status_code == 200, timeout=60,
                              what="the API", proc=procs[0], log=logs / "api.log")
        with Session(engine) as s, s.begin():
            _, token = create_key(session=s, project_name=f"faults-{uuid.uuid4().hex[:6]}")
        yield {"url": url, "token": token, "engine": engine, "procs": procs, "logs": logs}
    finally:
        localstack.stop_pids([p.pid for p in procs], timeout=10)
        engine.dispose()


class Load:
    """Submits jobs from a thread until stopped, recording every status and the slowest answer."""

    def __init__(self, url: str, token: str) -> None:
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
        self.statuses: list[int] = []
        self.created: list[str] = []
        self.slowest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        self.http.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                r = self.http.post("/v1/jobs", json=SPEC)
            except httpx.HTTPError:
                self.statuses.append(-1)
                continue
            self.slowest = max(self.slowest, time.monotonic() - t0)
            self.statuses.append(r.status_code)
            if r.status_code == 201:
                self.created.append(r.json()["id"])
            elif r.status_code == 503:
                assert r.headers.get("retry-after"), r.text
            time.sleep(0.02)

    def created_after(self, n: int, timeout: float) -> None:
        localstack.wait_until(lambda: len(self.created) >= n, timeout=timeout, what=f"{n} accepted submissions")


def _job_ids(engine: object) -> set[str]:
    from shared.models import Job

    with Session(engine) as s:  # type: ignore[arg-type]
        return {str(i) for i in s.scalars(select(Job.id))}


def _timed(http: httpx.Client, method: str, path: str) -> tuple[int, float]:
    t0 = time.monotonic()
    r = http.request(method, path)
    return r.status_code, time.monotonic() - t0


@pytest.mark.integration
def test_postgres_down_is_503_within_seconds_and_recovers_without_a_restart(api, private_pg):
    http = httpx.Client(base_url=str(api["url"]), headers={"Authorization": f"Bearer {api['token']}"}, timeout=30)
    with Load(str(api["url"]), str(api["token"])) as load:
        load.created_after(5, timeout=30)
        job_id = load.created[0]
        private_pg.stop()
        try:
            time.sleep(1.0)
            for method, path in (("GET", "/readyz"), ("GET", f"/v1/jobs/{job_id}"), ("GET", "/v1/jobs"),
                                 ("GET", "/v1/datasets"), ("GET", "/v1/experiments"), ("GET", "/metrics/queues")):
                code, took = _timed(http, method, path)
                assert code == 503, (path, code)
                assert took < 8, (path, took)
            down_statuses = len(load.statuses)
            time.sleep(1.0)
        finally:
            private_pg.start()
        before = len(load.created)
        load.created_after(before + 5, timeout=30)  # recovered: no restart of the API
    assert 503 in load.statuses and down_statuses > 5
    assert 500 not in load.statuses and -1 not in load.statuses, sorted(set(load.statuses))
    assert load.slowest < 10
    assert set(load.created) <= _job_ids(api["engine"])  # every 201 job is there
    assert http.get("/readyz").status_code in (200, 503)  # answers (MLflow state aside)
    http.close()


@pytest.mark.integration
def test_s3_frozen_is_503_within_seconds_and_recovers(api, stack):
    weed = next(p for p in stack.procs if "weed" in str(p.args[0]))  # type: ignore[attr-defined]
    http = httpx.Client(base_url=str(api["url"]), headers={"Authorization": f"Bearer {api['token']}"}, timeout=60)
    from tests.api.test_datasets_api import imagefolder, make_tar

    data = make_tar(imagefolder())
    os.kill(weed.pid, signal.SIGSTOP)
    try:
        code, took = _timed(http, "GET", "/readyz")
        assert code == 503 and took < 6, (code, took)
        t0 = time.monotonic()
        r = http.post("/v1/datasets", data={"name": "frozen"}, files={"file": ("d.tar.gz", data)})
        assert r.status_code == 503 and r.headers.get("retry-after"), r.text
        assert time.monotonic() - t0 < 20
        assert http.post("/v1/jobs", json=SPEC).status_code == 201  # the job path does not need S3
    finally:
        os.kill(weed.pid, signal.SIGCONT)
    r = http.post("/v1/datasets", data={"name": "thawed"}, files={"file": ("d.tar.gz", data)})
    assert r.status_code == 201, r.text
    assert http.post("/v1/jobs", json=SPEC).status_code == 201
    http.close()


@pytest.mark.integration
def test_redis_restart_during_submissions_loses_no_job(api, private_redis):
    import redis

    from shared.models import Outbox

    with Load(str(api["url"]), str(api["token"])) as load:
        load.created_after(len(load.created) + 5, timeout=30)
        localstack.stop(private_redis["proc"])  # type: ignore[arg-type]
        time.sleep(1.5)
        private_redis["start"]()  # type: ignore[operator]
        restarted = time.time()
        load.created_after(len(load.created) + 5, timeout=30)
    assert 500 not in load.statuses and set(load.statuses) <= {201}, sorted(set(load.statuses))
    scheduler = api["procs"][1]  # type: ignore[index]
    assert scheduler.poll() is None, "the scheduler died with the broker"
    ids = set(load.created)

    def all_published_since_restart() -> bool:
        with Session(api["engine"]) as s:  # type: ignore[arg-type]
            rows = s.execute(select(Outbox.job_id, Outbox.published_at, Outbox.last_error)
                             .where(Outbox.job_id.in_([uuid.UUID(i) for i in ids]))).all()
        ok = {str(j) for j, at, err in rows if at is not None and err is None and at.timestamp() >= restarted}
        return ids <= ok

    # messages published before the restart died with it; the reconciler publishes those jobs again
    localstack.wait_until(all_published_since_restart, timeout=40, what="every job published after the restart")
    depth = redis.Redis(port=int(private_redis["port"])).llen("crucible.ssl-trainer")  # type: ignore[arg-type]
    assert depth >= len(ids)


@pytest.mark.integration
def test_redis_stopped_mid_route_request_is_a_503_within_seconds_not_a_hang(api, private_redis):
    """A /v1/route waiting on a replica's reply when Redis dies: the waiting request and the next ones answer 503
    (Retry-After) within seconds instead of hanging until their deadline; after the restart the API serves
    again (here: 503 "no ready router replica", the fake replica's announcement died with Redis)."""
    import redis

    from shared import serving
    from shared.models import Artifact, Project

    http = httpx.Client(base_url=str(api["url"]), headers={"Authorization": f"Bearer {api['token']}"}, timeout=60)
    job_id = http.post("/v1/jobs", json=SPEC).json()["id"]  # the fake replica's job: the API checks the project
    with Session(api["engine"]) as s, s.begin():  # type: ignore[arg-type]
        project = s.scalars(select(Project).where(Project.name.like("faults-%"))).one()
        art = Artifact(project_id=project.id, kind="expert-set", name="faults-set", bucket="b", key="k/set.tar",
                       sha256="f" * 64, size_bytes=1, meta={})
        s.add(art)
        s.flush()
        art_id, project_id = str(art.id), str(project.id)
    # a replica that announces itself ready and never answers: the request waits on its reply list
    r = redis.Redis(port=int(private_redis["port"]))  # type: ignore[arg-type]
    ann = serving.Announcement(replica_id="fake-replica", job_id=job_id, project_id=project_id, expert_set=art_id,
                               expert_set_name="faults-set", experts=["e0"], all_experts=["e0"], state="ready",
                               fallback_margin=0.0, context_length=512, max_new_tokens=8)
    r.set(serving.replica_key("fake-replica"), ann.model_dump_json(), ex=120)
    r.sadd(serving.set_index_key("f" * 64), "fake-replica")

    answer: dict[str, object] = {}

    def ask() -> None:
        t0 = time.monotonic()
        resp = http.post("/v1/route", json={"expert_set": art_id, "text": "hello", "timeout_s": 60})
        answer.update(code=resp.status_code, at=time.monotonic(), took=time.monotonic() - t0,
                      retry=resp.headers.get("retry-after"), body=resp.text)

    waiting = threading.Thread(target=ask, daemon=True)
    waiting.start()
    localstack.wait_until(lambda: r.llen(serving.queue_key("fake-replica")) == 1, timeout=20,
                          what="the route request queued for the fake replica")
    localstack.stop(private_redis["proc"])  # type: ignore[arg-type]
    stopped = time.monotonic()
    try:
        waiting.join(timeout=30)
        assert not waiting.is_alive(), "the waiting request hung after Redis stopped"
        assert answer["code"] == 503 and answer["retry"], answer
        assert float(answer["at"]) - stopped < 8, answer  # type: ignore[arg-type]
        code, took = _timed(http, "POST", "/v1/route")  # no body: validation answers first, Redis is not needed
        assert code == 422
        down = http.post("/v1/generate", json={"expert_set": art_id, "text": "hello", "timeout_s": 60})
        assert down.status_code == 503 and "broker" in down.text, down.text
    finally:
        private_redis["start"]()  # type: ignore[operator]
    after = http.post("/v1/route", json={"expert_set": art_id, "text": "hello", "timeout_s": 5})
    assert after.status_code == 503 and "no ready router replica" in after.text, after.text
    http.close()
