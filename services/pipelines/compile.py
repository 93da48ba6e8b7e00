"""Check a pipeline definition without touching the database: parameters, references, output types, the graph
and every step's spec (validated by its kind's model, with typed placeholders for what only exists at run time).

``compile_pipeline`` returns the definition stored on the pipeline row (``Pipeline.definition``) or raises
``PipelineInvalid`` listing every problem with its field (``steps.<step>.<field>``).
"""

from __future__ import annotations

import graphlib
import re
from typing import Any

from pydantic import ValidationError

from services.errors import Invalid
from services.pipelines.refs import KEEP, BadReference, Path, Ref, refs_in, substitute
from shared import kinds
from shared.specs import UnknownKind, parse_spec

STEP_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
RESERVED = ("foreach", "after", "cache")  # step keys that are not part of the job spec
MAX_STEPS = 50
MAX_FANOUT = 100
BUILTIN_OUTPUTS: dict[str, str] = {"checkpoints": "list[model]"}  # every job kind makes these
_ZERO = "00000000-0000-0000-0000-000000000000"
PLACEHOLDERS: dict[str, Any] = {"model": f"artifact:{_ZERO}", "file": f"artifact:{_ZERO}",
                                "dataset": _ZERO, "value": 1}


class PipelineInvalid(Invalid):
    """Several problems at once, each with its own field."""

    def __init__(self, problems: list[tuple[list[str | int], str]]) -> None:
        super().__init__("; ".join(f"{'.'.join(map(str, loc))}: {msg}" for loc, msg in problems),
                         loc=problems[0][0] if problems else None)
        self.problems = problems

    def detail(self) -> list[dict[str, object]]:
        return [{"loc": loc, "msg": msg, "type": self.error_type} for loc, msg in self.problems]


def output_types(kind: str) -> dict[str, str]:
    try:
        declared = dict(kinds.job_kind(kind).outputs)
    except UnknownKind:
        declared = {}
    return {**BUILTIN_OUTPUTS, **declared}


def ref_type(ref: Ref, step_kinds: dict[str, str], fanouts: frozenset[str] | set[str] = frozenset()) -> str | None:
    """The type of a step reference, or None when the step has no such output. A reference to a fan-out step
    (one of ``fanouts``) gathers its jobs' values in item order: ``T`` becomes ``list[T]``."""
    typ = "model" if ref.output == "checkpoint" else output_types(step_kinds[ref.name]).get(ref.output)
    if typ is not None and ref.name in fanouts:
        return None if typ.startswith("list[") else f"list[{typ}]"
    return typ


def apply_params(value: Any, params: dict[str, Any], loc: list[str | int],
                 problems: list[tuple[list[str | int], str]]) -> Any:
    def lookup(ref: Ref, path: Path) -> Any:
        if ref.scope != "params":
            return KEEP
        if ref.name not in params:
            problems.append(([*loc, *path], f"unknown parameter {ref.name!r}; parameters: "
                                            f"{', '.join(params) or '(none)'}"))
            return KEEP
        return params[ref.name]

    return substitute(value, lookup)


def compile_pipeline(steps: dict[str, Any], params: dict[str, Any], *, experiment: str = "default",
                     loc: tuple[str, ...] = ("body",)) -> dict[str, Any]:
    problems: list[tuple[list[str | int], str]] = []
    base: list[str | int] = [*loc, "steps"]
    if not isinstance(steps, dict) or not steps:
        raise PipelineInvalid([(base, "a pipeline needs at least one step: a mapping of step name to job spec")])
    if len(steps) > MAX_STEPS:
        raise PipelineInvalid([(base, f"{len(steps)} steps; at most {MAX_STEPS}")])
    step_kinds: dict[str, str] = {}
    fanouts = {n for n, raw in steps.items() if isinstance(raw, dict) and raw.get("foreach") is not None}
    for name, raw in steps.items():
        if not STEP_NAME_RE.match(str(name)):
            problems.append(([*base, name], "step names are 1-64 lower-case letters, digits, '_' or '-'"))
        elif not isinstance(raw, dict):
            problems.append(([*base, name], "a step is a job spec (a mapping with `kind`)"))
        else:
            step_kinds[name] = str(raw.get("kind"))
    if problems:
        raise PipelineInvalid(problems)

    compiled: dict[str, dict[str, Any]] = {}
    graph: dict[str, set[str]] = {}
    edge_field: dict[tuple[str, str], list[str | int]] = {}
    for name, raw in steps.items():
        sloc: list[str | int] = [*base, name]
        raw = apply_params(raw, params, sloc, problems)
        spec = {k: v for k, v in raw.items() if k not in RESERVED}
        spec.setdefault("experiment", experiment)
        after = raw.get("after") or []
        foreach = raw.get("foreach")
        if not (isinstance(after, list) and all(isinstance(a, str) for a in after)):
            problems.append(([*sloc, "after"], "must be a list of step names"))
            after = []
        graph[name] = set()
        for i, a in enumerate(after):
            if a not in steps:
                problems.append(([*sloc, "after", i], f"no step {a!r}; steps: {', '.join(steps)}"))
            else:
                graph[name].add(a)
                edge_field.setdefault((name, a), [*sloc, "after", i])
        item_type: str | None = None
        if foreach is not None:
            item_type = _foreach_type(foreach, sloc, steps, step_kinds, problems, graph, edge_field, name)
        try:
            found = list(refs_in(spec))
        except BadReference as e:
            problems.append(([*sloc, *e.path], str(e)))
            continue
        value_paths: list[Path] = []
        for path, ref in found:
            floc = [*sloc, *path]
            if ref.scope == "item":
                if foreach is None:
                    problems.append((floc, "${item} is only defined in a fan-out step (one with `foreach`)"))
                elif item_type == "value":
                    value_paths.append(path)
                continue
            if ref.scope != "steps":
                continue
            if ref.name not in steps:
                problems.append((floc, f"no step {ref.name!r}; steps: {', '.join(steps)}"))
                continue
            if ref.name == name:
                problems.append((floc, f"step {name!r} cannot use its own outputs"))
                continue
            if steps[ref.name].get("foreach") is not None and ref_type(ref, step_kinds) not in (None, "model",
                                                                                            "file", "dataset", "value"):
                problems.append((floc, f"step {ref.name!r} fans out into several jobs; its list output "
                                       f"{ref.output!r} cannot be gathered (its single-valued outputs and "
                                       "`checkpoint` can: they become lists in item order)"))
                continue
            typ = ref_type(ref, step_kinds, fanouts)
            if typ is None:
                have = ", ".join(["checkpoint", *(f"outputs.{o}" for o in output_types(step_kinds[ref.name]))])
                problems.append((floc, f"step {ref.name!r} ({step_kinds[ref.name]}) has no output "
                                       f"{ref.output!r}; it has: {have}"))
                continue
            if typ == "value":
                value_paths.append(path)
            graph[name].add(ref.name)
            edge_field.setdefault((name, ref.name), floc)
        _validate_spec(name, spec, step_kinds, item_type, value_paths, sloc, problems, fanouts)
        compiled[name] = {"kind": step_kinds[name], "spec": spec, "foreach": foreach, "after": after,
                          "cache": bool(raw.get("cache", False))}
    if problems:
        raise PipelineInvalid(problems)
    try:
        order = list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as e:
        cycle: list[str] = list(e.args[1])  # [a, b, ..., a]: each depends on the next... reversed by graphlib
        first, nxt = cycle[1], cycle[0]
        field = edge_field.get((first, nxt), [*base, first])
        raise PipelineInvalid([(field, f"steps form a cycle: {' -> '.join(reversed(cycle))}; "
                                       "a step can only use steps that run before it")]) from None
    for name in compiled:
        compiled[name]["parents"] = sorted(graph[name])
    return {"order": order, "steps": compiled}


def _foreach_type(foreach: Any, sloc: list[str | int], steps: dict[str, Any], step_kinds: dict[str, str],
                  problems: list[tuple[list[str | int], str]], graph: dict[str, set[str]],
                  edge_field: dict[tuple[str, str], list[str | int]], name: str) -> str | None:
    floc = [*sloc, "foreach"]
    if isinstance(foreach, list):
        if not foreach or len(foreach) > MAX_FANOUT:
            problems.append((floc, f"must list 1-{MAX_FANOUT} items"))
        return "value"
    found = list(refs_in(foreach)) if isinstance(foreach, str) else []
    if len(found) != 1 or found[0][1].scope != "steps":
        problems.append((floc, "must be a list, ${params.<list>} or ${steps.<step>.outputs.<list>}"))
        return None
    ref = found[0][1]
    if ref.name not in steps or ref.name == name:
        problems.append((floc, f"no earlier step {ref.name!r}; steps: {', '.join(steps)}"))
        return None
    typ = ref_type(ref, step_kinds)
    if typ is None or not (typ.startswith("list[") or typ == "value"):
        problems.append((floc, f"{ref.text} is {'not an output' if typ is None else 'a ' + typ}; "
                               "foreach needs a list output"))
        return None
    graph[name].add(ref.name)
    edge_field.setdefault((name, ref.name), floc)
    return typ[5:-1] if typ.startswith("list[") else "value"


def _validate_spec(name: str, spec: dict[str, Any], step_kinds: dict[str, str], item_type: str | None,
                   value_paths: list[Path], sloc: list[str | int], problems: list[tuple[list[str | int], str]],
                   fanouts: set[str]) -> None:
    """Validate with placeholders; errors at fields that take a run-time value are left to run time."""

    def placeholder(ref: Ref, path: Path) -> Any:
        if ref.scope == "item":
            return PLACEHOLDERS.get(item_type or "value", 1)
        if ref.scope == "steps":
            typ = ref_type(ref, step_kinds, fanouts) or "value"
            if typ.startswith("list["):
                return [PLACEHOLDERS[typ[5:-1]]]
            return PLACEHOLDERS[typ]
        return KEEP

    rendered = substitute(spec, placeholder)
    try:
        parse_spec(rendered)
    except UnknownKind as e:
        problems.append(([*sloc, "kind"], str(e)))
    except ValidationError as e:
        skip = {tuple(p) for p in value_paths}
        for err in e.errors():
            eloc = list(err["loc"])
            if eloc and eloc[0] == step_kinds[name]:
                eloc = eloc[1:]  # the discriminated union's tag
            if any(tuple(eloc[:len(p)]) == p for p in skip) or any(loc == [*sloc, *eloc] for loc, _ in problems):
                continue  # a run-time value, or a field already reported (its reference was wrong)
            msg = str(err["msg"]).removeprefix("Value error, ")
            gathered = next((r.name for p, r in refs_in(spec) if r.scope == "steps" and r.name in fanouts
                             and tuple(eloc[:len(p)]) == p), None)
            if gathered is not None:
                msg += f" (step {gathered!r} fans out into several jobs: a reference to it is the list of its " \
                       "jobs' values, in item order)"
            problems.append(([*sloc, *eloc], msg))
