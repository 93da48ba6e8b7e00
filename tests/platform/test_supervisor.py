"""The supervisor against real Postgres, S3 and MLflow: fenced leases, the lease kept during input preparation,
configuration errors at setup, the out-of-memory and infrastructure budgets, and the event channel."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from services.scheduler.reconciler import reconcile_once
from shared import lifecycle
from shared.config import get_settings
from shared.db import session_scope
from shared.lineage import latest_checkpoint
from shared.models import Artifact, Job, JobEvent, JobStatus, utcnow
from tests.conftest import ROOT, wait_for

# 2 steps per epoch with a small resnet18 at 32 px: about a second per epoch on 2 cores, a checkpoint each epoch.
TINY = {"kind": "ssl-train", "method": "msf", "experiment": "supervisor", "dataset": "builtin://shapes",
        "limit_train": 64, "limit_test": 64, "backbone": "resnet18", "stem": "imagenet", "batch_size": 32,
        "bank_size": 64, "topk": 3, "knn_every": 0, "knn_k": [1]}


def _submit(client, auth, **over) -> uuid.UUID:
    r = client.post("/v1/jobs", json={**TINY, **over}, headers=auth)
    assert r.status_code == 201, r.text
    return uuid.UUID(r.json()["id"])


def _job(job_id: uuid.UUID) -> Job:
    with session_scope() as s:
        job = s.get(Job, job_id)
        assert job is not None
        s.expunge(job)
        return job


def _settings(**over):
    return get_settings().model_copy(update={"WARM_CHILD": False, **over})


def _cancel(job_id: uuid.UUID) -> None:
    with session_scope() as s:
        job = s.get(Job, job_id)
        if job is not None and not job.status.terminal:
            lifecycle.terminate(s, job, JobStatus.CANCELLED, "test cleanup")


def _artifact_ids(job_id: uuid.UUID) -> set[uuid.UUID]:
    with session_scope() as s:
        return set(s.scalars(select(Artifact.id).where(Artifact.job_id == job_id)))


def _last_event_id(job_id: uuid.UUID, attempt: int) -> int:
    with session_scope() as s:
        return s.scalar(select(func.max(JobEvent.id)).where(JobEvent.job_id == job_id,
                                                            JobEvent.attempt == attempt)) or 0


def _row_unlocked(job_id: uuid.UUID) -> bool:
    """True when no transaction holds the job row (a frozen supervisor must not be frozen inside one)."""
    try:
        with session_scope() as s:
            s.execute(select(Job.id).where(Job.id == job_id).with_for_update(nowait=True))
        return True
    except OperationalError:
        return False


@pytest.mark.integration
def test_a_supervisor_frozen_past_its_lease_changes_nothing_when_resumed(client, auth, mlflow_ready):
    job_id = _submit(client, auth, epochs=500, name="frozen")
    env = {**os.environ, "CRUCIBLE_WARM_CHILD": "false"}
    code = ("import logging, sys; logging.basicConfig(level=logging.WARNING);"
            "from workers.runtime.supervisor import supervise;"
            "print('OUTCOME', supervise(sys.argv[1], 1, worker_id='frozen-worker', worker_kinds={'all'}))")
    sup = subprocess.Popen([sys.executable, "-c", code, str(job_id)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: len(_artifact_ids(job_id)) >= 2, timeout=180, what="two checkpoints of attempt 1")
        for _ in range(50):  # freeze it between transactions, as a stalled VM or a long GC pause would
            os.kill(sup.pid, signal.SIGSTOP)
            if _row_unlocked(job_id):
                break
            os.kill(sup.pid, signal.SIGCONT)
            time.sleep(0.05)
        artifacts = _artifact_ids(job_id)
        with session_scope() as s:
            resume_from = latest_checkpoint(s, job_id).id  # type: ignore[union-attr]

        # The lease lapses; the reconciler re-queues the job as attempt 2. The child keeps training meanwhile.
        time.sleep(get_settings().LEASE_SECONDS + 1)
        with session_scope() as s:
            reconcile_once(s, get_settings())
        job = _job(job_id)
        assert (job.status, job.attempt, job.worker_id) == (JobStatus.QUEUED, 2, None)
        last_event = _last_event_id(job_id, 1)  # includes the reconciler's own "retry" event
        time.sleep(3)  # more epochs, checkpoints and events from the superseded attempt pile up
        os.kill(sup.pid, signal.SIGCONT)
        out, _ = sup.communicate(timeout=60)
    finally:
        if sup.poll() is None:
            os.kill(sup.pid, signal.SIGCONT)
            sup.kill()
            sup.wait()
        job = _job(job_id)
        _cancel(job_id)  # 500 epochs: no other test's worker may pick it up

    assert "OUTCOME lease_lost" in out, out
    # it had late checkpoints and events to write (the child trained on while it was frozen) and wrote none
    late = re.search(r"dropped (\d+) events and (\d+) checkpoints/artifacts", out)
    assert late and int(late[1]) > 0 and int(late[2]) > 0, out
    assert (job.status, job.attempt, job.worker_id) == (JobStatus.QUEUED, 2, None)
    assert _artifact_ids(job_id) == artifacts
    assert _last_event_id(job_id, 1) == last_event
    with session_scope() as s:
        assert latest_checkpoint(s, job_id).id == resume_from  # type: ignore[union-attr]
        assert s.scalar(select(func.count()).select_from(JobEvent)
                        .where(JobEvent.job_id == job_id, JobEvent.attempt == 2,
                               JobEvent.type != "state")) == 0


@pytest.mark.integration
def test_a_slow_input_preparation_longer_than_the_lease_keeps_the_lease(client, auth, mlflow_ready, monkeypatch):
    from workers.runtime import supervisor

    settings = _settings(LEASE_SECONDS=2.0, POLL_SECONDS=0.3)
    job_id = _submit(client, auth, epochs=1, name="slow-inputs")
    seen: list[bool] = []
    real = supervisor.prepare_dataset

    def throttled(ref, **kw):  # a large dataset over a slow link: 4 leases long
        for _ in range(8):
            time.sleep(settings.LEASE_SECONDS / 2)
            seen.append(_job(job_id).lease_expires_at > utcnow())
        return real(ref, **kw)

    monkeypatch.setattr(supervisor, "prepare_dataset", throttled)
    stop = threading.Event()

    def reconciler() -> None:
        while not stop.wait(0.2):
            with session_scope() as s:
                reconcile_once(s, settings)

    t = threading.Thread(target=reconciler, daemon=True)
    t.start()
    try:
        outcome = supervisor.supervise(str(job_id), 1, worker_id="slow-worker", worker_kinds={"all"},
                                       settings=settings)
    finally:
        stop.set()
        t.join()
    job = _job(job_id)
    assert seen and all(seen), seen
    assert outcome == "succeeded" and job.status == JobStatus.SUCCEEDED, job.status_reason
    assert job.attempt == 1 and job.infra_failures == 0


_MISSING_ARCHIVE = {"uri": "s3://x/y", "source": "archive", "key": "cas/sha256/" + "0" * 64, "sha256": "0" * 64}


@pytest.mark.integration
@pytest.mark.parametrize("corrupt, names", [
    (lambda j: setattr(j, "spec", {**j.spec, "batch_size": "lots"}), "batch_size"),
    (lambda j: setattr(j, "inputs", {"dataset": _MISSING_ARCHIVE}), "dataset"),
], ids=["spec", "dataset"])
def test_an_attempt_whose_spec_or_dataset_does_not_load_fails_once_as_a_config_error(client, auth, mlflow_ready,
                                                                                       corrupt, names):
    from workers.runtime.supervisor import supervise

    job_id = _submit(client, auth, epochs=1, retries={"infra": 3, "user": 2})
    with session_scope() as s:
        corrupt(s.get(Job, job_id))
    outcome = supervise(str(job_id), 1, worker_id="cfg-worker", worker_kinds={"all"}, settings=_settings())
    job = _job(job_id)
    assert outcome == lifecycle.CONFIG_ERROR
    assert job.status == JobStatus.FAILED and job.attempt == 1
    assert job.infra_failures == 0 and job.user_failures == 0
    assert "configuration error" in job.status_reason and names in job.status_reason, job.status_reason
    with session_scope() as s:
        assert not s.scalars(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.type == "retry")).all()


def _claim(job_id: uuid.UUID, attempt: int, worker: str = "w") -> None:
    with session_scope() as s:
        assert lifecycle.claim(s, job_id=job_id, attempt=attempt, worker_id=worker, lease_s=60) is not None


def _end(job_id: uuid.UUID, attempt: int, outcome: str) -> Job:
    with session_scope() as s:
        lifecycle.finish_attempt(s, job_id=job_id, attempt=attempt, worker_id="w", outcome=outcome, reason=outcome)
    return _job(job_id)


@pytest.mark.integration
def test_out_of_memory_kills_have_their_own_small_budget(client, auth):
    job_id = _submit(client, auth, retries={"infra": 5, "oom": 1})
    _claim(job_id, 1)
    job = _end(job_id, 1, lifecycle.OOM)
    assert (job.status, job.attempt, job.infra_failures) == (JobStatus.QUEUED, 2, 0)
    _claim(job_id, 2)
    job = _end(job_id, 2, lifecycle.OOM)
    assert job.status == JobStatus.FAILED and "out-of-memory retry budget (1)" in job.status_reason


@pytest.mark.integration
def test_the_operator_caps_infrastructure_retries(client, auth, monkeypatch):
    monkeypatch.setattr(get_settings(), "MAX_INFRA_RETRIES", 1)
    job_id = _submit(client, auth, retries={"infra": 100})
    _claim(job_id, 1)
    assert _end(job_id, 1, lifecycle.INFRA_ERROR).status == JobStatus.QUEUED
    _claim(job_id, 2)
    job = _end(job_id, 2, lifecycle.INFRA_ERROR)
    assert job.status == JobStatus.FAILED and "CRUCIBLE_MAX_INFRA_RETRIES" in job.status_reason


@pytest.mark.integration
def test_writes_of_an_attempt_without_a_live_lease_are_refused(client, auth):
    job_id = _submit(client, auth)
    _claim(job_id, 1)
    with session_scope() as s:
        s.get(Job, job_id).lease_expires_at = utcnow()  # lapsed, not yet reconciled
    with pytest.raises(lifecycle.LeaseLost), session_scope() as s:
        lifecycle.fence(s, job_id=job_id, attempt=1, worker_id="w")
    with session_scope() as s:
        assert not lifecycle.renew_lease(s, job_id=job_id, attempt=1, worker_id="w", lease_s=60).held
        assert lifecycle.finish_attempt(s, job_id=job_id, attempt=1, worker_id="w",
                                        outcome=lifecycle.SUCCEEDED) is None
    assert _job(job_id).status == JobStatus.RUNNING
    _cancel(job_id)


@pytest.mark.integration
def test_named_outputs_reach_the_job_row_through_the_fenced_flush(client, auth):
    from workers.runtime.events import EventRelay
    from workers.runtime.protocol import encode_event

    job_id = _submit(client, auth)
    _claim(job_id, 1)
    relay = EventRelay(job_id, 1, run_id=None, tracker=None, worker_id="w", inputs={})
    relay.handle_event(encode_event("output", name="clusters", value=[0, 1, 2]))
    assert relay.flush()
    assert _job(job_id).outputs == {"clusters": [0, 1, 2]}
    with session_scope() as s:
        s.get(Job, job_id).lease_expires_at = utcnow()  # lapsed: a late output is dropped, not written
    relay.handle_event(encode_event("output", name="clusters", value=[9]))
    assert not relay.flush() and relay.dropped_events == 1
    assert _job(job_id).outputs == {"clusters": [0, 1, 2]}
    _cancel(job_id)


# --- no database needed -------------------------------------------------------------------------------------
def _relay():
    from workers.runtime.events import EventRelay

    return EventRelay(uuid.uuid4(), 1, run_id=None, tracker=None, worker_id="w", inputs={})


def test_stdout_cannot_forge_events_and_invalid_events_are_dropped():
    from workers.runtime.protocol import encode_event

    relay = _relay()
    forged = encode_event("result", values={"knn_top1_k1": 1.0})
    relay.handle_line(forged)  # printed by the training process: a log line, nothing more
    assert relay.result == {} and relay._events == [("log", {"line": forged})]
    for bad in ("not json", '{"type": "result"}', '{"type": "nope"}', '{"type": "progress", "done": -1, "total": 2}',
                '{"type": "checkpoint", "epoch": 1, "step": 1, "key": "k", "sha256": "xyz", "size": 1}'):
        relay.handle_event(bad)
    assert relay.invalid_events == 5 and relay.result == {} and not relay._artifacts
    relay.handle_event(forged)  # the same line on the event channel is an event
    assert relay.result == {"knn_top1_k1": 1.0}


def test_a_sigkill_the_supervisor_did_not_send_is_classified_by_its_evidence():
    from workers.runtime.supervisor import classify

    assert classify(-9, None, 60, [], oom=True)[0] == lifecycle.OOM
    assert classify(-9, None, 60, [], oom=False)[0] == lifecycle.INFRA_ERROR
    assert classify(-9, "cancel", 60, [], oom=True)[0] == lifecycle.CANCELLED
    assert classify(3, None, 60, ["configuration error: lower bank_size"]) == (
        lifecycle.CONFIG_ERROR, "configuration error: lower bank_size")


def test_the_warm_child_takes_a_job_and_a_dead_one_is_replaced_by_a_cold_start(tmp_path):
    import json

    from workers.runtime import warm
    from workers.runtime.protocol import EXIT_CONFIG, JOB_FILE

    settings = get_settings().model_copy(update={"WARM_CHILD": True, "WORK_DIR": tmp_path / "work"})
    workdir = tmp_path / "job"
    workdir.mkdir()
    job_id = str(uuid.uuid4())
    (workdir / JOB_FILE).write_text(json.dumps({"job_id": job_id, "attempt": 1, "kind": "ssl-train",
                                                "spec": {"kind": "ssl-train", "batch_size": "lots"}}))
    warm.prestart(settings)
    proc = warm.take_warm(workdir)
    assert proc is not None
    assert proc.stdout is not None
    out = proc.stdout.read()
    proc.wait(timeout=120)
    assert proc.returncode == EXIT_CONFIG and "batch_size" in out, out

    warm.prestart(settings)
    dead = warm._warm
    assert dead is not None
    warm.kill_group(dead, signal.SIGKILL)
    dead.wait(timeout=10)
    assert warm.take_warm(workdir) is None  # the job would start cold; the worker carries on
    warm.discard_warm()
