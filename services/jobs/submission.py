"""The write half of a submission: job + dependencies + outbox row + first events in ONE statement.

On Postgres this is one round trip: data-modifying CTEs, each child ``INSERT … SELECT … FROM j`` so that a
job the ``ON CONFLICT`` skipped (a racing request with the same Idempotency-Key) writes nothing else, and a
``pg_notify`` that wakes the dispatcher when the transaction commits (services/scheduler/wakeup.py). No
insert-then-update, no savepoint. Other databases (SQLite, embedded) get the same rows with a few plain
INSERTs in the caller's transaction; their dispatcher polls.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from sqlalchemy import String, Table, Text, Uuid, cast, column, func, insert, literal, select, true
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import Session

from services.scheduler.wakeup import DISPATCH_CHANNEL
from shared.kinds import queue_for
from shared.models import Job, JobDependency, JobEvent, Outbox
from shared.models.base import UTCDateTime

# declarative models type __table__ as FromClause; for these mapped classes it is their Table
_JOBS: Table = Job.__table__  # type: ignore[assignment]  # a Table (see above)
_DEPS: Table = JobDependency.__table__  # type: ignore[assignment]  # a Table (see above)
_OUTBOX: Table = Outbox.__table__  # type: ignore[assignment]  # a Table (see above)
_EVENTS: Table = JobEvent.__table__  # type: ignore[assignment]  # a Table (see above)


def complete_row(job: Job) -> dict[str, Any]:
    """Every column of the job's row, model defaults filled in, and set on the (transient) object too, so
    the response can be built from it without reading the row back."""
    row: dict[str, Any] = {}
    for col in _JOBS.columns:
        value = getattr(job, col.key, None)
        default = col.default
        if value is None and default is not None and getattr(default, "is_scalar", False):
            value = default.arg  # type: ignore[attr-defined]  # is_scalar: a ScalarElementColumnDefault
        elif value is None and default is not None and getattr(default, "is_callable", False):
            value = default.arg(None)  # type: ignore[attr-defined]  # is_callable: a CallableColumnDefault
        row[col.key] = value
        setattr(job, col.key, value)
    return row


def write(session: Session, job: Job, *, events: list[tuple[str, dict[str, Any]]], parent_ids: list[uuid.UUID],
           enqueue: bool) -> bool:
    """Write the submission; False when a job with the same (project, Idempotency-Key) already exists."""
    row = complete_row(job)
    if session.get_bind().dialect.name == "postgresql":
        return _insert_postgres(session, row, events=events, parent_ids=parent_ids, enqueue=enqueue)
    return _insert_portable(session, row, events=events, parent_ids=parent_ids, enqueue=enqueue)


def _insert_postgres(session: Session, row: dict[str, Any], *, events: list[tuple[str, dict[str, Any]]],
                     parent_ids: list[uuid.UUID], enqueue: bool) -> bool:
    from sqlalchemy.dialects.postgresql import insert as pg_insert

    j = (pg_insert(_JOBS).values(**row)
         .on_conflict_do_nothing(index_elements=[_JOBS.c.project_id, _JOBS.c.idempotency_key])
         .returning(_JOBS.c.id).cte("j"))
    now = literal(row["created_at"], UTCDateTime())
    ctes = []
    # Row lists travel as array parameters (unnest), not as a VALUES list: SQLAlchemy cannot cache a statement
    # holding VALUES data, and compiling this one costs more than executing it.
    if parent_ids:
        par = (func.unnest(literal(parent_ids, ARRAY(Uuid())))
               .table_valued(column("parent_id", Uuid())).render_derived("par"))
        ctes.append(insert(_DEPS).from_select(["job_id", "parent_id"], select(j.c.id, par.c.parent_id)
                                   .join_from(j, par, true())).cte("d"))
    queue = queue_for(row["worker_kind"])
    if enqueue:
        ctes.append(insert(_OUTBOX).from_select(
            ["job_id", "attempt", "queue", "priority", "created_at", "publish_attempts"],
            select(j.c.id, literal(row["attempt"]), literal(queue), literal(row["priority"]), now, literal(0)),
        ).cte("o"))
    ev = func.unnest(literal([t for t, _ in events], ARRAY(String())),
                     cast(literal([json.dumps(d) for _, d in events], ARRAY(Text())), ARRAY(JSONB()))
                     ).table_valued(column("type", String()), column("data", JSONB()), with_ordinality="ord"
                                    ).render_derived("ev")
    ctes.append(insert(_EVENTS).from_select(
        ["job_id", "attempt", "ts", "type", "data"],
        select(j.c.id, literal(row["attempt"]), now, ev.c.type, ev.c.data).join_from(j, ev, true())
        .order_by(ev.c.ord),  # ids in order
    ).cte("e"))
    main = select(j.c.id)
    if enqueue:
        main = main.add_columns(func.pg_notify(DISPATCH_CHANNEL, queue))  # delivered on commit
    return session.execute(main.add_cte(*ctes)).first() is not None


def _insert_portable(session: Session, row: dict[str, Any], *, events: list[tuple[str, dict[str, Any]]],
                     parent_ids: list[uuid.UUID], enqueue: bool) -> bool:
    stmt = insert(_JOBS).values(**row)
    if session.get_bind().dialect.name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        stmt = sqlite_insert(_JOBS).values(**row).on_conflict_do_nothing(
            index_elements=[_JOBS.c.project_id, _JOBS.c.idempotency_key])
    if session.execute(stmt).rowcount != 1:  # type: ignore[attr-defined]  # an INSERT gives a CursorResult
        return False
    if parent_ids:
        session.execute(insert(_DEPS), [{"job_id": row["id"], "parent_id": p} for p in parent_ids])
    if enqueue:
        session.execute(insert(_OUTBOX).values(job_id=row["id"], attempt=row["attempt"],
                                               queue=queue_for(row["worker_kind"]), priority=row["priority"],
                                               created_at=row["created_at"], publish_attempts=0))
    session.execute(insert(_EVENTS), [{"job_id": row["id"], "attempt": row["attempt"], "ts": row["created_at"],
                                       "type": t, "data": d} for t, d in events])
    return True
