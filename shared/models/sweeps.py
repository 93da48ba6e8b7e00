"""Sweeps: hyper-parameter searches over a base job spec, and their trials (one job each).

``Sweep.definition`` is the validated ``SweepSpec`` (shared/specs/sweeps.py). Samplers and pruners are optuna's; its
study (``Sweep.study_name``) lives in optuna's own tables in this same database (``OPTUNA_TABLES``: made by our
migration 0006, mirrored onto our metadata below so migrations and models keep agreeing). Our rows say which
optuna trial is which job, how far the controller has read the job's metrics, and what optuna was told.

Sweep status: running -> succeeded | failed | cancelled. ``settled``: optuna has been told every trial's end and
nothing is left to do. Trial state: running -> complete | pruned | failed.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import Boolean, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from shared.models.base import Base, Timestamped, UUIDPk, utcnow
from shared.models.jobs import BigIntPk

SWEEP_STATUSES = ("running", "succeeded", "failed", "cancelled")
TRIAL_STATES = ("running", "complete", "pruned", "failed")


class Sweep(UUIDPk, Timestamped, Base):
    __tablename__ = "sweeps"
    __table_args__ = (Index("ix_sweeps_project_status", "project_id", "status"),
                      Index("ix_sweeps_settled", "settled"))

    project_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    experiment: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(32))
    definition: Mapped[dict[str, Any]] = mapped_column(default=dict)  # the validated SweepSpec
    max_trials: Mapped[int] = mapped_column(Integer)  # the budget (capped at the grid's size)
    max_concurrency: Mapped[int] = mapped_column(Integer)
    study_name: Mapped[str] = mapped_column(String(128), unique=True)
    status: Mapped[str] = mapped_column(String(16), default="running")
    status_reason: Mapped[str | None] = mapped_column(Text, default=None)
    settled: Mapped[bool] = mapped_column(Boolean, default=False)
    best: Mapped[dict[str, Any]] = mapped_column(default=dict)  # {trial, value, params, job_id}
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64), default=None)
    mlflow_closed: Mapped[bool] = mapped_column(Boolean, default=False)
    mlflow_best_logged: Mapped[int | None] = mapped_column(Integer, default=None)  # trial of the logged best
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class SweepTrial(Base):
    __tablename__ = "sweep_trials"
    __table_args__ = (UniqueConstraint("sweep_id", "number"),)

    id: Mapped[int] = mapped_column(BigIntPk, primary_key=True, autoincrement=True)
    sweep_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("sweeps.id", ondelete="CASCADE"), index=True)
    number: Mapped[int] = mapped_column(Integer)  # optuna's trial number in the study
    optuna_trial_id: Mapped[int] = mapped_column(Integer)
    job_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), index=True,
                                                     default=None)  # None: the sampled spec was invalid
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    state: Mapped[str] = mapped_column(String(16), default="running")
    reason: Mapped[str | None] = mapped_column(Text, default=None)
    value: Mapped[float | None] = mapped_column(Float, default=None)  # final objective value
    last_step: Mapped[int | None] = mapped_column(Integer, default=None)  # latest intermediate value reported
    last_value: Mapped[float | None] = mapped_column(Float, default=None)
    event_cursor: Mapped[int] = mapped_column(Integer, default=0)  # job events read up to this id
    run_linked: Mapped[bool] = mapped_column(Boolean, default=False)  # its MLflow run is a child of the sweep's
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)


def _mirror_optuna_tables() -> tuple[str, ...]:
    """optuna's RDB tables, copied onto our metadata: migration 0006 creates them, the agreement test checks them,
    and optuna's own table creation and alembic are switched off (services/sweeps/study.py)."""
    from optuna.storages._rdb import models as optuna_models
    from sqlalchemy import CheckConstraint, MetaData
    from sqlalchemy.sql.elements import conv

    names = []
    for table in optuna_models.BaseModel.metadata.sorted_tables:
        if table.name not in Base.metadata.tables:
            copy = table.to_metadata(MetaData())
            for i, c in enumerate(c for c in copy.constraints if isinstance(c, CheckConstraint)):
                if c.name is None:  # our naming convention needs a name: give it a fixed one, as is
                    c.name = conv(f"ck_{table.name}_{i}")
            copy.to_metadata(Base.metadata)
        names.append(table.name)
    return tuple(names)


OPTUNA_TABLES = _mirror_optuna_tables()
