"""One MLflow parent run per pipeline; each step job's run becomes its child (tag ``mlflow.parentRunId``).

Runs of jobs are created by their workers, so the scheduler links them after the fact, every cycle: it creates
the parent run of a new pipeline, tags the runs of step jobs that have one, and closes the parent run when the
pipeline ends (and reopens it on retry). MLflow trouble is logged and retried next cycle; it never blocks
scheduling.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import select

from shared.db import session_scope
from shared.models import Job, Pipeline, PipelineJob, Project

log = logging.getLogger(__name__)
STATUS = {"succeeded": "FINISHED", "failed": "FAILED", "cancelled": "KILLED", "running": "RUNNING"}


def sync_runs(tracker_factory: Any, *, batch: int = 100) -> int:
    """Returns how many MLflow changes were made. ``tracker_factory()`` gives a ``shared.tracking.Tracker``."""
    with session_scope() as s:
        new = s.execute(select(Pipeline.id, Pipeline.name, Pipeline.experiment, Project.name)
                        .join(Project, Project.id == Pipeline.project_id)
                        .where(Pipeline.mlflow_run_id.is_(None)).limit(batch)).all()
        links = s.execute(select(PipelineJob.id, Job.mlflow_run_id, Pipeline.mlflow_run_id)
                          .join(Job, Job.id == PipelineJob.job_id)
                          .join(Pipeline, Pipeline.id == PipelineJob.pipeline_id)
                          .where(PipelineJob.run_linked.is_(False), Job.mlflow_run_id.is_not(None),
                                 Pipeline.mlflow_run_id.is_not(None)).limit(batch)).all()
        ends = s.execute(select(Pipeline.id, Pipeline.mlflow_run_id, Pipeline.status)
                         .where(Pipeline.mlflow_closed.is_(False), Pipeline.mlflow_run_id.is_not(None),
                                Pipeline.status != "running").limit(batch)).all()
    if not (new or links or ends):
        return 0
    tracker = tracker_factory()
    done = 0
    for pid, name, experiment, project in new:
        exp_id = tracker.ensure_experiment(f"{project}/{experiment}")
        run = tracker.client.create_run(exp_id, run_name=f"pipeline {name}", tags={
            "crucible.pipeline_id": str(pid), "crucible.project": project, "crucible.kind": "pipeline"})
        with session_scope() as s:
            p = s.get(Pipeline, pid)
            if p is not None:
                p.mlflow_run_id = run.info.run_id
        done += 1
    for pj_id, run_id, parent_run in links:
        tracker.set_tags(run_id, {"mlflow.parentRunId": parent_run})
        with session_scope() as s:
            pj = s.get(PipelineJob, pj_id)
            if pj is not None:
                pj.run_linked = True
        done += 1
    return done + close_runs(tracker, Pipeline, ends)


def close_runs(tracker: Any, model: Any, ends: Any) -> int:
    """Terminate the parent run of every ended pipeline or sweep (``ends``: rows of ``(id, run_id, status)`` of
    ``model``) with MLflow's status for it, and mark it closed unless its status changed meanwhile (a retry
    reopened it: the next cycle closes it again). Returns how many runs were closed."""
    for row_id, run_id, status in ends:
        tracker.client.set_terminated(run_id, status=STATUS.get(status, "FAILED"))
        with session_scope() as s:
            row = s.get(model, row_id)
            if row is not None and row.status == status:
                row.mlflow_closed = True
    return len(ends)
