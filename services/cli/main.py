"""``crucible``: the command line. Server roles (api, scheduler, worker, db) and client verbs (submit, jobs,
logs, cancel, datasets, keys) in one tool. Errors are one-line messages, never tracebacks."""

from __future__ import annotations

import json
import logging
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

from services.cli.client import Client
from services.cli.common import friendly, load_yaml_mapping
from services.cli.operator import admin_app, db_app, keys_app
from services.cli.pipelines import pipeline_app
from services.cli.probes import probe_app
from services.cli.sweeps import sweep_app
from services.cli.webhooks import webhooks_app

app = typer.Typer(help="Crucible: submit and follow ML training jobs.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
datasets_app = typer.Typer(help="Upload, register and list datasets.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(keys_app, name="keys")
app.add_typer(datasets_app, name="datasets")
app.add_typer(admin_app, name="admin")
app.add_typer(probe_app, name="probe")
app.add_typer(pipeline_app, name="pipeline")
app.add_typer(sweep_app, name="sweep")
app.add_typer(webhooks_app, name="webhooks")

def _logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# --- server roles -----------------------------------------------------------------------------------------------
@app.command()
@friendly
def api(host: str = "127.0.0.1", port: int = 8000, workers: int = 1) -> None:
    """Serve the REST API (refuses to start on an out-of-date schema)."""
    import uvicorn

    from shared.db import check_schema

    _logging()
    check_schema()
    # uvloop + httptools (uvicorn[standard]); uvicorn's own access log formats a line per request, which costs
    # more than the request itself on the hot paths: services/metrics/middleware.py logs errors and slow
    # requests instead (every request with CRUCIBLE_ACCESS_LOG=all), and Prometheus counts the rest.
    uvicorn.run("services.api.app:create_app", factory=True, host=host, port=port, workers=workers,
                log_level="info", access_log=False, loop="auto", http="auto", backlog=4096)


@app.command()
@friendly
def scheduler() -> None:
    """Run the dispatcher (outbox → queues) and the reconciler (leases, dependencies)."""
    from services.scheduler.loop import run_scheduler

    _logging()
    try:
        run_scheduler()
    except KeyboardInterrupt:
        pass


@app.command()
@friendly
def worker(kind: Annotated[str, typer.Option(help="worker kind, comma-separated kinds, or 'all'")] = "all",
           loglevel: str = "INFO") -> None:
    """Start a worker for one worker kind (concurrency 1, prefetch 1; methods run in child processes)."""
    from workers.worker import parse_kinds, run_worker

    parse_kinds(kind)
    _logging(loglevel)
    run_worker(kind, loglevel=loglevel)


def _parse_sets(sets: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects key=value, got {item!r}")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    for k, v in over.items():
        base[k] = _merge(base.get(k, {}), v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return base


@app.command()
@friendly
def submit(spec_file: Annotated[Path, typer.Argument(help="YAML or JSON job spec", exists=True, dir_okay=False)],
           set_: Annotated[list[str] | None, typer.Option("--set", help="override a field: key=value")] = None,
           follow: Annotated[bool, typer.Option("--follow", "-f", help="follow progress until it ends")] = False,
           idempotency_key: str | None = None) -> None:
    """Submit a job from a spec file (`crucible schema` prints every field)."""
    spec = load_yaml_mapping(spec_file, needs="one job spec")
    spec = _merge(spec, _parse_sets(set_ or []))
    job = Client().submit(spec, idempotency_key=idempotency_key)
    typer.echo(f"submitted {job['kind']} job {job['id']} ({job['status']})")
    if follow:
        _follow(job["id"])


@app.command()
@friendly
def jobs(status: Annotated[list[str] | None, typer.Option(help="filter by status (repeatable)")] = None,
         kind: str | None = None, experiment: str | None = None, limit: int = 20) -> None:
    """List recent jobs."""
    page = Client().jobs(status=status, kind=kind, experiment=experiment, limit=limit)
    typer.echo(f"{'ID':36}  {'KIND':10} {'STATUS':10} {'PROGRESS':>8}  NAME")
    for j in page["items"]:
        typer.echo(f"{j['id']:36}  {j['kind']:10} {j['status']:10} {j['progress'] * 100:7.1f}%  {j['name'] or ''}"
                   + (f"  ({j['wait_reason']})" if j.get("wait_reason") else ""))
    typer.echo(f"({len(page['items'])} of {page['total']})")


@app.command()
@friendly
def show(job_id: str) -> None:
    """Print a job as JSON."""
    typer.echo(json.dumps(Client().job(job_id), indent=2))


@app.command()
@friendly
def status(job_id: str) -> None:
    """One line: the job's status, progress, and why it waits (quota, capacity, dependencies) if it does."""
    j = Client().job(job_id)
    line = f"job {j['id']} {j['status']}"
    if j["status"] == "running":
        line += f" {j['progress'] * 100:.1f}%"
    if j.get("wait_reason"):
        line += f": {j['wait_reason']}"
    elif j.get("status_reason"):
        line += f": {j['status_reason']}"
    typer.echo(line)


@app.command()
@friendly
def logs(job_id: str, follow: Annotated[bool, typer.Option("--follow", "-f")] = False) -> None:
    """Print a job's log lines and events; -f follows with a progress bar until it ends."""
    if follow:
        _follow(job_id)
        return
    for ev in Client().events(job_id):
        typer.echo(_render_event(ev))


@app.command()
@friendly
def cancel(job_id: str) -> None:
    """Cancel a job (a running one gets SIGTERM, a grace period, then SIGKILL)."""
    job = Client().cancel(job_id)
    typer.echo(f"job {job_id}: {job['status']}{' (stopping)' if job['status'] == 'running' else ''}")


@app.command()
@friendly
def schema(kind: Annotated[str | None, typer.Argument(help="job kind; omit to list kinds")] = None) -> None:
    """Print a job kind's JSON schema (the same one the API validates against); without a kind, list the kinds."""
    from shared.kinds import job_kind, job_kinds

    if kind is None:
        rows = [(k.name, k.worker_kind, k.mode, k.summary) for k in job_kinds()]
        widths = [max(len(r[i]) for r in [("kind", "worker", "mode", ""), *rows]) for i in range(3)]
        for row in [("kind", "worker", "mode", "summary"), *rows]:
            typer.echo("  ".join(c.ljust(w) for c, w in zip(row[:3], widths, strict=True)) + "  " + row[3])
        return
    typer.echo(json.dumps(job_kind(kind).spec_model().model_json_schema(), indent=2))  # UnknownKind: a message


def _render_event(ev: dict[str, Any]) -> str:
    data = ev.get("data", {})
    if ev["type"] == "log":
        return str(data.get("line", ""))
    if ev["type"] == "metrics":
        vals = ", ".join(f"{k}={v:.4g}" for k, v in data.get("values", {}).items())
        return f"[metrics step {data.get('step')}] {vals}"
    return f"[{ev['type']}] " + ", ".join(f"{k}={v}" for k, v in data.items())


def _follow(job_id: str) -> dict[str, Any]:
    from tqdm import tqdm

    client = Client()
    bar: tqdm | None = None
    for ev in client.follow(job_id):
        data = ev.get("data", {})
        if ev["type"] == "progress":
            total = int(data.get("total") or 0)
            if bar is None or bar.total != total:
                if bar is not None:
                    bar.close()
                bar = tqdm(total=total, unit=data.get("unit") or "step", dynamic_ncols=True, file=sys.stderr)
            bar.n = int(data.get("done", 0))
            if data.get("epoch") is not None:
                bar.set_description(f"epoch {data['epoch']}")
            bar.refresh()
        elif ev["type"] in ("log", "state", "checkpoint", "retry", "resume", "result", "cancel_requested",
                            "prune_requested"):
            (bar.write if bar is not None else typer.echo)(_render_event(ev))
    if bar is not None:
        bar.close()
    job = client.job(job_id)
    color = typer.colors.GREEN if job["status"] == "succeeded" else typer.colors.RED
    typer.secho(f"job {job_id} {job['status']}" + (f": {job['status_reason']}" if job["status_reason"] else ""),
                fg=color)
    return job


# --- datasets ---------------------------------------------------------------------------------------------------
@datasets_app.command("upload")
@friendly
def datasets_upload(
    path: Annotated[Path, typer.Argument(help="ImageFolder directory or .tar/.tar.gz/.zip", exists=True)],
    name: Annotated[str | None, typer.Option(help="dataset name (default: folder name)")] = None,
    format: Annotated[str, typer.Option("--format", help="images (ImageFolder) or text (a corpus: .jsonl of "  # noqa: A002
                                        "{text, topic?, split?}, or <topic>/<doc>.txt files)")] = "images",
) -> None:
    """Upload an ImageFolder dataset (<class>/<image> or train|test/<class>/<image>) or a text corpus."""
    name = name or path.name.split(".")[0]
    with tempfile.TemporaryDirectory() as tmp:
        archive = path
        if path.is_dir():
            archive = Path(tmp) / f"{name}.tar.gz"
            typer.echo(f"packing {path} ...")
            with tarfile.open(archive, "w:gz") as tar:
                for child in sorted(path.iterdir()):
                    tar.add(child, arcname=child.name)
        ds = Client(timeout=600).upload_dataset(archive, name=name, format=format)
    if format == "text":
        typer.echo(f"dataset {ds['name']} v{ds['version']} ({ds['id']}): {ds['stats'].get('documents')} documents "
                   f"({ds['stats'].get('train')} train / {ds['stats'].get('test')} test), "
                   f"{ds['stats'].get('num_topics')} topics")
        return
    typer.echo(f"dataset {ds['name']} v{ds['version']} ({ds['id']}): {ds['stats'].get('images')} images, "
               f"{ds['stats'].get('num_classes')} classes")


@datasets_app.command("register")
@friendly
def datasets_register(uri: Annotated[str, typer.Argument(help="s3://bucket/prefix/ holding an ImageFolder tree")],
                      name: Annotated[str, typer.Option()]) -> None:
    """Register an ImageFolder tree already in the object store (nothing is copied)."""
    ds = Client().register_dataset(uri, name=name)
    typer.echo(f"dataset {ds['name']} v{ds['version']} ({ds['id']}): {ds['stats'].get('images')} images")


@datasets_app.command("list")
@friendly
def datasets_list() -> None:
    for ds in Client().datasets():
        typer.echo(f"{ds['id']}  {ds['name']}@{ds['version']}  {ds['source']:8} {ds['stats'].get('images')} images")


# --- the embedded stack -------------------------------------------------------------------------------------------
@app.command()
@friendly
def up(port: int = 8000, detach: Annotated[bool, typer.Option(help="return once the stack is ready")] = True) -> None:
    """Start the embedded stack (SQLite, serverless broker, local S3 server, local MLflow store)."""
    from services.embedded import EmbeddedStack

    stack = EmbeddedStack()
    stack.up(api_port=port, echo=typer.echo)
    if not detach:
        stack.wait_forever()


@app.command()
@friendly
def down() -> None:
    """Stop the embedded stack started by `crucible up`."""
    from services.embedded import EmbeddedStack

    EmbeddedStack().down(echo=typer.echo)


@app.command()
@friendly
def demo(
    epochs: Annotated[int | None, typer.Option(help="default: the dataset's demo recipe (README 'Quick start')")]
    = None,
    keep_running: bool = False,
    dataset: Annotated[str, typer.Option(help="a built-in dataset: builtin://shapes, builtin://mnist or "
                                              "builtin://digits")] = "builtin://shapes",
) -> None:
    """Start the embedded stack, train MSF on a built-in dataset over the REST API and report k-NN accuracy
    against the random-init baseline."""
    from services.embedded import demo_spec, run_demo

    spec = demo_spec(dataset, epochs=epochs)  # a bad dataset fails here, before any server starts
    _unwind_on_sigterm()
    run_demo(spec=spec, keep_running=keep_running, echo=typer.echo, follow=_follow)


def _unwind_on_sigterm() -> None:
    """SIGTERM (``kill``, a closed terminal, a CI timeout) unwinds like Ctrl-C, so ``finally`` stops the stack's
    processes; Python's default SIGTERM exits at once and would leave them running."""
    import signal

    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
