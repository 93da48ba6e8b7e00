"""Typed job specs: the single source of truth for the API, the CLI, the docs and the workers.

Each kind's model lives in its own module here; which kinds exist is declared once, in ``shared.kinds``.
``JobSpec`` (the discriminated union on ``kind``), ``parse_spec`` and ``spec_model`` are derived from that
registry, so a new kind needs no edit in this file.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from functools import reduce
from operator import or_
from typing import TYPE_CHECKING, Annotated, Any, TypeAlias, TypeVar, overload

from pydantic import Field, TypeAdapter, ValidationError

from shared import kinds
from shared.kinds import UnknownKind
from shared.specs.common import BUILTIN_DATASETS, JobSpecBase, Resources, Retries
from shared.specs.distill import DistillSpec
from shared.specs.eval import EvalSpec
from shared.specs.ssl_train import SslTrainSpec


def spec_model(kind: str) -> type[JobSpecBase]:
    """The spec class of a registered job kind; ``UnknownKind`` (naming the known kinds) otherwise."""
    return kinds.job_kind(kind).spec_model()


def spec_union() -> Any:
    """``Annotated[A | B | …, Field(discriminator="kind")]`` over every registered job kind's spec model."""
    models = [k.spec_model() for k in kinds.job_kinds()]
    if not models:
        raise RuntimeError("no job kinds are registered (shared.kinds)")
    return Annotated[reduce(or_, models), Field(discriminator="kind")]


_adapter: tuple[int, TypeAdapter[Any]] | None = None


def _current_adapter() -> TypeAdapter[Any]:
    global _adapter
    if _adapter is None or _adapter[0] != kinds.generation():
        _adapter = (kinds.generation(), TypeAdapter(spec_union()))
    return _adapter[1]


S = TypeVar("S", bound=JobSpecBase)


@overload
def parse_spec(data: Any) -> JobSpecBase: ...
@overload
def parse_spec(data: Any, expect: type[S]) -> S: ...
def parse_spec(data: Any, expect: type[JobSpecBase] | None = None) -> JobSpecBase:
    """Validate a spec dict (from JSON, YAML or the DB) into its kind's model.

    A missing or unregistered ``kind`` raises ``UnknownKind`` naming the known kinds; anything else invalid
    raises pydantic's ``ValidationError`` naming the field. With ``expect``, a spec of another kind is a
    ValueError too (and the result is typed as ``expect``).
    """
    if isinstance(data, Mapping) and data.get("kind") not in kinds.JOB_KINDS:
        raise UnknownKind("job kind", data.get("kind"), list(kinds.JOB_KINDS))
    try:
        spec: JobSpecBase = _current_adapter().validate_python(data)
    except ValidationError as e:
        if any(err["type"] in ("union_tag_invalid", "union_tag_not_found") for err in e.errors()):
            kind = getattr(data, "kind", None)
            raise UnknownKind("job kind", kind, list(kinds.JOB_KINDS)) from None
        raise
    if expect is not None and not isinstance(spec, expect):
        wanted = expect.model_fields["kind"].default if "kind" in expect.model_fields else expect.__name__
        raise ValueError(f"expected a spec of kind {wanted!r}, got kind {spec.kind!r}")
    return spec


class _SpecModels(Mapping[str, type[JobSpecBase]]):
    """Live view: job kind -> spec model, read from the registry."""

    def __getitem__(self, kind: str) -> type[JobSpecBase]:
        return spec_model(kind)

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(kinds.JOB_KINDS))

    def __len__(self) -> int:
        return len(kinds.JOB_KINDS)


SPEC_MODELS: Mapping[str, type[JobSpecBase]] = _SpecModels()

if TYPE_CHECKING:
    # Statically every spec is a JobSpecBase; at run time the union below is what pydantic and FastAPI see.
    JobSpec: TypeAlias = JobSpecBase
else:
    JobSpec = spec_union()  # the kinds registered at import (the built-in ones)

__all__ = [
    "BUILTIN_DATASETS", "DistillSpec", "EvalSpec", "JobSpec", "JobSpecBase", "Resources", "Retries",
    "SPEC_MODELS", "SslTrainSpec", "UnknownKind", "parse_spec", "spec_model", "spec_union",
]
