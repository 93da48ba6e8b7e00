"""The state machine's table (shared/lifecycle.py) without a database: illegal transitions raise before any
write. The guarded UPDATEs themselves are tested against Postgres in tests/platform/test_scheduler.py."""

from __future__ import annotations

import uuid
from typing import Any, cast

import pytest
from sqlalchemy.orm import Session

from shared import lifecycle
from shared.lifecycle import TRANSITIONS, IllegalTransition, Outcome
from shared.models import Job, JobStatus


class _Recorder:
    """Stands in for a Session (the functions under test only ``add``): records what would be written."""

    def __init__(self) -> None:
        self.added: list[Any] = []

    def add(self, obj: Any) -> None:
        self.added.append(obj)

    @property
    def session(self) -> Session:
        return cast(Session, self)


def _job(status: JobStatus) -> Job:
    return Job(id=uuid.uuid4(), attempt=1, status=status, worker_kind="ssl-trainer", priority=0)


def test_terminal_states_are_final_and_every_state_is_in_the_table() -> None:
    assert set(TRANSITIONS) == set(JobStatus)
    for status in JobStatus:
        assert (TRANSITIONS[status] == frozenset()) == status.terminal


def test_dispatch_goes_through_the_table() -> None:
    s = _Recorder()
    job = _job(JobStatus.QUEUED)
    lifecycle.dispatch(s.session, job, queue="crucible.ssl-trainer")
    assert job.status == JobStatus.DISPATCHED and job.dispatched_at is not None
    assert [(e.type, e.data["status"]) for e in s.added] == [("state", "dispatched")]
    with pytest.raises(IllegalTransition, match="dispatched -> dispatched is not allowed"):
        lifecycle.dispatch(s.session, job, queue="crucible.ssl-trainer")
    assert len(s.added) == 1  # nothing written by the refused transition


@pytest.mark.parametrize("status", [JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.PRUNED])
def test_a_finished_job_cannot_be_requeued_dispatched_or_ended_again(status: JobStatus) -> None:
    s = _Recorder()
    for change in (lambda j: lifecycle.enqueue(s.session, j, reason="x"),
                   lambda j: lifecycle.dispatch(s.session, j, queue="q"),
                   lambda j: lifecycle.terminate(s.session, j, JobStatus.FAILED, "x")):
        job = _job(status)
        with pytest.raises(IllegalTransition, match=rf"{status.value} -> .* nothing \(terminal\)"):
            change(job)
        assert job.status == status
    assert s.added == []


def test_a_new_row_without_a_status_starts_as_pending() -> None:
    s = _Recorder()
    job = Job(id=uuid.uuid4(), attempt=1, worker_kind="ssl-trainer", priority=0)
    lifecycle.enqueue(s.session, job, reason="submitted")
    assert job.status == JobStatus.QUEUED and [type(o).__name__ for o in s.added] == ["Outbox", "JobEvent"]


def test_pending_jobs_cannot_skip_the_queue() -> None:
    with pytest.raises(IllegalTransition, match="pending -> dispatched"):
        lifecycle.dispatch(_Recorder().session, _job(JobStatus.PENDING), queue="q")


def test_terminate_takes_only_terminal_statuses() -> None:
    with pytest.raises(IllegalTransition, match="terminal status"):
        lifecycle.terminate(_Recorder().session, _job(JobStatus.RUNNING), JobStatus.QUEUED, None)


def test_outcomes_are_an_enum_that_still_reads_as_the_strings() -> None:
    assert {o.value for o in Outcome} == {"succeeded", "cancelled", "preempted", "user_error", "config_error",
                                          "infra_error", "oom", "pruned"}
    assert lifecycle.CONFIG_ERROR is Outcome.CONFIG_ERROR and Outcome("infra_error") == "infra_error"
    with pytest.raises(ValueError, match="unknown outcome 'exploded'; one of: succeeded"):
        lifecycle.finish_attempt(_Recorder().session, job_id=uuid.uuid4(), attempt=1, worker_id=None,
                                 outcome="exploded")
