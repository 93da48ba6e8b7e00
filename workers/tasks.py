"""Celery tasks. Thin on purpose: the supervisor (plain, testable Python) does the work."""

from __future__ import annotations

from shared.celery_app import RUN_JOB_TASK, get_celery
from workers.runtime import supervisor
from workers.worker import identity

app = get_celery()


@app.task(name=RUN_JOB_TASK, ignore_result=True, acks_late=False)
def run_job(job_id: str, attempt: int) -> str:
    """Supervise one delivery of (job_id, attempt); duplicates return 'skipped' without doing work."""
    me = identity()
    return supervisor.supervise(job_id, int(attempt), worker_id=me.worker_id, worker_kinds=me.kinds)
