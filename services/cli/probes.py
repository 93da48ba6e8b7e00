"""``crucible probe ...``: container health checks for Kubernetes probes and compose healthchecks.

Worker liveness comes from the heartbeat the control plane sees (the ``workers`` row this pod's worker
refreshes every HEARTBEAT_SECONDS), not from ``celery inspect ping``: a worker busy for hours in a solo pool
cannot answer a ping, but its heartbeat thread keeps the row fresh; a worker whose database connection or
heartbeat thread died is useless to the scheduler even if Celery would still answer.

Each probe prints one line and exits 0 (healthy) or 1 (unhealthy, with what to look at). They import only
the database layer (no torch, no MLflow), so an exec probe costs about a second of CPU.
"""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from typing import Annotated

import typer

probe_app = typer.Typer(help="Health probes for containers (exit 0 healthy, 1 unhealthy).", no_args_is_help=True)


def _fail(msg: str) -> None:
    typer.echo(f"unhealthy: {msg}", err=True)
    raise typer.Exit(1)


@probe_app.command("worker")
def probe_worker(
    max_age: Annotated[float, typer.Option(help="seconds a heartbeat may be old before the worker counts as dead")]
    = 120.0,
    hostname: Annotated[str | None, typer.Option(help="worker host to check (default: this container's hostname, "
                                                      "which is the pod name on Kubernetes)")] = None,
) -> None:
    """Exit 1 unless this host's newest worker row has a heartbeat younger than --max-age."""
    from sqlalchemy import select

    from shared.db import session_scope
    from shared.models import Worker, utcnow

    host = hostname or socket.gethostname()
    try:
        with session_scope() as s:
            # A restarted container keeps its hostname, so an older row may linger until the reconciler prunes
            # it: only the newest heartbeat counts.
            row = s.execute(
                select(Worker.id, Worker.last_heartbeat_at).where(Worker.hostname == host)
                .order_by(Worker.last_heartbeat_at.desc()).limit(1)
            ).first()
    except Exception as e:
        _fail(f"cannot read the workers table ({type(e).__name__}: {e}); check CRUCIBLE_DATABASE_URL and that "
              "Postgres is reachable from this pod")
        return
    if row is None:
        _fail(f"no worker registered from host {host!r}: the worker has not started yet (use a startup probe) "
              "or cannot reach the database")
        return
    age = (utcnow() - row.last_heartbeat_at).total_seconds()
    if age > max_age:
        _fail(f"worker {row.id} last heartbeat {age:.0f}s ago (limit {max_age:.0f}s): its heartbeat thread or "
              "database connection is stuck; see the worker log")
    typer.echo(f"ok: worker {row.id} heartbeat {age:.1f}s ago")


@probe_app.command("scheduler")
def probe_scheduler(
    max_age: Annotated[float, typer.Option(help="seconds since the loop's last cycle before it counts as hung")]
    = 120.0,
) -> None:
    """Exit 1 unless the scheduler loop cycled recently, the database is at the migration head and the broker
    accepts a connection (what a cycle needs; a cycle that fails logs and retries on its own)."""
    import time

    from shared.celery_app import get_celery
    from shared.config import get_settings
    from shared.db import check_schema

    alive = get_settings().SCHEDULER_ALIVE_FILE
    try:
        age = time.time() - alive.stat().st_mtime
    except OSError:
        age = None  # not started yet (or another container): the start-up probe covers this window
    if age is not None and age > max_age:
        _fail(f"the scheduler loop last cycled {age:.0f}s ago (limit {max_age:.0f}s): it is hung; see its log")

    try:
        check_schema()
    except Exception as e:
        _fail(f"database: {type(e).__name__}: {e}")
    try:
        with get_celery().connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=5)
    except Exception as e:
        _fail(f"broker: {type(e).__name__}: {e}; check CRUCIBLE_BROKER_URL")
    typer.echo("ok: database at head, broker reachable")


@probe_app.command("http")
def probe_http(url: Annotated[str, typer.Argument(help="URL that must answer 2xx")] = "http://127.0.0.1:8000/healthz",
               timeout: float = 5.0) -> None:
    """Exit 1 unless URL answers 2xx (images have no curl; this is the Dockerfile HEALTHCHECK)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - operator-given local URL
            status = r.status
    except urllib.error.HTTPError as e:
        status = e.code
    except Exception as e:
        _fail(f"{url}: {type(e).__name__}: {e}")
        return
    if not 200 <= status < 300:
        _fail(f"{url} answered {status}")
    typer.echo(f"ok: {url} answered {status}")

