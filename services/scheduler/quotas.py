"""Per-project quotas (``crucible admin set-quota``) and why a job waits (``GET /v1/jobs/{id}`` ``wait_reason``).

Where a waiting reason comes from:

* a **queued** job: the dispatcher's last decision about it (``jobs.wait_reason``, written by the cycle that
  read it among its project's heads, only when it changed): ``quota: project X uses 4/4 GPUs (this job needs 2)``,
  ``no capacity for 4 GPUs of class a100``, ``waiting for a free ssl-trainer worker (queue window full)``. A
  queued job deeper than its project's heads (``CRUCIBLE_SCHEDULER_HEADS``) has none stored yet: it reads
  ``queued behind N earlier jobs of this project``, counted on read;
* a **pending** job: computed on read from its unfinished parents: ``waiting for step train`` (a pipeline
  step's job) or ``waiting for job <id>``.
"""

from __future__ import annotations

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from shared.models import Job, JobDependency, JobStatus, PipelineJob, PipelineStep, Project, ProjectQuota

MAX_PARENTS_NAMED = 3


def set_quota(*, session: Session, project_name: str, max_gpus: int | None, max_jobs: int | None) -> ProjectQuota:
    """Set (or, with both None, lift) a project's limits on GPUs and jobs dispatched or running at once."""
    for flag, v in (("--gpus", max_gpus), ("--jobs", max_jobs)):
        if v is not None and v < 0:
            raise ValueError(f"{flag} must be 0 or more (0 stops the project's new jobs), not {v}")
    project = session.scalars(select(Project).where(Project.name == project_name)).first()
    if project is None:
        raise ValueError(f"no project named {project_name!r}; create it with `crucible keys create --project "
                         f"{project_name}`")
    row = session.get(ProjectQuota, project.id)
    if row is None:
        row = ProjectQuota(project_id=project.id)
        session.add(row)
    row.max_gpus, row.max_jobs = max_gpus, max_jobs
    session.flush()
    return row


def list_quotas(*, session: Session) -> list[tuple[str, ProjectQuota]]:
    return [(name, q) for q, name in session.execute(
        select(ProjectQuota, Project.name).join(Project, Project.id == ProjectQuota.project_id).order_by(Project.name))]


def wait_reason(session: Session, job: Job) -> str | None:
    """Why ``job`` has not started (None once it has, or when it ended)."""
    if job.status == JobStatus.QUEUED:
        return job.wait_reason or _behind(session, job)
    if job.status != JobStatus.PENDING:
        return None
    rows = session.execute(
        select(Job.id, PipelineStep.name)
        .join(JobDependency, JobDependency.parent_id == Job.id)
        .outerjoin(PipelineJob, and_(PipelineJob.job_id == Job.id, PipelineJob.current.is_(True)))
        .outerjoin(PipelineStep, PipelineStep.id == PipelineJob.step_id)
        .where(JobDependency.job_id == job.id, Job.status != JobStatus.SUCCEEDED)
        .order_by(Job.created_at).limit(MAX_PARENTS_NAMED + 1)
    ).all()
    if not rows:
        return "dependencies met; the scheduler queues it on its next cycle"
    steps = sorted({step for _, step in rows if step})
    named = [f"step {s}" for s in steps] + [f"job {jid}" for jid, step in rows if not step]
    more = " and more" if len(rows) > MAX_PARENTS_NAMED else ""
    return "waiting for " + ", ".join(named[:MAX_PARENTS_NAMED]) + more


def _behind(session: Session, job: Job) -> str:
    """A queued job the dispatcher has not read yet: how many of its project's queued jobs of the same kind rank
    ahead of it (an index range count on ix_jobs_queued_heads)."""
    earlier = Job.priority > job.priority
    if job.queued_at is not None:
        earlier = or_(earlier, and_(Job.priority == job.priority, Job.queued_at < job.queued_at))
    ahead = session.scalar(select(func.count()).select_from(Job).where(
        Job.project_id == job.project_id, Job.worker_kind == job.worker_kind, Job.status == JobStatus.QUEUED,
        earlier)) or 0
    return f"queued behind {ahead} earlier jobs of this project" if ahead else "queued; the scheduler reads it next"

