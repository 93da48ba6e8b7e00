"""Operator commands, run where the database is reachable: ``crucible db``, ``crucible keys``, ``crucible admin``
(storage grants, fair-share quotas)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from services.cli.common import friendly

db_app = typer.Typer(help="Database schema (Alembic migrations).", no_args_is_help=True)
keys_app = typer.Typer(help="Project-scoped API keys.", no_args_is_help=True)
admin_app = typer.Typer(help="Operator commands (run where the database is reachable).", no_args_is_help=True)


@db_app.command("upgrade")
@friendly
def db_upgrade() -> None:
    """Apply every pending migration (back up production databases first)."""
    from shared.db import current_revision, head_revision, upgrade_to_head

    upgrade_to_head()
    typer.echo(f"database at revision {current_revision()} (head {head_revision()})")


@db_app.command("check")
@friendly
def db_check() -> None:
    """Exit non-zero unless the database is at the migration head."""
    from shared.db import check_schema

    check_schema()
    typer.echo("database schema is at head")


# --- keys ---------------------------------------------------------------------------------------------------
@keys_app.command("create")
@friendly
def keys_create(project: Annotated[str, typer.Option(help="project name (created if missing)")],
                name: str = "default",
                expires_in_days: Annotated[float | None, typer.Option(help="expire after this many days")] = None,
                save: Annotated[bool, typer.Option(help="save as this machine's client key")] = False) -> None:
    """Create a project-scoped API key and print it (it is shown only once)."""
    from datetime import timedelta

    from services.projects.service import create_key
    from shared.db import check_schema, session_scope

    check_schema()
    with session_scope() as s:
        _, token = create_key(session=s, project_name=project, name=name,
                              expires_in=timedelta(days=expires_in_days) if expires_in_days is not None else None)
    if save:
        from services.embedded import save_client_config

        save_client_config(api_key=token)
    typer.echo(token)


@keys_app.command("list")
@friendly
def keys_list(project: Annotated[str, typer.Option(help="project name")]) -> None:
    """List a project's keys (id, name, prefix, last use, expiry, revocation)."""
    from sqlalchemy import select

    from services.projects.service import list_keys
    from shared.db import session_scope
    from shared.models import Project

    with session_scope() as s:
        proj = s.scalars(select(Project).where(Project.name == project)).first()
        if proj is None:
            raise ValueError(f"no project {project!r}")
        keys = list_keys(session=s, project_id=proj.id)
        typer.echo(f"{'ID':36}  {'PREFIX':12}  {'NAME':16} {'LAST USED':20} {'EXPIRES':20} STATE")
        for k in keys:
            state = "revoked" if k.revoked_at else "active"
            typer.echo(f"{k.id!s:36}  {k.prefix:12}  {k.name[:16]:16} {_when(k.last_used_at):20} "
                       f"{_when(k.expires_at):20} {state}")


def _when(ts: Any) -> str:
    return ts.strftime("%Y-%m-%d %H:%M:%S") if ts is not None else "-"


@keys_app.command("revoke")
@friendly
def keys_revoke(key: Annotated[str, typer.Argument(help="the key's id (`crucible keys list`), or the key itself")],
                project: Annotated[str | None, typer.Option(help="only look in this project")] = None) -> None:
    """Revoke exactly one key. A prefix shared by several keys is refused, never a mass revoke."""
    from sqlalchemy import select

    from services.errors import DomainError
    from services.projects.service import revoke_key
    from shared.db import session_scope
    from shared.models import Project

    with session_scope() as s:
        project_id = None
        if project is not None:
            proj = s.scalars(select(Project).where(Project.name == project)).first()
            if proj is None:
                raise ValueError(f"no project {project!r}")
            project_id = proj.id
        try:
            revoked = revoke_key(session=s, ref=key, project_id=project_id)
        except DomainError as e:
            raise ValueError(e.message) from None
        typer.echo(f"revoked key {revoked.id} ({revoked.prefix}..., {revoked.name!r}); API replicas stop accepting "
                   "it within seconds")


# --- admin (operators) ---------------------------------------------------------------------------------------------
@admin_app.command("grant-storage")
@friendly
def admin_grant_storage(
    project: Annotated[str, typer.Argument(help="project name")],
    uri: Annotated[str, typer.Argument(help="s3://bucket/prefix/ the project may register datasets inside")],
    revoke: Annotated[bool, typer.Option(help="withdraw the grant instead")] = False,
) -> None:
    """Let a project register datasets (existing prefixes) inside s3://bucket/prefix/; --revoke withdraws it."""
    from services.datasets import storage
    from shared.db import check_schema, session_scope

    check_schema()
    with session_scope() as s:
        if revoke:
            n = storage.revoke(session=s, project_name=project, uri=uri)
            typer.echo(f"revoked {n} grant(s) of {storage.parse_location(uri).uri} for project {project}")
            return
        row = storage.grant(session=s, project_name=project, uri=uri)
        typer.echo(f"project {project} may register datasets inside s3://{row.bucket}/{row.prefix}")


@admin_app.command("list-storage")
@friendly
def admin_list_storage(project: Annotated[str | None, typer.Argument(help="only this project")] = None) -> None:
    """List storage grants (the table's and CRUCIBLE_STORAGE_GRANTS')."""
    from services.datasets import storage
    from shared.db import session_scope

    with session_scope() as s:
        for name, uri in storage.list_grants(session=s, project_name=project):
            typer.echo(f"{name}  {uri}")


@admin_app.command("set-quota")
@friendly
def admin_set_quota(
    project: Annotated[str, typer.Argument(help="project name")],
    gpus: Annotated[int | None, typer.Option(help="most GPUs its jobs hold at once (omit: no limit)")] = None,
    jobs: Annotated[int | None, typer.Option(help="most jobs dispatched or running at once (omit: no limit)")]
    = None,
) -> None:
    """Limit a project's concurrent GPUs and jobs (both omitted: lift its limits). Queued jobs over the quota
    wait, with `quota: ...` as their wait_reason."""
    from services.scheduler import quotas
    from shared.db import check_schema, session_scope

    check_schema()
    with session_scope() as s:
        quotas.set_quota(session=s, project_name=project, max_gpus=gpus, max_jobs=jobs)
    limits = ", ".join(f"{n} {what}" for n, what in ((gpus, "GPUs"), (jobs, "jobs")) if n is not None)
    typer.echo(f"project {project}: at most {limits} at once" if limits else f"project {project}: no limits")


@admin_app.command("quotas")
@friendly
def admin_quotas() -> None:
    """List the projects' quotas."""
    from services.scheduler import quotas
    from shared.db import session_scope

    with session_scope() as s:
        for name, q in quotas.list_quotas(session=s):
            typer.echo(f"{name}  gpus={'-' if q.max_gpus is None else q.max_gpus}  "
                       f"jobs={'-' if q.max_jobs is None else q.max_jobs}")


# --- client verbs -----------------------------------------------------------------------------------------------
