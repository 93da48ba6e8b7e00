"""Alembic migrations are the only way tables are made, and they match the models on both backends."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine

import shared.models  # noqa: F401 - registers every table
from shared.db import SchemaOutOfDate, check_schema, head_revision, upgrade_to_head
from shared.models.base import Base

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _diff(url: str) -> list:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    finally:
        engine.dispose()


@pytest.mark.integration
def test_models_and_migrations_agree_on_postgres(stack):
    from shared.config import get_settings

    assert _diff(get_settings().DATABASE_URL) == []


@pytest.mark.integration
def test_downgrade_and_upgrade_round_trip_on_a_fresh_postgres_database(stack):
    import psycopg
    from alembic import command

    from shared.config import get_settings
    from shared.db import alembic_config

    base = get_settings().DATABASE_URL.rsplit("/", 1)[0]
    name = f"crucible_mig_{uuid.uuid4().hex[:8]}"
    admin = base.replace("postgresql+psycopg://", "postgresql://", 1) + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        url = f"{base}/{name}"
        engine = create_engine(url)
        with pytest.raises(SchemaOutOfDate, match="crucible db upgrade"):
            check_schema(engine)
        upgrade_to_head(url)
        check_schema(engine)
        command.downgrade(alembic_config(url), "base")
        with pytest.raises(SchemaOutOfDate, match="none"):
            check_schema(engine)
        upgrade_to_head(url)
        assert _diff(url) == []
        engine.dispose()
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_models_and_migrations_agree_on_sqlite(tmp_path):
    url = f"sqlite:///{tmp_path / 'embedded.db'}"
    upgrade_to_head(url)
    assert _diff(url) == []
    check_schema(create_engine(url))


def test_services_refuse_to_start_on_an_out_of_date_schema(tmp_path):
    env = {**os.environ, "CRUCIBLE_HOME": str(tmp_path), "CRUCIBLE_DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}"}
    for args in (["api", "--port", "1"], ["scheduler"], ["worker", "--kind", "ssl-trainer"]):
        r = subprocess.run([sys.executable, "-m", "services.cli.main", *args], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 1, (args, r.stdout, r.stderr)
        assert "crucible db upgrade" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert f"needs {head_revision()}" in r.stderr
