"""The pipeline compiler (no database): references, output types, cycles, per-step validation; templates."""

from __future__ import annotations

import pytest

from services.errors import Invalid
from services.pipelines import templates
from services.pipelines.compile import PipelineInvalid, compile_pipeline
from services.pipelines.refs import KEEP, substitute
from shared import kinds

TRAIN = {"kind": "ssl-train", "dataset": "builtin://shapes", "limit_train": 64, "batch_size": 32, "bank_size": 64}


def _problems(steps, params=None):
    with pytest.raises(PipelineInvalid) as e:
        compile_pipeline(steps, params or {})
    return [(".".join(map(str, d["loc"])), d["msg"]) for d in e.value.detail()]


def test_a_valid_pipeline_compiles_in_topological_order_with_params_substituted():
    d = compile_pipeline({
        "each": {"kind": "eval", "foreach": "${steps.train.outputs.checkpoints}", "checkpoint": "${item}"},
        "evaluate": {"kind": "eval", "checkpoint": "${steps.train.checkpoint}"},
        "train": {**TRAIN, "epochs": "${params.epochs}", "name": "t-${params.epochs}"},
    }, {"epochs": 3}, experiment="exp")
    assert d["order"].index("train") < d["order"].index("evaluate")
    assert d["order"].index("train") < d["order"].index("each")
    spec = d["steps"]["train"]["spec"]
    assert spec["epochs"] == 3 and spec["name"] == "t-3" and spec["experiment"] == "exp"  # typed, interpolated
    assert d["steps"]["each"]["parents"] == ["train"] and d["steps"]["evaluate"]["spec"]["checkpoint"] == \
        "${steps.train.checkpoint}"  # step references stay until run time


@pytest.mark.parametrize("steps,loc,needle", [
    ({"train": {**TRAIN, "epochs": 0}}, "body.steps.train.epochs", "greater than or equal to 1"),
    ({"train": {**TRAIN, "epoch": 1}}, "body.steps.train.epoch", "Extra inputs"),
    ({"train": {"kind": "nope"}}, "body.steps.train.kind", "unknown job kind 'nope'"),
    ({"a": {"kind": "eval", "checkpoint": "${steps.b.checkpoint}"},
      "b": {"kind": "eval", "checkpoint": "${steps.a.checkpoint}"}}, "body.steps.", "cycle"),
    ({"a": {"kind": "eval", "checkpoint": "${steps.x.checkpoint}"}}, "body.steps.a.checkpoint", "no step 'x'"),
    ({"t": TRAIN, "a": {"kind": "eval", "checkpoint": "${steps.t.outputs.nope}"}}, "body.steps.a.checkpoint",
     "has no output 'nope'"),
    ({"t": TRAIN, "a": {**TRAIN, "epochs": "${steps.t.checkpoint}"}}, "body.steps.a.epochs", "valid integer"),
    ({"t": TRAIN, "a": {"kind": "eval", "foreach": "${steps.t.checkpoint}", "checkpoint": "${item}"}},
     "body.steps.a.foreach", "needs a list"),
    ({"t": {"kind": "eval", "checkpoint": "${item}"}}, "body.steps.t.checkpoint", "only defined in a fan-out"),
    ({"t": {**TRAIN, "epochs": "${params.zz}"}}, "body.steps.t.epochs", "unknown parameter 'zz'"),
    ({"t": {**TRAIN, "epochs": "${bad}"}}, "body.steps.t.epochs", "malformed reference"),
    ({"t": TRAIN, "f": {"kind": "eval", "foreach": [1, 2], "checkpoint": "${steps.t.checkpoint}"},
      "g": {"kind": "eval", "checkpoint": "${steps.f.checkpoint}"}}, "body.steps.g.checkpoint", "fans out"),
    ({"T": TRAIN}, "body.steps.T", "lower-case"),
])
def test_bad_pipelines_name_the_step_and_field(steps, loc, needle):
    problems = _problems(steps)
    assert any(p.startswith(loc) and needle in m for p, m in problems), problems


def test_cycle_error_names_a_step_of_the_cycle_and_the_field_that_closes_it():
    problems = _problems({"a": {"kind": "eval", "checkpoint": "${steps.b.checkpoint}"},
                          "b": {"kind": "eval", "checkpoint": "${steps.c.checkpoint}"},
                          "c": {"kind": "eval", "checkpoint": "${steps.a.checkpoint}", "after": []}})
    (loc, msg), = problems
    assert loc.startswith("body.steps.") and loc.endswith(".checkpoint") and "cycle" in msg


def test_declared_outputs_are_type_checked():
    from shared.kinds import JobKind

    kind = JobKind("clusterer", "shared.specs.eval:EvalSpec", "ssl-trainer", "x:y", "test", outputs={"k": "value"})
    with pytest.raises(ValueError, match="has type"):
        JobKind("bad", "a:b", "ssl-trainer", "x:y", "test", outputs={"k": "number"})  # type: ignore[dict-item]
    assert kind.outputs == {"k": "value"}
    assert kinds.job_kind("ssl-train").outputs == {}


def test_whole_string_references_keep_their_type_and_embedded_ones_are_text():
    out = substitute({"a": "${params.n}", "b": "x-${params.n}", "c": ["${params.l}"], "d": "${item}"},
                     lambda ref, _: {"n": 2, "l": [1, 2]}.get(ref.name, KEEP) if ref.scope == "params" else KEEP)
    assert out == {"a": 2, "b": "x-2", "c": [[1, 2]], "d": "${item}"}


def test_every_template_in_the_repo_compiles_with_its_defaults():
    found = templates.templates()
    assert {t["name"] for t in found} >= {"pretrain-eval", "distill-chain"}
    for t in found:
        assert t["description"], t["name"]
        compile_pipeline(t["steps"], templates.bind_params(t, {}))


def test_template_params_are_checked():
    t = templates.template("pretrain-eval")
    with pytest.raises(Invalid, match="no parameter 'nope'"):
        templates.bind_params(t, {"nope": 1})
    assert templates.bind_params(t, {"epochs": 5})["epochs"] == 5
    with pytest.raises(PipelineInvalid, match="epochs"):
        compile_pipeline(t["steps"], templates.bind_params(t, {"epochs": 0}))
