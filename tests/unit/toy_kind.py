"""A toy job kind for tests/unit/test_kinds.py: its own spec model and entry point, registered only there."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from shared.specs.common import JobSpecBase


class ToySpec(JobSpecBase):
    kind: Literal["toy"] = "toy"
    steps: int = Field(3, ge=1, le=100, description="how many times to count")


def run(ctx: Any) -> None:
    """The toy's entry point (never run by these tests: registering a kind imports nothing)."""
    for _ in range(ctx.spec.steps):
        pass
