"""Engine and sessions, created lazily per process (never before a fork), and the schema-head check."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker

from shared.config import Settings, get_settings

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"

_lock = threading.Lock()
_engine: Engine | None = None
_sessionmaker: sessionmaker[Session] | None = None


class SchemaOutOfDate(RuntimeError):
    """The database is not at the migration head this code expects."""


def make_engine(settings: Settings) -> Engine:
    url = settings.DATABASE_URL
    if url.startswith("sqlite"):
        path = url.removeprefix("sqlite:///")
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # Several processes share the embedded SQLite file: wait for locks instead of failing at once.
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:  # DB-API objects: untyped by design
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    # Fail fast instead of hanging: a bounded connect, a server-side statement timeout and a bounded wait for a
    # pooled connection, so a database outage turns into an error (503) within seconds, never a stuck thread.
    # pool_pre_ping replaces connections a restarted server closed, so recovery needs no restart of ours.
    connect_args: dict[str, object] = {}
    if url.startswith("postgresql"):
        connect_args = {"connect_timeout": settings.DB_CONNECT_TIMEOUT_SECONDS,
                        "options": f"-c statement_timeout={int(settings.DB_STATEMENT_TIMEOUT_SECONDS * 1000)}"}
    return create_engine(
        url, pool_pre_ping=True, pool_size=settings.DB_POOL_SIZE, max_overflow=10, pool_recycle=1800,
        pool_timeout=settings.DB_POOL_TIMEOUT_SECONDS, connect_args=connect_args,
    )


def get_engine() -> Engine:
    global _engine, _sessionmaker
    with _lock:
        if _engine is None:
            _engine = make_engine(get_settings())
            _sessionmaker = sessionmaker(_engine, expire_on_commit=False)
        return _engine


def dispose_engine() -> None:
    """Drop the process's engine (after a fork, or when tests switch databases)."""
    global _engine, _sessionmaker
    with _lock:
        if _engine is not None:
            _engine.dispose()
        _engine = None
        _sessionmaker = None


def new_session() -> Session:
    get_engine()
    assert _sessionmaker is not None
    return _sessionmaker()


@contextmanager
def session_scope() -> Iterator[Session]:
    """A session that commits on success, rolls back on any error and always closes."""
    session = new_session()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


# --- migrations ------------------------------------------------------------------------------
def alembic_config(database_url: str | None = None) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", (database_url or get_settings().DATABASE_URL).replace("%", "%%"))
    return cfg


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    heads = ScriptDirectory.from_config(alembic_config()).get_heads()
    if len(heads) != 1:
        raise RuntimeError(f"migrations have {len(heads)} heads ({heads}); merge them with `alembic merge`")
    return heads[0]


def current_revision(engine: Engine | None = None) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with (engine or get_engine()).connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade_to_head(database_url: str | None = None) -> None:
    from alembic import command

    command.upgrade(alembic_config(database_url), "head")


def check_schema(engine: Engine | None = None) -> None:
    """Refuse to run on a database that is not at the migration head; say how to fix it."""
    head, current = head_revision(), current_revision(engine)
    if current != head:
        raise SchemaOutOfDate(
            f"database schema is at revision {current or 'none (empty database)'}, this code needs {head}: "
            "back up the database, then run `crucible db upgrade`"
        )


def ping(engine: Engine | None = None) -> None:
    with (engine or get_engine()).connect() as conn:
        conn.execute(text("SELECT 1"))
