"""The kind registry (shared/kinds.py): one registration and every derived view picks a kind up; an unknown
kind is a clear error naming the known ones, never a bare KeyError."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, get_args

import pytest
import yaml
from typer.testing import CliRunner

from services.cli.main import app as cli_app
from shared import kinds
from shared.celery_app import declared_queues, make_celery
from shared.config import Settings
from shared.kinds import JobKind, UnknownKind, WorkerKind, registered
from shared.specs import parse_spec, spec_model, spec_union
from tests.unit.test_spec_examples import EXAMPLES, example_problems
from tests.unit.toy_kind import ToySpec

TOY = JobKind("toy", "tests.unit.toy_kind:ToySpec", "ssl-trainer", "tests.unit.toy_kind:run", "counts to three")


def _union_members() -> set[type]:
    union, _field = get_args(spec_union())
    return set(get_args(union))


def _celery_queues() -> set[str]:
    app = make_celery(Settings(BROKER_URL="memory://"))
    return {q.name for q in app.conf.task_queues}


def test_one_registration_reaches_every_derived_view(tmp_path: Path) -> None:
    before = _union_members()
    assert ToySpec not in before and "toy" not in kinds.JOB_KINDS
    with registered(TOY):
        # the discriminated union, parse_spec and the per-kind lookup
        assert _union_members() == before | {ToySpec}
        spec = parse_spec({"kind": "toy", "steps": 5})
        assert isinstance(spec, ToySpec) and spec.steps == 5
        assert spec_model("toy") is ToySpec
        assert parse_spec({"kind": "ssl-train"}).model_dump()["kind"] == "ssl-train"  # the others still parse
        # routing: the job's queue is one the Celery app declares, the entry point is the toy's
        assert kinds.worker_kind_for("toy") == "ssl-trainer"
        assert TOY.queue == "crucible.ssl-trainer" and TOY.queue in _celery_queues()
        assert kinds.ENTRY_POINTS["toy"] == "tests.unit.toy_kind:run"
        # `crucible schema`: the listing and the kind's JSON schema
        runner = CliRunner()
        listing = runner.invoke(cli_app, ["schema"])
        assert listing.exit_code == 0, listing.output
        toy_row = next(line.split() for line in listing.output.splitlines() if line.startswith("toy "))
        assert toy_row[:3] == ["toy", "ssl-trainer", "job"] and "counts to three" in listing.output
        shown = runner.invoke(cli_app, ["schema", "toy"])
        assert shown.exit_code == 0, shown.output
        assert "steps" in yaml.safe_load(shown.output)["properties"]
        # the examples check: the toy has none yet, and one example file satisfies it
        assert example_problems(EXAMPLES) == ["job kind 'toy' has no example in shared/specs/examples/"]
        (tmp_path / "toy.yaml").write_text("kind: toy\nsteps: 2\n")
        assert example_problems([*EXAMPLES, tmp_path / "toy.yaml"]) == []
        (tmp_path / "bad.yaml").write_text("kind: toy\nsteps: 0\n")
        assert any("bad.yaml" in p and "steps" in p for p in example_problems([*EXAMPLES, tmp_path / "bad.yaml"]))
    # gone again after the block
    assert _union_members() == before and "toy" not in kinds.JOB_KINDS
    with pytest.raises(UnknownKind):
        parse_spec({"kind": "toy"})


def test_a_new_worker_kind_brings_its_queue_and_must_be_deployed() -> None:
    toy_worker = WorkerKind("toy-worker", "runs toys")
    toy = JobKind("toy", TOY.spec, "toy-worker", TOY.entry_point, TOY.summary)
    assert "crucible.toy-worker" not in _celery_queues()
    with registered(toy, toy_worker):  # worker kinds are registered first, whatever the order given
        assert "crucible.toy-worker" in _celery_queues()
        assert "crucible.toy-worker" in {q.name for q in declared_queues()}
        assert kinds.queue_for("toy-worker") == "crucible.toy-worker" and toy.queue == "crucible.toy-worker"
        assert "toy-worker" in kinds.WORKER_KINDS and "toy-worker" in kinds.deployed_worker_kinds()
    assert "toy-worker" not in kinds.WORKER_KINDS and "crucible.toy-worker" not in _celery_queues()


@pytest.mark.parametrize("call", [
    lambda: parse_spec({"kind": "ssl-trian", "dataset": "builtin://shapes"}),
    lambda: spec_model("ssl-trian"),
    lambda: kinds.job_kind("ssl-trian"),
    lambda: kinds.worker_kind_for("ssl-trian"),
    lambda: kinds.JOB_KINDS["ssl-trian"],
    lambda: kinds.ENTRY_POINTS["ssl-trian"],
], ids=["parse_spec", "spec_model", "job_kind", "worker_kind_for", "JOB_KINDS", "ENTRY_POINTS"])
def test_an_unknown_job_kind_names_the_known_ones(call: Any) -> None:
    with registered(TOY), pytest.raises(UnknownKind) as info:
        call()
    msg = str(info.value)
    assert msg.startswith("unknown job kind 'ssl-trian'; known: ") and "ssl-train" in msg and "toy" in msg
    assert isinstance(info.value, ValueError)


def test_a_missing_kind_and_unknown_worker_kinds_are_clear_too() -> None:
    with pytest.raises(UnknownKind, match="a job kind is required; known: ssl-train"):
        parse_spec({"dataset": "builtin://shapes"})
    with pytest.raises(UnknownKind, match=r"unknown job kind \['ssl-train'\]; known: ssl-train"):
        parse_spec({"kind": ["ssl-train"]})
    with pytest.raises(UnknownKind, match="unknown worker kind 'gpu-trainer'; known: ssl-trainer, distiller"):
        kinds.queue_for("gpu-trainer")
    orphan = JobKind("toy", TOY.spec, "gpu-trainer", TOY.entry_point, TOY.summary)
    with pytest.raises(UnknownKind, match="gpu-trainer"), registered(orphan):
        pass
    assert "toy" not in kinds.JOB_KINDS  # a failed registration leaves nothing behind
    assert kinds.JOB_KINDS.get("nope") is None and "nope" not in kinds.JOB_KINDS  # Mapping semantics hold


def test_the_cli_names_the_known_kinds() -> None:
    out = CliRunner().invoke(cli_app, ["schema", "ssl-trian"])
    assert out.exit_code == 1 and "Traceback" not in out.output
    assert "unknown job kind 'ssl-trian'; known: ssl-train, eval, distill" in out.output


def test_declarations_are_checked() -> None:
    with pytest.raises(ValueError, match="module:attribute"):
        JobKind("toy", "ToySpec", "ssl-trainer", TOY.entry_point, TOY.summary)
    with pytest.raises(ValueError, match="mode must be"):
        JobKind("toy", TOY.spec, "ssl-trainer", TOY.entry_point, TOY.summary, mode="daemon")  # type: ignore[arg-type]  # the point of the test
    with pytest.raises(ValueError, match="already registered"), registered(TOY, TOY):
        pass
    wrong = JobKind("toy2", TOY.spec, "ssl-trainer", TOY.entry_point, TOY.summary)  # ToySpec's kind is "toy"
    with pytest.raises(TypeError, match="must declare kind: Literal\\['toy2'\\]"):
        wrong.spec_model()


def test_every_builtin_kind_resolves() -> None:
    """Each declaration names a real spec model and an entry-point module that exists (found, not imported:
    the entry points import torch; the worker tests run them)."""
    names = [k.name for k in kinds.job_kinds()]
    assert names[:3] == ["ssl-train", "eval", "distill"] and "poison" in names
    assert {"clip-train", "clip-pseudo-caption", "clip-eval"} <= set(names)
    assert {"embed", "cluster", "train-expert", "expert-set", "moin-eval"} <= set(names)
    assert kinds.job_kind("router").mode == "service"
    for k in kinds.job_kinds():
        assert k.spec_model().model_fields["kind"].default == k.name
        assert importlib.util.find_spec(k.entry_point.partition(":")[0]) is not None, k.entry_point
        assert k.worker_kind in kinds.WORKER_KINDS and k.mode == ("service" if k.name == "router" else "job")


def test_parse_spec_can_expect_a_kind() -> None:
    from shared.specs import EvalSpec, SslTrainSpec

    spec = parse_spec({"kind": "ssl-train"}, SslTrainSpec)
    assert isinstance(spec, SslTrainSpec)
    with pytest.raises(ValueError, match="expected a spec of kind 'eval', got kind 'ssl-train'"):
        parse_spec({"kind": "ssl-train"}, EvalSpec)
