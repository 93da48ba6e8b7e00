"""The YAML specs in shared/specs/examples are documentation users copy: each must stay a valid spec."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from services.embedded import DEMO_SPEC
from shared.specs import parse_spec

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "shared" / "specs" / "examples").glob("*.yaml"))


def test_there_are_examples_for_every_job_kind() -> None:
    kinds = {yaml.safe_load(p.read_text())["kind"] for p in EXAMPLES}
    assert kinds == {"ssl-train", "distill", "eval"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_parses_as_its_kind(path: Path) -> None:
    raw = yaml.safe_load(path.read_text())
    spec = parse_spec(raw)
    assert spec.kind == raw["kind"]
    # every field the example sets survives validation unchanged (no silently dropped or coerced keys)
    dumped = spec.model_dump(mode="json")
    for key, value in raw.items():
        if not isinstance(value, dict):
            assert dumped[key] == value, key


def test_the_shapes_example_is_the_demo_job() -> None:
    """README: the example reproduces `crucible demo` (same data, model and optimisation)."""
    from services.embedded import demo_spec

    example = yaml.safe_load((EXAMPLES[0].parent / "msf-shapes.yaml").read_text())
    skip = {"experiment", "name"}
    assert {k: v for k, v in example.items() if k not in skip} == {
        k: v for k, v in demo_spec("builtin://shapes").items() if k not in skip}
    assert demo_spec("builtin://shapes") == DEMO_SPEC | {"name": "msf-shapes-demo"}
