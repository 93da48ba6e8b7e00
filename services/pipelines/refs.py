"""The reference syntax of pipeline steps, and substitution of references into a step's spec.

Inside any string of a step's spec:

* ``${params.<p>}``                 a parameter of the pipeline (or template), substituted at submit;
* ``${steps.<step>.checkpoint}``     that step's final checkpoint (a ``job:<id>`` checkpoint reference);
* ``${steps.<step>.outputs.<name>}`` a named output of that step: ``checkpoints`` (every checkpoint it wrote,
  as a list of ``artifact:<id>``) or an output its job kind declares (``JobKind.outputs``, made with
  ``ctx.save_output``);
* ``${item}``                         in a fan-out step (``foreach``), the item this job runs for.

A reference to a FAN-OUT step's ``checkpoint`` or single-valued output gathers it (a fan-in): the list of its
jobs' values in item order (e.g. ``experts: ${steps.train.checkpoint}`` is ``[job:<id of item 0>, ...]``); the
referencing step waits for every item.

A string that is exactly one reference takes the referenced value with its type (a number stays a number, a
list stays a list); a reference inside a longer string is interpolated as text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

REF_RE = re.compile(
    r"\$\{\s*(?:params\.(?P<param>[A-Za-z0-9_-]+)"
    r"|steps\.(?P<step>[A-Za-z0-9_-]+)\.(?:(?P<ckpt>checkpoint)|outputs\.(?P<output>[A-Za-z0-9_.-]+))"
    r"|(?P<item>item))\s*\}"
)
ANY_REF_RE = re.compile(r"\$\{[^}]*\}")

Path = tuple[str | int, ...]


@dataclass(frozen=True)
class Ref:
    """One parsed reference: ``scope`` is "params", "steps" or "item"."""

    scope: str
    name: str = ""  # the parameter, or the step
    output: str = ""  # "checkpoint" or the output's name (scope "steps")

    @property
    def text(self) -> str:
        if self.scope == "params":
            return f"${{params.{self.name}}}"
        if self.scope == "item":
            return "${item}"
        tail = "checkpoint" if self.output == "checkpoint" else f"outputs.{self.output}"
        return f"${{steps.{self.name}.{tail}}}"


class BadReference(ValueError):
    def __init__(self, path: Path, message: str) -> None:
        super().__init__(message)
        self.path = path


def parse(match: re.Match[str]) -> Ref:
    if match["param"]:
        return Ref("params", match["param"])
    if match["item"]:
        return Ref("item")
    return Ref("steps", match["step"], "checkpoint" if match["ckpt"] else match["output"])


def walk(value: Any, path: Path = ()) -> Iterator[tuple[Path, str]]:
    """Every string in a JSON-like value, with its path."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from walk(v, (*path, str(k)))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from walk(v, (*path, i))


def refs_in(value: Any, path: Path = ()) -> Iterator[tuple[Path, Ref]]:
    """Every reference in ``value`` (a malformed ``${...}`` is a BadReference naming its field)."""
    for p, s in walk(value, path):
        for m in ANY_REF_RE.finditer(s):
            full = REF_RE.fullmatch(m.group(0))
            if full is None:
                raise BadReference(p, f"malformed reference {m.group(0)!r}; use ${{params.<p>}}, "
                                      "${steps.<step>.checkpoint}, ${steps.<step>.outputs.<name>} or ${item}")
            yield p, parse(full)


def substitute(value: Any, lookup: Callable[[Ref, Path], Any], path: Path = ()) -> Any:
    """Replace references by ``lookup(ref, path)``; a reference that is a whole string keeps its value's type,
    ``lookup`` returning ``KEEP`` leaves that reference as written."""
    if isinstance(value, dict):
        return {k: substitute(v, lookup, (*path, str(k))) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, lookup, (*path, i)) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value
    whole = REF_RE.fullmatch(value.strip())
    if whole is not None:
        got = lookup(parse(whole), path)
        return value if got is KEEP else got

    def text(m: re.Match[str]) -> str:
        got = lookup(parse(m), path)
        if got is KEEP:
            return m.group(0)
        return got if isinstance(got, str) else json.dumps(got)

    return REF_RE.sub(text, value)


class _Keep:
    def __repr__(self) -> str:
        return "KEEP"


KEEP: Any = _Keep()
