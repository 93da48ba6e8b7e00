"""Jobs and everything the job path records about them: dependencies, outbox, events, workers.

State machine (the row is the truth; a broker message is only a nudge carrying ``job_id`` + ``attempt``)::

    pending --(parents succeeded)--> queued --(dispatcher published)--> dispatched --(worker claimed)--> running
    running --> succeeded | failed | cancelled
    running --(lease expired / preempted, infra budget left)--> queued with attempt + 1  (resumes)
    pending|queued|dispatched --(cancel)--> cancelled ; pending --(a parent failed)--> failed
"""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from shared.models.base import Base, Timestamped, UUIDPk, utcnow

# Integer primary keys that autoincrement on both Postgres (BIGSERIAL) and SQLite (INTEGER PK).
BigIntPk = BigInteger().with_variant(Integer(), "sqlite")


class JobStatus(enum.StrEnum):
    PENDING = "pending"
    QUEUED = "queued"
    DISPATCHED = "dispatched"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    PRUNED = "pruned"  # stopped early by its sweep's pruner (ASHA) after checkpointing

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.PRUNED})
ACTIVE = frozenset({JobStatus.QUEUED, JobStatus.DISPATCHED, JobStatus.RUNNING})


def _status_enum() -> Enum:
    return Enum(JobStatus, name="job_status", native_enum=False, length=16, create_constraint=True,
                values_callable=lambda e: [m.value for m in e])


class Job(UUIDPk, Timestamped, Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("project_id", "idempotency_key"),
        Index("ix_jobs_project_status", "project_id", "status"),
        Index("ix_jobs_status_lease", "status", "lease_expires_at"),
        # The dispatcher's per-project heads (services/scheduler/snapshot.py): an index probe per project and
        # worker kind, LIMIT k, whatever the queue's length. Partial: only queued rows are in it. Postgres only:
        # the embedded stack (SQLite) ranks its few rows with ROW_NUMBER.
        Index("ix_jobs_queued_heads", "project_id", "worker_kind", text("priority DESC"), "queued_at", "id",
              postgresql_where=text("status = 'queued'")).ddl_if(dialect="postgresql"),
        Index("ix_jobs_finished_at", "finished_at"),  # recent GPU usage (fair share) reads a time window
    )

    # Columns: ownership
    project_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    experiment_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("experiments.id", ondelete="CASCADE"), index=True)
    name: Mapped[str | None] = mapped_column(String(200), default=None)

    # Columns: what to run
    kind: Mapped[str] = mapped_column(String(32), index=True)
    worker_kind: Mapped[str] = mapped_column(String(32))
    spec: Mapped[dict[str, Any]]
    inputs: Mapped[dict[str, Any]] = mapped_column(default=dict)  # resolved at submit (dataset ids, parents)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), default=None)
    request_hash: Mapped[str | None] = mapped_column(String(64), default=None)

    # Columns: state
    status: Mapped[JobStatus] = mapped_column(_status_enum(), default=JobStatus.QUEUED)
    status_reason: Mapped[str | None] = mapped_column(Text, default=None)
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    infra_failures: Mapped[int] = mapped_column(Integer, default=0)
    user_failures: Mapped[int] = mapped_column(Integer, default=0)
    max_infra_retries: Mapped[int] = mapped_column(Integer, default=3)
    max_user_retries: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # Why a stop was requested, when it is not a plain cancel: "pruned" (a sweep's pruner) ends as pruned.
    stop_reason: Mapped[str | None] = mapped_column(String(16), default=None)
    # The scheduler asked this attempt to stop for a higher-priority job (checkpoint, re-queue, resume).
    preempt_requested: Mapped[bool] = mapped_column(Boolean, default=False)

    # Columns: scheduling (services/scheduler/admission.py)
    pool: Mapped[str | None] = mapped_column(String(64), default=None)  # GPU pool it was dispatched to
    wait_reason: Mapped[str | None] = mapped_column(Text, default=None)  # why a queued job has not started

    # Columns: the current attempt's lease
    worker_id: Mapped[str | None] = mapped_column(String(200), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)

    # Columns: progress and results
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    eta_seconds: Mapped[float | None] = mapped_column(Float, default=None)
    result: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # Named values the method produced (``ctx.save_output``); pipelines pass them to later steps.
    outputs: Mapped[dict[str, Any]] = mapped_column(default=dict)
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64), default=None)

    # Columns: timeline
    queued_at: Mapped[datetime | None] = mapped_column(default=None)
    dispatched_at: Mapped[datetime | None] = mapped_column(default=None)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class JobDependency(Base):
    __tablename__ = "job_dependencies"

    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    parent_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True,
                                                 index=True)


class Outbox(Base):
    """Messages to publish, written in the same transaction as the state change that needs them."""

    __tablename__ = "outbox"
    __table_args__ = (Index("ix_outbox_pending", "published_at", "queue"),)

    id: Mapped[int] = mapped_column(BigIntPk, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    queue: Mapped[str] = mapped_column(String(64))
    priority: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    published_at: Mapped[datetime | None] = mapped_column(default=None)
    publish_attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)


class JobEvent(Base):
    """Progress, metrics, log lines and state changes, in order, for ``GET /v1/jobs/{id}/events``."""

    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_job_id_id", "job_id", "id"),)

    id: Mapped[int] = mapped_column(BigIntPk, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer)
    ts: Mapped[datetime] = mapped_column(default=utcnow)
    type: Mapped[str] = mapped_column(String(32))
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)


class Worker(Base):
    """A live worker process, as the control plane sees it (heartbeats drive liveness probes)."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32), index=True)
    hostname: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow)
    current_job_id: Mapped[uuid.UUID | None] = mapped_column(default=None)
