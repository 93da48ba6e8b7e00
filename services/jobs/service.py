"""Jobs: submit, read, list, cancel, events. Every check runs before the first write, and all writes of a
submission (job, dependencies, outbox row, first events) are one statement (services/jobs/submission.py)."""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from services.datasets import service as dataset_service
from services.errors import Conflict, Invalid, NotFound
from services.jobs import submission
from services.projects import service as project_service
from shared import lifecycle
from shared.config import get_settings
from shared.kinds import worker_kind_for
from shared.lineage import latest_checkpoint
from shared.models import Artifact, Experiment, Job, JobDependency, JobEvent, JobStatus, utcnow
from shared.specs import JobSpecBase


def request_hash(spec: JobSpecBase) -> str:
    return hashlib.sha256(json.dumps(spec.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def submit(*, session: Session, project_id: uuid.UUID, spec: JobSpecBase,
           idempotency_key: str | None = None) -> tuple[Job, bool]:
    """Create a job from a validated spec. Returns (job, created); a replayed Idempotency-Key returns the
    original job with created=False, and the same key with a different spec is a Conflict."""
    digest = request_hash(spec)
    if idempotency_key is not None:
        existing = _by_idempotency_key(session, project_id, idempotency_key)
        if existing is not None:
            return _replay(existing, digest, idempotency_key), False

    kind = spec.kind
    settings = get_settings()
    if spec.resources.gpus > settings.MAX_GPUS_PER_JOB:
        raise Invalid(f"{spec.resources.gpus} GPUs requested; this cluster runs at most {settings.MAX_GPUS_PER_JOB} "
                      "per job", loc=["body", "resources", "gpus"])
    inputs = _resolve_inputs(session, project_id, spec)
    parents = _check_parents(session, project_id, spec.depends_on)
    inputs["checkpoints"], implicit = _resolve_checkpoints(session, project_id, spec)
    if not inputs["checkpoints"]:
        del inputs["checkpoints"]
    parents += [p for p in implicit if p.id not in {q.id for q in parents}]  # consuming a job's output waits for it

    exp_id = project_service.experiment_id(session=session, project_id=project_id, name=spec.experiment)
    runnable = all(p.status == JobStatus.SUCCEEDED for p in parents)
    now = utcnow()
    job = Job(id=uuid.uuid4(), project_id=project_id, experiment_id=exp_id, name=spec.name, kind=kind,
              worker_kind=worker_kind_for(kind), spec=spec.model_dump(mode="json"), inputs=inputs,
              priority=spec.priority, idempotency_key=idempotency_key, request_hash=digest,
              max_infra_retries=spec.retries.infra, max_user_retries=spec.retries.user,
              status=JobStatus.QUEUED if runnable else JobStatus.PENDING, queued_at=now if runnable else None,
              created_at=now, updated_at=now)
    events: list[tuple[str, dict[str, Any]]] = [("submitted", {"kind": kind})]
    if runnable:
        events.append(("state", {"status": JobStatus.QUEUED.value, "reason": "submitted"}))
    else:
        waiting = sum(p.status != JobStatus.SUCCEEDED for p in parents)
        events.append(("state", {"status": JobStatus.PENDING.value, "reason": f"waiting for {waiting} dependencies"}))
    if not submission.write(session, job, events=events, parent_ids=[p.id for p in parents], enqueue=runnable):
        # the same Idempotency-Key raced us: the other request's job is the answer
        existing = _by_idempotency_key(session, project_id, idempotency_key or "")
        if existing is None:
            raise Conflict("a concurrent submission with this Idempotency-Key did not commit; retry",
                           loc=["header", "idempotency-key"])
        return _replay(existing, digest, idempotency_key or ""), False
    return job, True


def _by_idempotency_key(session: Session, project_id: uuid.UUID, key: str) -> Job | None:
    return session.scalars(select(Job).where(Job.project_id == project_id, Job.idempotency_key == key)).first()


def _replay(job: Job, digest: str, key: str) -> Job:
    if job.request_hash != digest:
        raise Conflict(f"Idempotency-Key {key!r} was already used for a different job spec (job {job.id}); "
                       "use a new key for a new job", loc=["header", "idempotency-key"])
    return job


def _resolve_inputs(session: Session, project_id: uuid.UUID, spec: JobSpecBase) -> dict[str, Any]:
    inputs: dict[str, Any] = {}
    ref = getattr(spec, "dataset", None)
    if ref is not None:
        resolved = dataset_service.resolve_ref(session=session, project_id=project_id, ref=ref)
        train = resolved.get("stats", {}).get("train")
        if train is not None:
            for loc, msg in spec.dataset_problems(int(train)):
                raise Invalid(msg, loc=["body", loc])
        classes = resolved.get("stats", {}).get("classes")
        class_problems = getattr(spec, "dataset_class_problems", None)  # e.g. poison's target_class
        if classes and class_problems is not None:
            for loc, msg in class_problems(list(classes)):
                raise Invalid(msg, loc=["body", loc])
        inputs["dataset"] = resolved
    return inputs


def _resolve_checkpoints(session: Session, project_id: uuid.UUID,
                         spec: JobSpecBase) -> tuple[dict[str, Any], list[Job]]:
    """Pin each checkpoint input: an artifact now, or a running/queued job whose final checkpoint is used
    once it succeeds (the job becomes an implicit dependency)."""
    resolved: dict[str, Any] = {}
    waits: list[Job] = []
    for name, ref in spec.checkpoint_inputs().items():
        loc: list[str | int] = ["body", *(int(p) if p.isdigit() else p for p in name.split("."))]
        scheme, _, ident = ref.partition(":")
        if scheme == "artifact":
            art = session.get(Artifact, uuid.UUID(ident))
            if art is None or art.project_id != project_id:
                raise NotFound(f"artifact {ident} not found in this project", loc=loc)
            wanted = spec.input_artifact_kinds.get(name, ("checkpoint",))
            if art.kind not in wanted:
                raise Invalid(f"artifact {ident} is a {art.kind}, not a {' or '.join(wanted)}", loc=loc)
            resolved[name] = {"ref": ref, "artifact_id": str(art.id), "job_id": str(art.job_id) if art.job_id else None}
            _check_producer(spec, name, session.get(Job, art.job_id) if art.job_id else None, loc)
            continue
        job = session.get(Job, uuid.UUID(ident))
        if job is None or job.project_id != project_id:
            raise NotFound(f"job {ident} not found in this project", loc=loc)
        _check_producer(spec, name, job, loc)
        if job.status in (JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.PRUNED):
            raise Conflict(f"job {ident} ended {job.status.value}; it has no final checkpoint to use", loc=loc)
        art = latest_checkpoint(session, job.id) if job.status == JobStatus.SUCCEEDED else None
        if job.status == JobStatus.SUCCEEDED and art is None:
            raise Conflict(f"job {ident} succeeded without writing a checkpoint", loc=loc)
        if art is None:
            waits.append(job)
        resolved[name] = {"ref": ref, "job_id": str(job.id), "artifact_id": str(art.id) if art else None}
    return resolved, waits


def _check_producer(spec: JobSpecBase, name: str, producer: Job | None, loc: list[str | int]) -> None:
    """A spec that can tell from the producing job that a checkpoint will not fit (e.g. PatchSearch given an
    eval job's probe) says so now, as a 422, instead of failing on the worker."""
    check = getattr(spec, "checkpoint_problems", None)
    if check is None or producer is None:
        return
    for field, msg in check(name, producer_kind=producer.kind, producer_spec=producer.spec):
        raise Invalid(msg, loc=loc if field == name else ["body", *field.split(".")])


def _check_parents(session: Session, project_id: uuid.UUID, parent_ids: list[uuid.UUID]) -> list[Job]:
    parents = []
    for i, pid in enumerate(parent_ids):
        parent = session.get(Job, pid)
        if parent is None or parent.project_id != project_id:
            raise NotFound(f"job {pid} not found in this project", loc=["body", "depends_on", i])
        if parent.status in (JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.PRUNED):
            raise Conflict(f"job {pid} already ended {parent.status.value}; a job depending on it could never run",
                           loc=["body", "depends_on", i])
        parents.append(parent)
    return parents


def get(*, session: Session, project_id: uuid.UUID, job_id: uuid.UUID) -> Job:
    """The job, if it belongs to the project (another project's job is indistinguishable from a missing one)."""
    job = session.get(Job, job_id)
    if job is None or job.project_id != project_id:
        raise NotFound(f"job {job_id} not found", loc=["path", "job_id"])
    return job


def list_jobs(*, session: Session, project_id: uuid.UUID, status: list[JobStatus] | None = None,
              kind: str | None = None, experiment: str | None = None, limit: int = 50,
              offset: int = 0) -> tuple[list[Job], int]:
    stmt = select(Job).where(Job.project_id == project_id)
    if status:
        stmt = stmt.where(Job.status.in_(status))
    if kind:
        stmt = stmt.where(Job.kind == kind)
    if experiment:
        stmt = stmt.join(Experiment, Experiment.id == Job.experiment_id).where(Experiment.name == experiment)
    total = session.scalar(select(func.count()).select_from(stmt.subquery())) or 0
    items = session.scalars(stmt.order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset)).all()
    return list(items), total


def parents_of(*, session: Session, job_id: uuid.UUID) -> list[uuid.UUID]:
    return list(session.scalars(select(JobDependency.parent_id).where(JobDependency.job_id == job_id)))


def cancel(*, session: Session, project_id: uuid.UUID, job_id: uuid.UUID) -> Job:
    """Cancel a job: at once if it is not running, else its supervisor stops it (SIGTERM → grace → SIGKILL)."""
    job = session.scalars(select(Job).where(Job.id == job_id).with_for_update()).first()
    if job is None or job.project_id != project_id:
        raise NotFound(f"job {job_id} not found", loc=["path", "job_id"])
    if job.status.terminal:
        raise Conflict(f"job {job_id} already ended {job.status.value}; nothing to cancel", loc=["path", "job_id"])
    lifecycle.cancel(session, job)
    return job


def events(*, session: Session, job_id: uuid.UUID, after: int = 0, limit: int = 500,
           types: list[str] | None = None) -> list[JobEvent]:
    stmt = select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after)
    if types:
        stmt = stmt.where(JobEvent.type.in_(types))
    return list(session.scalars(stmt.order_by(JobEvent.id).limit(limit)))
