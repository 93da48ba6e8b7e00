"""The supervisor: what the Celery task runs. It never imports torch and never touches CUDA.

claim → lease keeper (renews from now on) → inputs (dataset, resume checkpoint) → MLflow run (new, or the job's
existing one) → child process (warm or cold, see warm.py) in its own process group → relay its events (own
channel) and logs, poll for cancel / deadline / worker shutdown → map the exit to an outcome → close the MLflow
run when the job is final. Every write is fenced by the attempt's lease (``lifecycle.fence``): an attempt that
lost it writes nothing. See ``../shared/platform-design.md`` §A.4.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from shared import lifecycle
from shared.config import Settings, get_settings
from shared.db import session_scope
from shared.lineage import latest_checkpoint
from shared.models import Job, Worker
from workers.runtime.events import EventRelay
from workers.runtime.inputs import ResumeRefused, fetch_resume_point, prepare_checkpoint, prepare_dataset
from workers.runtime.lease import LeaseKeeper
from workers.runtime.protocol import EVENTS_FIFO, EXIT_CONFIG, EXIT_OK, EXIT_PREEMPTED, JOB_FILE, RANK0_EXIT_FILE
from workers.runtime.resources import more_ooms as _more_ooms
from workers.runtime.resources import oom_kills
from workers.runtime.warm import kill_group, prestart, spawn_cold, take_warm

log = logging.getLogger("crucible.supervisor")

# Set by the worker's shutdown signal handler: running children are asked to checkpoint and stop.
SHUTDOWN = threading.Event()
LEASE_LOST = "lease_lost"


class SetupConfigError(Exception):
    """The attempt cannot be set up as specified (spec or dataset): a configuration error, not retried."""


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
    proc: subprocess.Popen[str] | None = None


def supervise(job_id: str, attempt: int, *, worker_id: str, worker_kinds: set[str],
              settings: Settings | None = None) -> str:
    """Run one delivery of (job_id, attempt). Returns the outcome (or 'skipped' for a duplicate delivery)."""
    settings = settings or get_settings()
    a = _claim(uuid.UUID(job_id), attempt, worker_id, worker_kinds, settings)
    if a is None:
        log.info("job %s attempt %s: already claimed, stale or cancelled; nothing to do", job_id, attempt)
        return "skipped"

    def stop_method() -> None:  # the lease is gone: whatever the method does now is wasted
        if a.proc is not None:
            kill_group(a.proc, signal.SIGKILL)

    keeper = LeaseKeeper(a.job_id, a.attempt, worker_id, lease_s=settings.LEASE_SECONDS,
                         interval_s=settings.POLL_SECONDS, on_lost=stop_method).start()
    _set_current_job(worker_id, a.job_id)
    try:
        return _run_attempt(a, keeper, worker_id=worker_id, settings=settings)
    finally:
        keeper.stop()
        _set_current_job(worker_id, None)
        if a.workdir.exists() and a.workdir != Path("."):
            shutil.rmtree(a.workdir, ignore_errors=True)
        if not SHUTDOWN.is_set():
            prestart(settings)  # the next job's child imports while this worker waits for it


def _claim(job_id: uuid.UUID, attempt: int, worker_id: str, kinds: set[str], settings: Settings) -> Attempt | None:
    with session_scope() as s:
        job = lifecycle.claim(s, job_id=job_id, attempt=attempt, worker_id=worker_id, lease_s=settings.LEASE_SECONDS)
        if job is None:
            return None
        if "all" not in kinds and job.worker_kind not in kinds:
            # Routing makes this impossible unless queues were misconfigured; give the job back untouched.
            raise RuntimeError(f"worker serving {sorted(kinds)} received a {job.worker_kind} job; check queue config")
        exp = job_experiment(s, job)
        resources = job.spec.get("resources") or {}
        return Attempt(job.id, job.attempt, job.kind, job.spec, job.inputs, exp[0], exp[1], job.name,
                       job.mlflow_run_id, float(resources.get("max_runtime_s", 86400)), int(resources.get("gpus", 0)))


def job_experiment(session: Any, job: Job) -> tuple[str, str]:
    from shared.models import Experiment, Project

    exp = session.get(Experiment, job.experiment_id)
    proj = session.get(Project, job.project_id)
    return proj.name, exp.name


def _run_attempt(a: Attempt, keeper: LeaseKeeper, *, worker_id: str, settings: Settings) -> str:
    from shared.storage import ObjectStore
    from shared.tracking import Tracker

    relay: EventRelay | None = None
    try:
        spec = _parse_spec(a)
        store = ObjectStore(settings)
        tracker = Tracker(settings)
        a.workdir = settings.work_dir / f"{a.job_id}-{a.attempt}-{uuid.uuid4().hex[:6]}"
        a.workdir.mkdir(parents=True)
        run_id = _ensure_run(a, tracker, worker_id)
        relay = EventRelay(a.job_id, a.attempt, run_id=run_id, tracker=tracker, worker_id=worker_id,
                           inputs=a.inputs)
        _prepare(a, spec, worker_id=worker_id, store=store, settings=settings, relay=relay, tracker=tracker,
                 run_id=run_id)
    except lifecycle.LeaseLost:
        log.warning("job %s attempt %d: lease lost while setting up; nothing recorded", a.job_id, a.attempt)
        return LEASE_LOST
    except (ResumeRefused, SetupConfigError) as e:
        return _finish(a, worker_id, lifecycle.CONFIG_ERROR, str(e), relay, settings)
    except Exception as e:
        problem = _config_problem(e)
        if problem is not None:
            return _finish(a, worker_id, lifecycle.CONFIG_ERROR, problem, relay, settings)
        # object store / MLflow / DB trouble: not the method's fault
        log.exception("job %s: setting up the attempt failed", a.job_id)
        return _finish(a, worker_id, lifecycle.INFRA_ERROR, f"worker could not set up the attempt: {e}", relay,
                       settings)
    if keeper.lost.is_set():
        return LEASE_LOST
    return _watch(a, keeper, relay=relay, worker_id=worker_id, settings=settings)


def _parse_spec(a: Attempt) -> Any:
    from shared.specs import parse_spec

    try:
        return parse_spec(a.spec)
    except (ValidationError, ValueError, KeyError, TypeError) as e:
        raise SetupConfigError(
            f"configuration error: the job's {a.kind} spec does not load on this worker ({_short(e)}); fix the "
            "fields named here and submit a new job (or run a worker of the platform version that accepted it)"
        ) from e


def _config_problem(e: BaseException) -> str | None:
    """A config-error reason for input failures that retrying cannot fix, else None (infrastructure)."""
    from minio.error import S3Error

    from shared.data.base import DatasetError

    if isinstance(e, DatasetError):
        return f"configuration error: the dataset cannot be loaded ({_short(e)}); fix or re-register the dataset"
    if isinstance(e, S3Error) and e.code in ("NoSuchKey", "NoSuchBucket", "AccessDenied"):
        return (f"configuration error: an input is missing from the object store ({e.code}: {e.object_name or ''})"
                "; re-upload or re-register the dataset (or checkpoint) and submit a new job")
    if isinstance(e, FileNotFoundError | ValueError):  # a checkpoint input with no checkpoint, an unknown source
        return f"configuration error: an input cannot be prepared ({_short(e)}); check the job's dataset and inputs"
    return None


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 600 else text[:600] + "…"


def _ensure_run(a: Attempt, tracker: Any, worker_id: str) -> str:
    if a.run_id:
        tracker.reopen(a.run_id, a.attempt)
        return a.run_id
    exp_id = tracker.ensure_experiment(f"{a.project}/{a.experiment}")
    run_id = tracker.create_run(experiment_id=exp_id, run_name=a.name or f"{a.kind}-{str(a.job_id)[:8]}",
                                job_id=str(a.job_id), kind=a.kind, spec=a.spec, project=a.project)
    from sqlalchemy import update

    from shared.models import Experiment

    with session_scope() as s:
        lifecycle.fence(s, job_id=a.job_id, attempt=a.attempt, worker_id=worker_id)
        job = s.get(Job, a.job_id)
        assert job is not None
        job.mlflow_run_id = run_id
        s.execute(update(Experiment).where(Experiment.id == job.experiment_id,
                                           Experiment.mlflow_experiment_id.is_(None))
                  .values(mlflow_experiment_id=exp_id))
    a.run_id = str(run_id)
    return a.run_id


def _prepare(a: Attempt, spec: Any, *, worker_id: str, store: Any, settings: Settings, relay: EventRelay,
             tracker: Any, run_id: str) -> Path:
    import json

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
            lifecycle.fence(s, job_id=a.job_id, attempt=a.attempt, worker_id=worker_id)
            lifecycle.add_event(s, a.job_id, a.attempt, "resume", artifact_id=str(point.artifact_id),
                                epoch=point.epoch, step=point.step)
    job_file = a.workdir / JOB_FILE
    job_file.write_text(json.dumps({"job_id": str(a.job_id), "attempt": a.attempt, "kind": a.kind, "spec": a.spec,
                                    "inputs": child_inputs, "resume": resume, "run_id": run_id}))
    return job_file


def _watch(a: Attempt, keeper: LeaseKeeper, *, relay: EventRelay, worker_id: str, settings: Settings) -> str:
    items: queue.Queue[tuple[str, str | None]] = queue.Queue()
    fifo = a.workdir / EVENTS_FIFO
    os.mkfifo(fifo, 0o600)
    # Read end first (non-blocking open needs no writer), then a writer of our own so the reader sees EOF only
    # after we close it at the end, however often the child's side opens and closes.
    read_fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    os.set_blocking(read_fd, True)
    keep_fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    oom_before = oom_kills()
    proc = take_warm(a.workdir) if a.gpus <= 1 else None
    warm = proc is not None
    if proc is None:
        proc = spawn_cold(a.workdir, str(a.job_id), a.gpus)
    a.proc = proc
    if keeper.lost.is_set():
        kill_group(proc, signal.SIGKILL)
    threading.Thread(target=_pump_stdout, args=(proc, items), daemon=True).start()
    events = threading.Thread(target=_pump_events, args=(read_fd, items), daemon=True)
    events.start()
    tail: deque[str] = deque(maxlen=40)
    started = time.monotonic()
    next_poll = next_flush = started
    stop_reason: str | None = None
    term_at: float | None = None
    eof = False
    log.info("job %s attempt %d: child pid %d (%s)", a.job_id, a.attempt, proc.pid, "warm" if warm else "cold")
    while True:
        now = time.monotonic()
        try:  # block until output arrives or periodic work is due: no busy polling
            source, line = items.get(timeout=max(0.01, min(next_poll, next_flush) - now))
            if source == "log":
                if line is None:
                    eof = True
                else:
                    tail.append(line)
                    relay.handle_line(line)
            elif line is not None:
                relay.handle_event(line)
        except queue.Empty:
            pass
        now = time.monotonic()
        if eof and proc.poll() is not None:
            break
        if now >= next_flush:
            next_flush = now + settings.EVENT_FLUSH_SECONDS
            if not relay.flush():
                keeper.lost.set()
        if now >= next_poll:
            next_poll = now + settings.POLL_SECONDS
            if keeper.lost.is_set() and stop_reason != "lease_lost":
                stop_reason = "lease_lost"
                kill_group(proc, signal.SIGKILL)
            elif stop_reason is None:
                if keeper.cancel_requested:  # a cancel, or the job's sweep pruning it (same cooperative stop)
                    stop_reason = "pruned" if keeper.stop_reason == lifecycle.PRUNE else "cancel"
                elif now - started > a.max_runtime_s:
                    stop_reason = "deadline"
                elif SHUTDOWN.is_set():
                    stop_reason = "shutdown"
                elif keeper.preempt_requested:  # the scheduler's preemption (CRUCIBLE_PREEMPTION)
                    stop_reason = "preempt"
                if stop_reason is not None:
                    log.info("job %s: stopping child (%s): SIGTERM, then SIGKILL after %.0fs", a.job_id,
                             stop_reason, settings.CANCEL_GRACE_SECONDS)
                    kill_group(proc, signal.SIGTERM)
                    term_at = now
            if term_at is not None and now - term_at > settings.CANCEL_GRACE_SECONDS and proc.poll() is None:
                kill_group(proc, signal.SIGKILL)
                term_at = float("inf")
    rc = proc.returncode
    if a.gpus > 1:  # torchrun reports 1 for any failed rank; rank 0 recorded what actually happened
        try:
            rc = int((a.workdir / RANK0_EXIT_FILE).read_text())
        except (OSError, ValueError):
            pass
    kill_group(proc, signal.SIGKILL)  # anything the method left behind in its group
    os.close(keep_fd)  # the reader now sees EOF once the child's last events are read
    events.join(timeout=10)
    while not items.empty():
        source, line = items.get_nowait()
        if source == "event" and line is not None:
            relay.handle_event(line)
        elif source == "log" and line is not None:
            relay.handle_line(line)
    if stop_reason == "lease_lost" or keeper.lost.is_set() or relay.lost:
        relay.drop()
        log.warning("job %s attempt %d: lease lost (reconciled elsewhere); child killed, nothing recorded: "
                    "dropped %d events and %d checkpoints/artifacts", a.job_id, a.attempt, relay.dropped_events,
                    relay.dropped_artifacts)
        return LEASE_LOST
    outcome, reason = classify(rc, stop_reason, a.max_runtime_s, list(tail),
                               oom=rc == -signal.SIGKILL and _more_ooms(oom_before))
    return _finish(a, worker_id, outcome, reason, relay, settings)


def classify(rc: int, stop_reason: str | None, max_runtime_s: float, tail: list[str], *,
             oom: bool = False) -> tuple[str, str | None]:
    """The outcome of an attempt from the child's exit (and why the supervisor stopped it, if it did)."""
    last_error = next((ln for ln in reversed(tail) if ln.strip()), "")
    if stop_reason == "cancel":
        return lifecycle.CANCELLED, "cancelled on request"
    if stop_reason == "pruned":
        if rc == EXIT_OK:  # it finished before the stop took effect: a complete result
            return lifecycle.SUCCEEDED, None
        saved = "after checkpointing" if rc == EXIT_PREEMPTED else f"(the method exited with {rc} on SIGTERM)"
        return lifecycle.Outcome.PRUNED, f"pruned by its sweep {saved}"
    if stop_reason == "deadline":
        return lifecycle.USER_ERROR, f"exceeded resources.max_runtime_s={max_runtime_s:.0f}"
    if rc == EXIT_OK:
        return lifecycle.SUCCEEDED, None
    if rc == EXIT_PREEMPTED:
        why = {"shutdown": "worker shutting down", "preempt": "the scheduler needs its GPUs"}.get(
            stop_reason or "", "method stopped on SIGTERM")
        return lifecycle.PREEMPTED, f"preempted ({why}) after checkpointing"
    if rc == EXIT_CONFIG:
        return lifecycle.CONFIG_ERROR, last_error or "the job cannot run as specified"
    if rc == -signal.SIGKILL and oom:
        return lifecycle.OOM, "method process killed for memory (out of memory)"
    if rc < 0:
        sig = signal.Signals(-rc).name
        return lifecycle.INFRA_ERROR, f"method process killed by {sig}"
    return lifecycle.USER_ERROR, f"method failed (exit code {rc}): {last_error}"[:2000]


def _finish(a: Attempt, worker_id: str, outcome: str, reason: str | None, relay: EventRelay | None,
            settings: Settings) -> str:
    result = relay.result if relay is not None else None
    if relay is not None and not relay.flush():
        return LEASE_LOST
    with session_scope() as s:
        status = lifecycle.finish_attempt(s, job_id=a.job_id, attempt=a.attempt, worker_id=worker_id,
                                          outcome=outcome, reason=reason, result=result)
        if status is not None and status.terminal and a.run_id and relay is not None:
            # Before the commit makes the job's end visible: whoever sees "succeeded" in the API finds the
            # MLflow run FINISHED too (the row stays locked for this one call).
            relay.close_run(status.value)
    if status is None:
        log.warning("job %s attempt %d: ended %s but no longer held the job; nothing recorded", a.job_id,
                    a.attempt, outcome)
        return LEASE_LOST
    log.info("job %s attempt %d: %s -> %s (%s)", a.job_id, a.attempt, outcome, status, reason or "")
    if status.terminal and a.run_id and relay is not None and status.value == "succeeded" and result:
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


def _pump_stdout(proc: subprocess.Popen[str], items: queue.Queue[tuple[str, str | None]]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        items.put(("log", line.rstrip("\n")))
    items.put(("log", None))


def _pump_events(fd: int, items: queue.Queue[tuple[str, str | None]]) -> None:
    """Lines of the event channel, as they arrive (its own thread: a slow database never blocks the child)."""
    buf = b""
    try:
        while chunk := os.read(fd, 1 << 16):
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for raw in lines:
                items.put(("event", raw.decode("utf-8", "replace")))
            if len(buf) > (1 << 20):  # not a line we would send; drop it rather than grow without bound
                buf = b""
    finally:
        os.close(fd)
        items.put(("event", None))


def _set_current_job(worker_id: str, job_id: uuid.UUID | None) -> None:
    try:
        with session_scope() as s:
            w = s.get(Worker, worker_id)
            if w is not None:
                w.current_job_id = job_id
    except Exception:  # bookkeeping only
        log.warning("could not record current job on worker row", exc_info=True)
