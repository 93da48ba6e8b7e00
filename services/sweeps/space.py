"""The search space: checked against the base job's kind at submit, mapped onto optuna distributions, and applied
to the base spec for each trial.

A 422 names the field: ``base.<field>`` for a base spec that does not validate, ``search_space.<path>`` for a path
the kind has no field at, or a value of the range that its field refuses (each range is checked at both ends,
each categorical choice on its own).
"""

from __future__ import annotations

import copy
import types
import typing
from typing import Any

from pydantic import BaseModel, ValidationError

from services.errors import Invalid
from services.pipelines.compile import PipelineInvalid
from shared.specs import UnknownKind, parse_spec, spec_model
from shared.specs.sweeps import MAX_GRID, CategoricalParam, FloatParam, IntParam, SweepSpec

Problems = list[tuple[list[str | int], str]]
AnyParam = FloatParam | IntParam | CategoricalParam


class SweepInvalid(PipelineInvalid):
    """Several problems at once, each with its field (the pipelines' multi-problem 422)."""


def set_path(spec: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of ``spec`` with the dotted ``path`` set to ``value`` (missing parents become mappings)."""
    out = copy.deepcopy(spec)
    node = out
    *parents, leaf = path.split(".")
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[leaf] = value
    return out


def apply(base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    out = base
    for path, value in params.items():
        out = set_path(out, path, value)
    return out


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside ``annotation`` (``Model``, ``Model | None``), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _model_of(arg)
            if found is not None:
                return found
    return None


def _is_mapping(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_is_mapping(a) for a in typing.get_args(annotation))
    return origin is dict or annotation is dict


def path_problem(model: type[BaseModel], path: str) -> str | None:
    """Why ``path`` names no field of ``model`` (None when it does)."""
    current: type[BaseModel] | None = model
    parts = path.split(".")
    for i, part in enumerate(parts):
        assert current is not None
        fields = current.model_fields
        if part not in fields:
            where = ".".join(parts[:i]) or current.__name__
            return f"{where} has no field {part!r}; fields: {', '.join(sorted(fields))}"
        annotation = fields[part].annotation
        if i == len(parts) - 1:
            return None
        if _is_mapping(annotation):
            return None  # a free-form mapping (e.g. tags): any key
        current = _model_of(annotation)
        if current is None:
            here = ".".join(parts[:i + 1])
            return f"{here} is a value, not a group of fields; search {here} itself"
    return None


def probe_values(param: AnyParam) -> list[Any]:
    """The values checked against the base kind at submit: both ends of a range, every choice."""
    if isinstance(param, CategoricalParam):
        return list(param.choices)
    return [param.low, param.high]


def grid_space(spec: SweepSpec) -> tuple[dict[str, list[Any]], Problems]:
    grid: dict[str, list[Any]] = {}
    problems: Problems = []
    for path, param in spec.search_space.items():
        values = param.grid()
        if values is None:
            problems.append((["body", "search_space", path],
                             "the grid sampler needs `choices`, an int range, or a float range with `step` "
                             f"(at most {MAX_GRID} values)"))
        else:
            grid[path] = values
    return grid, problems


def grid_size(grid: dict[str, list[Any]]) -> int:
    n = 1
    for values in grid.values():
        n *= len(values)
    return n


def anchor(spec: SweepSpec) -> dict[str, Any]:
    """The base spec with every searched field at its first probe value (a field only the search space sets
    need not be in the base)."""
    return apply(spec.base, {path: probe_values(p)[0] for path, p in spec.search_space.items()})


def check(spec: SweepSpec) -> tuple[str, int]:
    """Validate the sweep against its base kind; returns (kind, effective trial budget) or raises a 422."""
    try:
        model = spec_model(str(spec.base.get("kind")))
    except UnknownKind as e:
        raise Invalid(str(e), loc=["body", "base", "kind"]) from None
    kind = str(spec.base["kind"])
    problems: Problems = []
    for path in spec.search_space:
        why = path_problem(model, path)
        if why is not None:
            problems.append((["body", "search_space", path], f"base spec of kind {kind!r}: {why}"))
    if problems:
        raise SweepInvalid(problems)
    base = anchor(spec)
    try:
        parse_spec(base)
    except ValidationError as e:
        raise SweepInvalid([(["body", "base", *_strip_tag(err["loc"], base)], _msg(err["msg"]))
                            for err in e.errors()]) from None
    for path, param in spec.search_space.items():
        for value in probe_values(param):
            try:
                parse_spec(set_path(base, path, value))
            except ValidationError as e:
                err = e.errors()[0]
                field = ".".join(map(str, _strip_tag(err["loc"], base)))
                problems.append((["body", "search_space", path], f"{value!r} is not a valid value for base.{path} "
                                                                 f"({field}: {_msg(err['msg'])}); narrow the range"))
                break
    budget = spec.max_trials
    if spec.sampler.type == "grid":
        grid, more = grid_space(spec)
        problems += more
        if not more:
            budget = min(budget, grid_size(grid))
    if problems:
        raise SweepInvalid(problems)
    return kind, budget


def distributions(spec: SweepSpec) -> dict[str, Any]:
    """optuna distributions, one per searched path (the path is the optuna parameter's name)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out: dict[str, Any] = {}
    for path, p in spec.search_space.items():
        if isinstance(p, FloatParam):
            out[path] = FloatDistribution(p.low, p.high, log=p.log, step=p.step)
        elif isinstance(p, IntParam):
            out[path] = IntDistribution(p.low, p.high, log=p.log, step=p.step)
        else:
            out[path] = CategoricalDistribution(p.choices)
    return out


def _strip_tag(loc: tuple[Any, ...] | list[Any], base: dict[str, Any]) -> list[str | int]:
    out = list(loc)
    if out and out[0] == base.get("kind"):
        out = out[1:]  # the discriminated union's tag
    return out


def _msg(msg: str) -> str:
    return str(msg).removeprefix("Value error, ")
