"""Typed job specs: the single source of truth for the API, the CLI, the docs and the workers.

``JobSpec`` is a discriminated union on ``kind``; each kind's model lives in its own module here.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, TypeAdapter

from shared.specs.common import BUILTIN_DATASETS, JobSpecBase, Resources, Retries
from shared.specs.distill import DistillSpec
from shared.specs.eval import EvalSpec
from shared.specs.ssl_train import SslTrainSpec

# Add new kinds to this union, to SPEC_MODELS and to shared.kinds.
JobSpec = Annotated[SslTrainSpec | DistillSpec | EvalSpec, Field(discriminator="kind")]

SPEC_MODELS: dict[str, type[JobSpecBase]] = {"ssl-train": SslTrainSpec, "distill": DistillSpec, "eval": EvalSpec}

_adapter: TypeAdapter[Any] = TypeAdapter(JobSpec)


def parse_spec(data: Any) -> JobSpecBase:
    """Validate a spec dict (from JSON, YAML or the DB) into its kind's model."""
    return _adapter.validate_python(data)


__all__ = [
    "BUILTIN_DATASETS", "DistillSpec", "EvalSpec", "JobSpec", "JobSpecBase", "Resources", "Retries",
    "SPEC_MODELS", "SslTrainSpec", "parse_spec",
]
