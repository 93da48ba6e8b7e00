"""The YAML specs in shared/specs/examples are documentation users copy: each must stay a valid spec, and every
registered job kind (shared.kinds) must have at least one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from services.embedded import DEMO_SPEC
from shared.kinds import job_kinds
from shared.specs import parse_spec

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "shared" / "specs" / "examples"
EXAMPLES = sorted(EXAMPLES_DIR.glob("*.yaml"))


def example_problems(paths: list[Path]) -> list[str]:
    """Everything wrong with a set of example files, judged against the kinds registered right now: a kind
    without an example, an example that does not parse as its kind, a field that validation changed."""
    problems: list[str] = []
    seen: set[str] = set()
    for path in paths:
        raw: Any = yaml.safe_load(path.read_text())
        if not isinstance(raw, dict):
            problems.append(f"{path.name}: not a mapping")
            continue
        try:
            spec = parse_spec(raw)
        except ValueError as e:  # UnknownKind and pydantic's ValidationError
            problems.append(f"{path.name}: {e}")
            continue
        dumped = spec.model_dump(mode="json")
        seen.add(dumped["kind"])
        # every field the example sets survives validation unchanged (no silently dropped or coerced keys)
        problems += [f"{path.name}: {key} changed by validation" for key, value in raw.items()
                     if not isinstance(value, dict) and dumped.get(key) != value]
    problems += [f"job kind {k.name!r} has no example in shared/specs/examples/"
                 for k in job_kinds() if k.name not in seen]
    return problems


def test_there_are_examples() -> None:
    assert EXAMPLES, f"no *.yaml in {EXAMPLES_DIR}"


def test_every_registered_kind_has_a_valid_example() -> None:
    assert example_problems(EXAMPLES) == []


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_parses_as_its_kind(path: Path) -> None:
    problems = example_problems([path])
    assert [p for p in problems if not p.startswith("job kind ")] == []
    assert len(problems) == len(job_kinds()) - 1  # the other kinds' examples are in other files


def test_the_shapes_example_is_the_demo_job() -> None:
    """README: the example reproduces `crucible demo` (same data, model and optimisation)."""
    from services.embedded import demo_spec

    example = yaml.safe_load((EXAMPLES_DIR / "msf-shapes.yaml").read_text())
    skip = {"experiment", "name"}
    assert {k: v for k, v in example.items() if k not in skip} == {
        k: v for k, v in demo_spec("builtin://shapes").items() if k not in skip}
    assert demo_spec("builtin://shapes") == DEMO_SPEC | {"name": "msf-shapes-demo"}
