"""Live progress for ``crucible pipeline follow`` and ``crucible sweep follow``: poll a resource, render it as
(label, progress) lines and show one progress bar per line, until the resource's status is terminal."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import typer

from services.cli.client import Client

TERMINAL = ("succeeded", "failed", "cancelled")


def follow_bars(what: str, ident: str, path: str, render: Callable[[dict[str, Any]], list[tuple[str, float]]], *,
                interval: float = 1.0, width: int = 60) -> None:
    """Show ``render(GET path)`` as progress bars until its ``status`` is terminal, then print the outcome; exit 1
    unless it succeeded (a script can chain on it)."""
    from tqdm import tqdm

    client = Client()
    bars: list[tqdm] = []
    obj: dict[str, Any] = {}
    try:
        while True:
            obj = client.request("GET", path)
            lines = render(obj)
            while len(bars) < len(lines):
                bars.append(tqdm(total=100, position=len(bars), leave=True, dynamic_ncols=True, file=sys.stderr,
                                 bar_format=f"{{desc:{width}.{width}}} {{percentage:3.0f}}%|{{bar}}|"))
            for bar, (label, progress) in zip(bars, lines, strict=False):
                bar.set_description_str(label, refresh=False)
                bar.n = round(progress * 100, 1)
                bar.refresh()
            if obj["status"] in TERMINAL:
                break
            time.sleep(interval)
    finally:
        for bar in bars:
            bar.close()
    reason = f" - {obj['status_reason']}" if obj.get("status_reason") else ""
    typer.echo(f"{what} {ident}: {obj.get('status')}{reason}")
    if obj.get("status") != "succeeded":
        raise typer.Exit(1)
