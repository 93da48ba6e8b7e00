"""The supervisor: what the Celery task runs. It never imports torch and never touches CUDA.

claim → inputs (dataset, resume checkpoint) → MLflow run (new, or the job's existing one) → child process in its
own process group → relay events, renew the lease, poll for cancel / deadline / worker shutdown → map the exit to
an outcome → close the MLflow run when the job is final. See ``../shared/platform-design.md`` §A.4.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared import lifecycle
from shared.config import Settings, get_settings
from shared.db import session_scope
from shared.lineage import latest_checkpoint
from shared.models import Job, Worker
from workers.runtime.events import EventRelay
from workers.runtime.inputs import ResumeRefused, fetch_resume_point, prepare_checkpoint, prepare_dataset
from workers.runtime.protocol import EXIT_CONFIG, EXIT_OK, EXIT_PREEMPTED, JOB_FILE, RANK0_EXIT_FILE

log = logging.getLogger("crucible.supervisor")

# Set by the worker's shutdown signal handler: running children are asked to checkpoint and stop.
SHUTDOWN = threading.Event()


@dataclass
class Attempt:
    job_id: uuid.UUID
    attempt: int
    kind: str
    spec: dict[str, Any]
    inputs: dict[str, Any]
    project: str
    experiment: str
    name: str | None
    run_id: str | None
    max_runtime_s: float
    gpus: int
    workdir: Path = field(default=Path("."))
    input_jobs: list[str] = field(default_factory=list)  # jobs whose checkpoints this attempt consumes


def supervise(job_id: str, attempt: int, *, worker_id: str, worker_kinds: set[str],
              settings: Settings | None = None) -> str:
    """Run one delivery of (job_id, attempt). Returns the outcome (or 'skipped' for a duplicate delivery)."""
    settings = settings or get_settings()
    a = _claim(uuid.UUID(job_id), attempt, worker_id, worker_kinds, settings)
    if a is None:
        log.info("job %s attempt %s: already claimed, stale or cancelled; nothing to do", job_id, attempt)
        return "skipped"
    _set_current_job(worker_id, a.job_id)
    try:
        return _run_attempt(a, worker_id=worker_id, settings=settings)
    finally:
        _set_current_job(worker_id, None)
        if a.workdir.exists() and a.workdir != Path("."):
            shutil.rmtree(a.workdir, ignore_errors=True)


def _claim(job_id: uuid.UUID, attempt: int, worker_id: str, kinds: set[str], settings: Settings) -> Attempt | None:
    with session_scope() as s:
        job = lifecycle.claim(s, job_id=job_id, attempt=attempt, worker_id=worker_id, lease_s=settings.LEASE_SECONDS)
        if job is None:
            return None
        if "all" not in kinds and job.worker_kind not in kinds:
            # Routing makes this impossible unless queues were misconfigured; give the job back untouched.
            raise RuntimeError(f"worker serving {sorted(kinds)} received a {job.worker_kind} job; check queue config")
        exp = job_experiment(s, job)
        return Attempt(job.id, job.attempt, job.kind, job.spec, job.inputs, exp[0], exp[1], job.name,
                       job.mlflow_run_id, float(job.spec.get("resources", {}).get("max_runtime_s", 86400)),
                       int(job.spec.get("resources", {}).get("gpus", 0)))


def job_experiment(session: Any, job: Job) -> tuple[str, str]:
    from shared.models import Experiment, Project

    exp = session.get(Experiment, job.experiment_id)
    proj = session.get(Project, job.project_id)
    return proj.name, exp.name


def _run_attempt(a: Attempt, *, worker_id: str, settings: Settings) -> str:
    from shared.storage import ObjectStore
    from shared.tracking import Tracker

    relay: EventRelay | None = None
    try:
        store = ObjectStore(settings)
        tracker = Tracker(settings)
        a.workdir = settings.work_dir / f"{a.job_id}-{a.attempt}-{uuid.uuid4().hex[:6]}"
        a.workdir.mkdir(parents=True)
        run_id = _ensure_run(a, tracker)
        relay = EventRelay(a.job_id, a.attempt, run_id=run_id, tracker=tracker, worker_id=worker_id,
                           inputs=a.inputs)
        job_file = _prepare(a, store=store, settings=settings, relay=relay, tracker=tracker, run_id=run_id)
    except ResumeRefused as e:
        return _finish(a, worker_id, lifecycle.CONFIG_ERROR, str(e), relay, settings)
    except Exception as e:  # object store / MLflow / DB trouble: not the method's fault
        log.exception("job %s: setting up the attempt failed", a.job_id)
        return _finish(a, worker_id, lifecycle.INFRA_ERROR, f"worker could not set up the attempt: {e}", relay,
                       settings)
    return _watch(a, job_file, relay=relay, worker_id=worker_id, settings=settings)


def _ensure_run(a: Attempt, tracker: Any) -> str:
    if a.run_id:
        tracker.reopen(a.run_id, a.attempt)
        return a.run_id
    exp_id = tracker.ensure_experiment(f"{a.project}/{a.experiment}")
    run_id = tracker.create_run(experiment_id=exp_id, run_name=a.name or f"{a.kind}-{str(a.job_id)[:8]}",
                                job_id=str(a.job_id), kind=a.kind, spec=a.spec, project=a.project)
    from sqlalchemy import update

    from shared.models import Experiment

    with session_scope() as s:
        job = s.get(Job, a.job_id)
        assert job is not None
        job.mlflow_run_id = run_id
        s.execute(update(Experiment).where(Experiment.id == job.experiment_id,
                                           Experiment.mlflow_experiment_id.is_(None))
                  .values(mlflow_experiment_id=exp_id))
    a.run_id = run_id
    return run_id


def _prepare(a: Attempt, *, store: Any, settings: Settings, relay: EventRelay, tracker: Any, run_id: str) -> Path:
    import json

    from shared.specs import parse_spec

    spec = parse_spec(a.spec)
    child_inputs: dict[str, Any] = {}
    for name, ref in a.inputs.items():
        if name == "dataset":
            child_inputs[name] = prepare_dataset(ref, store=store, settings=settings)
            if a.attempt == 1:
                tracker.log_dataset(run_id, name=ref.get("name") or ref["uri"], digest=ref.get("sha256") or ref["uri"],
                                    source=ref["uri"], source_type="s3" if ref.get("source") else "builtin",
                                    profile=ref.get("stats"))
        elif name != "checkpoints":
            child_inputs[name] = ref
    resume: dict[str, Any] | None = None
    with session_scope() as s:
        checkpoints = {}
        for name, ref in (a.inputs.get("checkpoints") or {}).items():
            checkpoints[name] = prepare_checkpoint(s, name, ref, store=store, workdir=a.workdir)
            relay.add_lineage(checkpoints[name]["artifact_id"])
            if checkpoints[name]["job_id"]:
                a.input_jobs.append(checkpoints[name]["job_id"])
        if checkpoints:
            child_inputs["checkpoints"] = checkpoints
        ckpt = latest_checkpoint(s, a.job_id)
        if ckpt is not None:
            point = fetch_resume_point(ckpt, critical=spec.critical_config(), store=store, workdir=a.workdir)
            resume = {"path": str(point.path), "artifact_id": str(point.artifact_id), "epoch": point.epoch,
                      "step": point.step}
            relay.resumed_from(point.artifact_id)
            lifecycle.add_event(s, a.job_id, a.attempt, "resume", artifact_id=str(point.artifact_id),
                                epoch=point.epoch, step=point.step)
    job_file = a.workdir / JOB_FILE
    job_file.write_text(json.dumps({"job_id": str(a.job_id), "attempt": a.attempt, "kind": a.kind, "spec": a.spec,
                                    "inputs": child_inputs, "resume": resume, "run_id": run_id}))
    return job_file


def _spawn(a: Attempt, settings: Settings) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CRUCIBLE_JOB_ID": str(a.job_id)}
    if a.gpus > 1:
        # One process per GPU on this node; torchrun owns rendezvous (--standalone picks a free port).
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={a.gpus}",
               "-m", "workers.runtime.child", str(a.workdir)]
    else:
        cmd = [sys.executable, "-m", "workers.runtime.child", str(a.workdir)]
    return subprocess.Popen(
        cmd, cwd=a.workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
        start_new_session=True,  # own process group: cancel kills the method and everything it started
        preexec_fn=_die_with_parent, errors="replace",
    )


def _die_with_parent() -> None:
    """If the worker is SIGKILLed, the kernel kills the child too (no orphaned training eating the GPU)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: the child's own parent watchdog still exits


def _watch(a: Attempt, job_file: Path, *, relay: EventRelay, worker_id: str, settings: Settings) -> str:
    proc = _spawn(a, settings)
    lines: queue.Queue[str | None] = queue.Queue()
    reader = threading.Thread(target=_pump, args=(proc, lines), daemon=True)
    reader.start()
    tail: deque[str] = deque(maxlen=40)
    started = time.monotonic()
    last_poll = 0.0
    stop_reason: str | None = None
    term_at: float | None = None
    eof = False
    log.info("job %s attempt %d: child pid %d started", a.job_id, a.attempt, proc.pid)
    while True:
        try:
            line = lines.get(timeout=0.2)
            if line is None:
                eof = True
            else:
                tail.append(line)
                relay.handle_line(line)
                continue  # drain output before doing periodic work
        except queue.Empty:
            pass
        now = time.monotonic()
        if eof and proc.poll() is not None:
            break
        if now - last_poll >= settings.POLL_SECONDS:
            last_poll = now
            lease = relay.flush(lease_s=settings.LEASE_SECONDS)
            if stop_reason is None:
                if not lease.held:
                    stop_reason = "lease_lost"
                    _signal_group(proc, signal.SIGKILL)
                elif lease.cancel_requested:
                    stop_reason = "cancel"
                elif now - started > a.max_runtime_s:
                    stop_reason = "deadline"
                elif SHUTDOWN.is_set():
                    stop_reason = "shutdown"
                if stop_reason in ("cancel", "deadline", "shutdown"):
                    log.info("job %s: stopping child (%s): SIGTERM, then SIGKILL after %.0fs", a.job_id,
                             stop_reason, settings.CANCEL_GRACE_SECONDS)
                    _signal_group(proc, signal.SIGTERM)
                    term_at = now
        if term_at is not None and now - term_at > settings.CANCEL_GRACE_SECONDS and proc.poll() is None:
            _signal_group(proc, signal.SIGKILL)
            term_at = float("inf")
    rc = proc.returncode
    if a.gpus > 1:  # torchrun reports 1 for any failed rank; rank 0 recorded what actually happened
        try:
            rc = int((a.workdir / RANK0_EXIT_FILE).read_text())
        except (OSError, ValueError):
            pass
    _signal_group(proc, signal.SIGKILL)  # anything the method left behind in its group
    if stop_reason == "lease_lost":
        log.warning("job %s attempt %d: lease lost (reconciled elsewhere); child killed, state untouched",
                    a.job_id, a.attempt)
        relay.flush(lease_s=settings.LEASE_SECONDS)
        return "lease_lost"
    outcome, reason = _classify(rc, stop_reason, a, list(tail))
    return _finish(a, worker_id, outcome, reason, relay, settings)


def _classify(rc: int, stop_reason: str | None, a: Attempt, tail: list[str]) -> tuple[str, str | None]:
    last_error = next((ln for ln in reversed(tail) if ln.strip() and not ln.startswith("@@")), "")
    if stop_reason == "cancel":
        return lifecycle.CANCELLED, "cancelled on request"
    if stop_reason == "deadline":
        return lifecycle.USER_ERROR, f"exceeded resources.max_runtime_s={a.max_runtime_s:.0f}"
    if rc == EXIT_OK:
        return lifecycle.SUCCEEDED, None
    if rc == EXIT_PREEMPTED:
        why = "worker shutting down" if stop_reason == "shutdown" else "method stopped on SIGTERM"
        return lifecycle.PREEMPTED, f"preempted ({why}) after checkpointing"
    if rc == EXIT_CONFIG:
        return lifecycle.CONFIG_ERROR, last_error or "the job cannot run as specified"
    if rc < 0:
        sig = signal.Signals(-rc).name
        return lifecycle.INFRA_ERROR, f"method process killed by {sig} (out of memory?)"
    return lifecycle.USER_ERROR, f"method failed (exit code {rc}): {last_error}"[:2000]


def _finish(a: Attempt, worker_id: str, outcome: str, reason: str | None, relay: EventRelay | None,
            settings: Settings) -> str:
    result = relay.result if relay is not None else None
    if relay is not None:
        relay.flush(lease_s=settings.LEASE_SECONDS)
    with session_scope() as s:
        status = lifecycle.finish_attempt(s, job_id=a.job_id, attempt=a.attempt, worker_id=worker_id,
                                          outcome=outcome, reason=reason, result=result)
    log.info("job %s attempt %d: %s -> %s (%s)", a.job_id, a.attempt, outcome, status, reason or "")
    if status is not None and status.terminal and a.run_id and relay is not None:
        relay.close_run(status.value)
        if status.value == "succeeded" and result:
            _report_to_input_runs(a, result, relay)
    return outcome


def _report_to_input_runs(a: Attempt, result: dict[str, float], relay: EventRelay) -> None:
    """An evaluation's numbers also belong on the runs of the checkpoints it evaluated (lineage in MLflow)."""
    from shared.specs import SPEC_MODELS

    if not SPEC_MODELS[a.kind].report_results_to_inputs:
        return
    with session_scope() as s:
        runs = [j.mlflow_run_id for jid in a.input_jobs if (j := s.get(Job, uuid.UUID(jid))) and j.mlflow_run_id]
    for run_id in runs:
        try:
            relay.tracker.log_metrics(run_id, [(f"{a.kind}.{k}", v, 0) for k, v in result.items()])
            relay.tracker.set_tags(run_id, {f"crucible.{a.kind}.{a.job_id}": str(a.run_id)})
        except Exception as e:  # best effort: the evaluation's own run has the numbers
            log.warning("could not report results to MLflow run %s: %s", run_id, e)


def _pump(proc: subprocess.Popen[str], lines: queue.Queue[str | None]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.put(line.rstrip("\n"))
    lines.put(None)


def _signal_group(proc: subprocess.Popen[str], sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _set_current_job(worker_id: str, job_id: uuid.UUID | None) -> None:
    try:
        with session_scope() as s:
            w = s.get(Worker, worker_id)
            if w is not None:
                w.current_job_id = job_id
    except Exception:  # bookkeeping only
        log.warning("could not record current job on worker row", exc_info=True)
