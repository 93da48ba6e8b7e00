"""Pipeline templates: named, parametrised pipeline definitions kept in the repo (``shared/specs/pipelines``).

A template file holds ``name``, ``description``, ``params`` (each with a ``default`` or ``required: true``, and
a ``description``) and ``steps``, written with ``${params.<p>}`` where a parameter goes.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from services.errors import Invalid, NotFound

TEMPLATES_DIR = Path(__file__).resolve().parents[2] / "shared" / "specs" / "pipelines"


@lru_cache(maxsize=1)
def _load_all() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(TEMPLATES_DIR.glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        if not isinstance(data, dict) or "steps" not in data:
            raise ValueError(f"{path}: a pipeline template needs `name`, `params` and `steps`")
        name = str(data.get("name") or path.stem)
        out[name] = {"name": name, "description": str(data.get("description", "")).strip(),
                     "params": data.get("params") or {}, "steps": data["steps"], "file": path.name}
    return out


def templates() -> list[dict[str, Any]]:
    return list(_load_all().values())


def template(name: str) -> dict[str, Any]:
    found = _load_all().get(name)
    if found is None:
        raise NotFound(f"no pipeline template {name!r}; templates: {', '.join(_load_all()) or '(none)'}",
                       loc=["body", "template"])
    return found


def bind_params(tpl: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """The template's defaults overridden by ``given``; unknown or missing required parameters are a 422."""
    declared: dict[str, Any] = tpl["params"]
    for k in given:
        if k not in declared:
            raise Invalid(f"template {tpl['name']!r} has no parameter {k!r}; parameters: "
                          f"{', '.join(declared) or '(none)'}", loc=["body", "params", k])
    out: dict[str, Any] = {}
    for k, decl in declared.items():
        decl = decl if isinstance(decl, dict) else {"default": decl}
        if k in given:
            out[k] = given[k]
        elif "default" in decl:
            out[k] = decl["default"]
        else:
            raise Invalid(f"template {tpl['name']!r} needs parameter {k!r}: {decl.get('description', '')}".rstrip(": "),
                          loc=["body", "params", k])
    return out
