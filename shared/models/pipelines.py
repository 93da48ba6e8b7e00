"""Pipelines: a named DAG of steps, each step one job (or, for a fan-out step, one job per item).

``Pipeline.definition`` keeps the steps exactly as compiled at submit (references unresolved); a step's jobs
are created from it when the references can be resolved. ``PipelineJob`` maps steps to jobs: rows of earlier
rounds stay (``current = False``) when a step is retried, so the history of every attempt is kept.

Pipeline status: running -> succeeded | failed | cancelled (a retry moves failed/cancelled back to running).
Step state: waiting (no job yet) -> running (jobs exist) -> succeeded | failed | cancelled | skipped.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import Boolean, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from shared.models.base import Base, JSONType, Timestamped, UUIDPk, utcnow
from shared.models.jobs import BigIntPk

PIPELINE_STATUSES = ("running", "succeeded", "failed", "cancelled")
STEP_STATES = ("waiting", "running", "succeeded", "failed", "cancelled", "skipped")


class Pipeline(UUIDPk, Timestamped, Base):
    __tablename__ = "pipelines"
    __table_args__ = (Index("ix_pipelines_project_status", "project_id", "status"),)

    project_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    experiment: Mapped[str] = mapped_column(String(128), default="default")
    template: Mapped[str | None] = mapped_column(String(128), default=None)
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    definition: Mapped[dict[str, Any]] = mapped_column(default=dict)  # {"steps": {name: {...}}, "order": [...]}
    status: Mapped[str] = mapped_column(String(16), default="running")
    status_reason: Mapped[str | None] = mapped_column(Text, default=None)
    retries: Mapped[int] = mapped_column(Integer, default=0)
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64), default=None)
    mlflow_closed: Mapped[bool] = mapped_column(Boolean, default=False)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class PipelineStep(UUIDPk, Base):
    __tablename__ = "pipeline_steps"
    __table_args__ = (UniqueConstraint("pipeline_id", "name"),)

    pipeline_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("pipelines.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    position: Mapped[int] = mapped_column(Integer)  # topological order
    state: Mapped[str] = mapped_column(String(16), default="waiting")
    state_reason: Mapped[str | None] = mapped_column(Text, default=None)
    items: Mapped[list[Any] | None] = mapped_column(JSONType, default=None)  # a fan-out step's resolved list


class PipelineJob(Base):
    __tablename__ = "pipeline_jobs"
    __table_args__ = (Index("ix_pipeline_jobs_cache_key", "cache_key"),)

    id: Mapped[int] = mapped_column(BigIntPk, primary_key=True, autoincrement=True)
    pipeline_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("pipelines.id", ondelete="CASCADE"), index=True)
    step_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("pipeline_steps.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    item_index: Mapped[int | None] = mapped_column(Integer, default=None)
    current: Mapped[bool] = mapped_column(Boolean, default=True)
    cached: Mapped[bool] = mapped_column(Boolean, default=False)  # reused an earlier job's outputs
    cache_key: Mapped[str | None] = mapped_column(String(64), default=None)
    run_linked: Mapped[bool] = mapped_column(Boolean, default=False)  # its MLflow run carries the parent tag
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
