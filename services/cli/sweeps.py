"""``crucible sweep ...``: submit a sweep (a YAML file: base spec, search space, objective, budget, early stopping),
follow its trials live with progress bars, print the best trial and its checkpoint, cancel."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from services.cli.client import Client
from services.cli.common import friendly, load_yaml_mapping
from services.cli.progress import follow_bars

sweep_app = typer.Typer(help="Sweeps: hyper-parameter search (optuna: grid, random, TPE; ASHA early stopping).",
                        no_args_is_help=True)


_friendly = friendly


def _load(path: Path) -> dict[str, Any]:
    needs = "`base`, `search_space`, `objective` and `max_trials`"
    body = load_yaml_mapping(path, needs=needs)
    if not {"base", "search_space", "objective"} <= set(body):
        raise ValueError(f"{path} must hold a mapping with {needs}")
    return body


def _fmt(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def render(s: dict[str, Any]) -> list[tuple[str, float]]:
    """(label, progress) lines: the sweep, then one per trial."""
    c = s["counts"]
    best = f", best #{s['best']['trial']} {s['best']['value']:.4g}" if s.get("best") else ""
    metric = s["objective"]["metric"]
    lines = [(f"sweep {s['name']} [{s['status']}] {c['complete']} complete, {c['pruned']} pruned, "
              f"{c['failed']} failed of {s['max_trials']}{best}", s["progress"])]
    for t in s["trials"]:
        value = t["value"] if t["value"] is not None else t["last_value"]
        shown = f" {metric}={value:.4g}" if value is not None else ""
        step = f" @{t['last_step']}" if t["last_step"] is not None and t["state"] != "complete" else ""
        retry = f" (attempt {t['attempt']})" if (t.get("attempt") or 1) > 1 else ""
        lines.append((f"  #{t['number']} [{t['state']}]{retry} {_fmt(t['params'])}{shown}{step}", t["progress"]))
    return lines


@sweep_app.command("submit")
def submit(file: Annotated[Path, typer.Argument(help="YAML sweep (see shared/specs/sweeps/)", exists=True,
                                                dir_okay=False)],
           follow: Annotated[bool, typer.Option("--follow", "-f")] = False) -> None:
    """Submit a sweep from a YAML file."""
    _friendly(_submit)(file, follow)


def _submit(file: Path, follow: bool) -> None:
    s = Client().request("POST", "/v1/sweeps", json=_load(file))
    typer.echo(f"submitted sweep {s['id']} ({s['max_trials']} trials of {s['kind']}, {s['sampler']} sampler, "
               f"early stopping: {s['early_stopping']})")
    if follow:
        _follow(s["id"])


@sweep_app.command("follow")
def follow(sweep_id: str, interval: float = 1.0) -> None:
    """Show the sweep's trials with progress bars until it ends."""
    _friendly(_follow)(sweep_id, interval)


def _follow(sweep_id: str, interval: float = 1.0) -> None:
    follow_bars("sweep", sweep_id, f"/v1/sweeps/{sweep_id}", render, interval=interval, width=70)


@sweep_app.command("best")
def best(sweep_id: str, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """The best trial so far: its value, parameters, job and checkpoint."""

    def run() -> None:
        s = Client().request("GET", f"/v1/sweeps/{sweep_id}")
        b = s.get("best")
        if as_json:
            typer.echo(json.dumps(b, indent=2))
            return
        if b is None:
            raise ValueError(f"sweep {sweep_id} ({s['status']}) has no complete trial yet")
        ckpt = b.get("checkpoint") or {}
        typer.echo(f"best trial #{b['trial']}: {s['objective']['metric']} = {b['value']:.6g} "
                   f"({s['objective']['direction']})")
        typer.echo(f"  params: {_fmt(b['params'])}")
        typer.echo(f"  job: {b['job_id']}  mlflow run: {b.get('mlflow_run_id') or '-'}")
        typer.echo(f"  checkpoint: {ckpt.get('uri', '-')} (artifact:{ckpt.get('artifact_id', '-')})")

    _friendly(run)()


@sweep_app.command("cancel")
def cancel(sweep_id: str) -> None:
    """Stop the sweep: no new trials, running trials are cancelled."""

    def run() -> None:
        s = Client().request("POST", f"/v1/sweeps/{sweep_id}/cancel")
        typer.echo(f"sweep {sweep_id}: {s['status']}")

    _friendly(run)()


@sweep_app.command("show")
def show(sweep_id: str) -> None:
    """Print the sweep (status, trials, best) as JSON."""
    _friendly(lambda: typer.echo(json.dumps(Client().request("GET", f"/v1/sweeps/{sweep_id}"), indent=2)))()
