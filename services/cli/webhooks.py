"""``crucible webhooks ...``: register, list and remove the project's webhooks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import typer

from services.cli.client import Client
from services.cli.common import friendly

webhooks_app = typer.Typer(help="Webhooks: signed POSTs when the project's jobs and pipelines end.",
                           no_args_is_help=True)


def _friendly_call(fn: Callable[[], None]) -> None:
    friendly(fn)()


@webhooks_app.command("add")
def add(url: str,
        event: Annotated[list[str] | None, typer.Option("--event", "-e",
                                                        help="e.g. job.failed (repeatable; default: all)")] = None,
        ) -> None:
    """Register URL; prints the signing secret (shown only this once)."""

    def run() -> None:
        body: dict[str, object] = {"url": url, **({"events": event} if event else {})}
        h = Client().request("POST", "/v1/webhooks", json=body)
        typer.echo(f"webhook {h['id']} -> {h['url']} ({', '.join(h['events'])})")
        typer.echo(f"secret: {h['secret']}  (keep it: it is not shown again; verify X-Crucible-Signature with it)")

    _friendly_call(run)


@webhooks_app.command("list")
def list_() -> None:
    """The project's webhooks."""

    def run() -> None:
        for h in Client().request("GET", "/v1/webhooks"):
            typer.echo(f"{h['id']}  {h['url']}  {','.join(h['events'])}")

    _friendly_call(run)


@webhooks_app.command("rm")
def rm(webhook_id: str) -> None:
    """Delete a webhook (its pending deliveries are never sent)."""

    def run() -> None:
        Client().request("DELETE", f"/v1/webhooks/{webhook_id}")
        typer.echo(f"deleted webhook {webhook_id}")

    _friendly_call(run)
