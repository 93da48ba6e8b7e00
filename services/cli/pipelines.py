"""``crucible pipeline ...``: submit a pipeline (a file of steps, or a template), follow its steps live, cancel,
retry and list templates."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from services.cli.client import Client
from services.cli.common import friendly, load_yaml_mapping
from services.cli.progress import follow_bars

pipeline_app = typer.Typer(help="Pipelines: DAGs of jobs, with fan-out and templates.", no_args_is_help=True)


_friendly = friendly


def _load(path: Path) -> dict[str, Any]:
    needs = "`steps` (step name -> job spec) or `template`"
    body = load_yaml_mapping(path, needs=needs)
    if not {"steps", "template"} & set(body):
        raise ValueError(f"{path} must hold a mapping with {needs}")
    return body


def _params(sets: list[str]) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for s in sets:
        key, sep, value = s.partition("=")
        if not sep or not key:
            raise ValueError(f"--param {s!r}: expected name=value")
        out[key] = yaml.safe_load(value)
    return out


def _depth(p: dict[str, Any]) -> dict[str, int]:
    depth: dict[str, int] = {}
    for s in p["steps"]:  # topological order
        depth[s["name"]] = 1 + max((depth[q] for q in s["parents"]), default=-1)
    return depth


def render_tree(p: dict[str, Any]) -> list[tuple[str, float]]:
    """(label, progress) lines: the steps indented by depth, then their jobs."""
    lines = [(f"pipeline {p['name']} [{p['status']}]", p["progress"])]
    depth = _depth(p)
    for s in p["steps"]:
        pad = "  " * depth[s["name"]]
        reason = f" - {s['reason']}" if s.get("reason") and s["state"] != "succeeded" else ""
        lines.append((f"{pad}└ {s['name']} ({s['kind']}) [{s['state']}]{reason}", s["progress"]))
        if s["foreach"]:
            for j in s["jobs"]:
                lines.append((f"{pad}    [{j['item_index']}] {j['status']}{' (cached)' if j['cached'] else ''}",
                              j["progress"]))
    return lines


@pipeline_app.command("submit")
def submit(file: Annotated[Path | None, typer.Argument(help="YAML pipeline: `steps` (or `template` + `params`)",
                                                       exists=True, dir_okay=False)] = None,
           template: Annotated[str | None, typer.Option(help="submit a template instead of a file")] = None,
           param: Annotated[list[str] | None, typer.Option("--param", "-p", help="name=value (repeatable)")] = None,
           follow: Annotated[bool, typer.Option("--follow", "-f")] = False) -> None:
    """Submit a pipeline from a file, or a template with --template NAME --param k=v."""
    _friendly(_submit)(file, template, param or [], follow)


def _submit(file: Path | None, template: str | None, params: list[str], follow: bool) -> None:
    if (file is None) == (template is None):
        raise ValueError("give a pipeline FILE or --template NAME")
    body: dict[str, Any] = _load(file) if file is not None else {"template": template}
    body["params"] = {**(body.get("params") or {}), **_params(params)}
    p = Client().request("POST", "/v1/pipelines", json=body)
    typer.echo(f"submitted pipeline {p['id']} ({len(p['steps'])} steps: {', '.join(s['name'] for s in p['steps'])})")
    if follow:
        _follow(p["id"])


@pipeline_app.command("follow")
def follow(pipeline_id: str, interval: float = 1.0) -> None:
    """Show the pipeline's steps as a live tree with progress bars until it ends."""
    _friendly(_follow)(pipeline_id, interval)


def _follow(pipeline_id: str, interval: float = 1.0) -> None:
    follow_bars("pipeline", pipeline_id, f"/v1/pipelines/{pipeline_id}", render_tree, interval=interval, width=60)


@pipeline_app.command("show")
def show(pipeline_id: str) -> None:
    """Print the pipeline (status, steps, jobs) as JSON."""
    _friendly(lambda: typer.echo(json.dumps(Client().request("GET", f"/v1/pipelines/{pipeline_id}"), indent=2)))()


@pipeline_app.command("cancel")
def cancel(pipeline_id: str) -> None:
    """Cancel every pending, queued and running step of the pipeline."""

    def run() -> None:
        p = Client().request("POST", f"/v1/pipelines/{pipeline_id}/cancel")
        typer.echo(f"pipeline {pipeline_id}: {p['status']}")

    _friendly(run)()


@pipeline_app.command("retry")
def retry(pipeline_id: str) -> None:
    """Re-run the failed or cancelled steps of a pipeline (succeeded steps keep their results)."""

    def run() -> None:
        p = Client().request("POST", f"/v1/pipelines/{pipeline_id}/retry")
        typer.echo(f"pipeline {pipeline_id}: {p['status']} (retry {p['retries']})")

    _friendly(run)()


@pipeline_app.command("templates")
def templates() -> None:
    """List the pipeline templates and their parameters."""

    def run() -> None:
        for t in Client().request("GET", "/v1/pipeline-templates"):
            typer.echo(f"{t['name']}: {t['description']}")
            for k, v in t["params"].items():
                v = v if isinstance(v, dict) else {"default": v}
                default = f" (default {v['default']!r})" if "default" in v else " (required)"
                typer.echo(f"    {k}{default}  {v.get('description', '')}")

    _friendly(run)()
