"""Turning steps into jobs: resolve a step's references once its parents can provide them, create its job(s)
through the ordinary job path (``services.jobs.service.submit``), reuse a cached job when asked, and keep
each step's state in line with its jobs.

A step gets its job at submit when everything it references exists then: parameters, and the final checkpoint
of a parent step that has a job (a ``job:<id>`` reference, which the job path turns into a dependency: the
job waits in ``pending`` until the parent succeeds). A step that needs a value only known at run time (a
declared output, the list of checkpoints, a fan-out list) is created when its parents have succeeded, by
``advance`` (the scheduler's reconciler calls it every cycle).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from services.errors import DomainError
from services.jobs import service as job_service
from services.pipelines.compile import MAX_FANOUT, ref_type
from services.pipelines.refs import KEEP, Path, Ref, substitute
from shared.models import Artifact, Job, JobStatus, Pipeline, PipelineJob, PipelineStep
from shared.specs import parse_spec

ACTIVE_STEP = ("waiting", "running")
_CACHE_IGNORED = ("name", "experiment", "priority", "tags", "depends_on", "retries")


class StepError(Exception):
    """A step's references could not be resolved into a valid spec (the step fails, with this reason)."""


class SubmitStepError(Exception):
    """At submit: creating ``step``'s job was refused (``error``: a DomainError or a ValidationError)."""

    def __init__(self, step: str, error: Exception) -> None:
        super().__init__(f"step {step!r}: {error}")
        self.step, self.error = step, error


def step_rows(session: Session, pipeline: Pipeline) -> dict[str, PipelineStep]:
    rows = session.scalars(select(PipelineStep).where(PipelineStep.pipeline_id == pipeline.id)
                           .order_by(PipelineStep.position)).all()
    return {r.name: r for r in rows}


def current_jobs(session: Session, step: PipelineStep) -> list[tuple[PipelineJob, Job]]:
    rows = session.execute(
        select(PipelineJob, Job).join(Job, Job.id == PipelineJob.job_id)
        .where(PipelineJob.step_id == step.id, PipelineJob.current.is_(True))
        .order_by(PipelineJob.item_index, PipelineJob.id)
    ).all()
    return [(pj, job) for pj, job in rows]


def job_outputs(session: Session, job: Job) -> dict[str, Any]:
    """The job's named outputs (``jobs.outputs``, written by the supervisor's fenced event flush)."""
    return dict(job.outputs or {})


def _checkpoints(session: Session, job: Job) -> list[str]:
    ids = session.scalars(select(Artifact.id).where(Artifact.job_id == job.id, Artifact.kind == "checkpoint")
                          .order_by(Artifact.created_at, Artifact.id))
    return [f"artifact:{i}" for i in ids]


def refresh(session: Session, steps: dict[str, PipelineStep], defn: dict[str, Any]) -> None:
    """Set each created step's state from its current jobs."""
    for name, step in steps.items():
        if step.state not in ("running", "failed", "cancelled", "succeeded"):
            continue
        jobs = [j for _, j in current_jobs(session, step)]
        if not jobs:  # cancelled or failed before any job was made: nothing to recompute from
            continue
        expected = len(step.items or []) if defn["steps"][name].get("foreach") is not None else 1
        failed = next((j for j in jobs if j.status == JobStatus.FAILED), None)
        cancelled = next((j for j in jobs if j.status == JobStatus.CANCELLED), None)
        if any(not j.status.terminal for j in jobs):
            step.state, step.state_reason = "running", None
        elif failed is not None:
            step.state, step.state_reason = "failed", f"job {failed.id} failed: {failed.status_reason}"
        elif cancelled is not None:
            step.state, step.state_reason = "cancelled", f"job {cancelled.id} was cancelled"
        elif len(jobs) >= expected:
            step.state, step.state_reason = "succeeded", None
        else:
            step.state, step.state_reason = "running", None


def materialize(session: Session, pipeline: Pipeline, steps: dict[str, PipelineStep], *,
                at_submit: bool = False) -> None:
    """Create the jobs of every waiting step that can be created now; skip those whose parents failed.

    At submit a step that cannot be created raises (the whole pipeline is refused); later the step fails."""
    defn = pipeline.definition
    for name in defn["order"]:
        step, sdef = steps[name], defn["steps"][name]
        if step.state != "waiting":
            continue
        parents = [steps[p] for p in sdef["parents"]]
        if any(p.state in ("failed", "cancelled", "skipped") for p in parents):
            bad = next(p for p in parents if p.state in ("failed", "cancelled", "skipped"))
            step.state, step.state_reason = "skipped", f"step {bad.name!r} ended {bad.state}"
            continue
        all_done = all(p.state == "succeeded" for p in parents)
        if not all_done and not _can_start_early(sdef, steps, defn):
            step.state_reason = "waiting for step " + ", ".join(repr(p.name) for p in parents if p.state != "succeeded")
            continue
        try:
            _create_jobs(session, pipeline, step, sdef, steps, defn, final=all_done, at_submit=at_submit)
        except StepError as e:
            step.state, step.state_reason = "failed", str(e)
        except Exception as e:
            if at_submit:
                raise SubmitStepError(name, e) from e
            raise


def _can_start_early(sdef: dict[str, Any], steps: dict[str, PipelineStep], defn: dict[str, Any]) -> bool:
    """A step that uses only parents' final checkpoints (and parameters) can wait as a pending job."""
    if sdef.get("foreach") is not None:
        return False
    for p in sdef["parents"]:
        if steps[p].state not in ("running", "succeeded") or defn["steps"][p].get("foreach") is not None:
            return False
    uses: list[Ref] = []

    def collect(ref: Ref, _: Path) -> Any:
        uses.append(ref)
        return KEEP

    substitute(sdef["spec"], collect)
    return all(r.scope != "steps" or r.output == "checkpoint" for r in uses)


def _parent_job(session: Session, step: PipelineStep) -> Job:
    jobs = current_jobs(session, step)
    if len(jobs) != 1:
        raise StepError(f"step {step.name!r} has {len(jobs)} current jobs; expected one")
    return jobs[0][1]


def _resolver(session: Session, steps: dict[str, PipelineStep], defn: dict[str, Any], item: Any) -> Any:
    kinds_of = {n: s["kind"] for n, s in defn["steps"].items()}

    def lookup(ref: Ref, _: Path) -> Any:
        if ref.scope == "item":
            return item
        if ref.scope != "steps":
            return KEEP
        if defn["steps"][ref.name].get("foreach") is not None:  # a fan-in: every item's value, in item order
            return [value_of(ref, job) for _, job in current_jobs(session, steps[ref.name])]
        return value_of(ref, _parent_job(session, steps[ref.name]))

    def value_of(ref: Ref, job: Job) -> Any:
        if ref.output == "checkpoint":
            return f"job:{job.id}"
        if ref.output == "checkpoints":
            return _checkpoints(session, job)
        outputs = job_outputs(session, job)
        if ref.output not in outputs:
            raise StepError(f"step {ref.name!r} (job {job.id}) made no output {ref.output!r} "
                            f"({ref_type(ref, kinds_of)}); it made: {', '.join(outputs) or 'none'}")
        return outputs[ref.output]

    return lookup


def _create_jobs(session: Session, pipeline: Pipeline, step: PipelineStep, sdef: dict[str, Any],
                 steps: dict[str, PipelineStep], defn: dict[str, Any], *, final: bool, at_submit: bool) -> None:
    foreach = sdef.get("foreach")
    if foreach is None:
        specs: list[tuple[int | None, Any]] = [(None, None)]
    else:
        if step.items is None:
            items = substitute(foreach, _resolver(session, steps, defn, None))
            if not isinstance(items, list):
                raise StepError(f"foreach {foreach!r} resolved to a {type(items).__name__}, not a list")
            if len(items) > MAX_FANOUT:
                raise StepError(f"foreach {foreach!r} has {len(items)} items; at most {MAX_FANOUT}")
            step.items = items
        have = {pj.item_index for pj, _ in current_jobs(session, step)}
        specs = [(i, it) for i, it in enumerate(step.items) if i not in have]
    # Parents still running: the jobs wait for them (pending); all succeeded: nothing to wait for.
    parent_jobs = [] if final else [j.id for p in sdef["parents"] for _, j in current_jobs(session, steps[p])]
    for index, item in specs:
        raw = substitute(sdef["spec"], _resolver(session, steps, defn, item))
        suffix = "" if index is None else f"[{index}]"
        raw.setdefault("name", f"{pipeline.name}.{step.name}{suffix}"[:200])
        raw["depends_on"] = sorted({*map(str, raw.get("depends_on") or []), *map(str, parent_jobs)})
        try:
            spec = parse_spec(raw)
        except Exception as e:  # a run-time value of the wrong type: the step fails, saying which
            if at_submit:
                raise
            raise StepError(f"step {step.name!r}{suffix}: the resolved spec is invalid: {e}") from None
        key = _cache_key(spec.model_dump(mode="json")) if sdef.get("cache") else None
        cached = _cached_job(session, pipeline.project_id, key) if key else None
        if cached is not None:
            session.add(PipelineJob(pipeline_id=pipeline.id, step_id=step.id, job_id=cached.id, item_index=index,
                                    cached=True, cache_key=key, run_linked=True))
            continue
        try:
            job, _ = job_service.submit(session=session, project_id=pipeline.project_id, spec=spec)
        except DomainError as e:
            if at_submit:
                raise
            raise StepError(f"step {step.name!r}{suffix}: {e.message}") from None
        session.add(PipelineJob(pipeline_id=pipeline.id, step_id=step.id, job_id=job.id, item_index=index,
                                cache_key=key))
    session.flush()
    step.state, step.state_reason = "running", None


def _cache_key(spec: dict[str, Any]) -> str:
    """Content hash of what determines a step's result: its kind and parameters, with inputs named by content
    or by the (immutable) job that made them."""
    body = {k: v for k, v in spec.items() if k not in _CACHE_IGNORED}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _cached_job(session: Session, project_id: uuid.UUID, key: str) -> Job | None:
    return session.scalars(
        select(Job).join(PipelineJob, PipelineJob.job_id == Job.id)
        .where(PipelineJob.cache_key == key, Job.project_id == project_id, Job.status == JobStatus.SUCCEEDED)
        .order_by(Job.finished_at.desc()).limit(1)
    ).first()
