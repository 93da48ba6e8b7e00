"""A sweep: a base job spec, a search space over its fields, an objective, a trial budget and early stopping.

The search space maps dotted paths of the base spec (``lr``, ``epochs``, ``augment.crop_scale``) to one of

* ``{type: float, low, high, log: false, step: null}``  (optuna ``FloatDistribution``)
* ``{type: int, low, high, log: false, step: 1}``       (optuna ``IntDistribution``)
* ``{type: categorical, choices: [...]}``               (optuna ``CategoricalDistribution``)

Samplers and pruners are optuna's (``grid``: ``GridSampler``, ``random``: ``RandomSampler``, ``tpe``:
``TPESampler``; ``asha``: ``SuccessiveHalvingPruner``, ``median``: ``MedianPruner``). This module only
describes them; ``services/sweeps/space.py`` maps a spec onto optuna and checks it against the base kind.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from shared.specs.common import StrictModel

PATH_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
MAX_PARAMS = 32
MAX_TRIALS = 1000
MAX_GRID = 10_000
Choice = str | int | float | bool | None


class FloatParam(StrictModel):
    type: Literal["float"] = "float"
    low: float
    high: float
    log: bool = Field(False, description="sample log-uniformly (low must be > 0)")
    step: float | None = Field(None, gt=0, description="discretise: low, low+step, ... (not with log)")

    @model_validator(mode="after")
    def _range(self) -> FloatParam:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"log: true needs low > 0 (got {self.low})")
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined (optuna samples either)")
        return self

    def grid(self) -> list[Choice] | None:
        if self.step is None:
            return None
        n = math.floor((self.high - self.low) / self.step + 1e-9) + 1
        return [round(self.low + i * self.step, 12) for i in range(n)] if n <= MAX_GRID else None


class IntParam(StrictModel):
    type: Literal["int"] = "int"
    low: int
    high: int
    log: bool = Field(False, description="sample log-uniformly (low must be >= 1)")
    step: int = Field(1, ge=1, description="low, low+step, ... (1 with log)")

    @model_validator(mode="after")
    def _range(self) -> IntParam:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low < 1:
            raise ValueError(f"log: true needs low >= 1 (got {self.low})")
        if self.log and self.step != 1:
            raise ValueError("log and step > 1 cannot be combined (optuna samples either)")
        return self

    def grid(self) -> list[Choice] | None:
        values: list[Choice] = list(range(self.low, self.high + 1, self.step))
        return values if len(values) <= MAX_GRID else None


class CategoricalParam(StrictModel):
    type: Literal["categorical"] = "categorical"
    choices: list[Choice] = Field(min_length=1, max_length=1000)

    @field_validator("choices")
    @classmethod
    def _unique(cls, v: list[Choice]) -> list[Choice]:
        if len({repr(c) for c in v}) != len(v):
            raise ValueError("lists the same choice twice")
        return v

    def grid(self) -> list[Choice] | None:
        return list(self.choices)


Param = Annotated[FloatParam | IntParam | CategoricalParam, Field(discriminator="type")]


class Objective(StrictModel):
    metric: str = Field(min_length=1, max_length=200, description="a metric the trial jobs report (metrics events "
                                                                  "and/or the result), e.g. epoch_loss")
    direction: Literal["minimize", "maximize"] = Field(description="minimize | maximize (or minimise | maximise)")
    step_key: str = Field("epoch", min_length=1, max_length=200,
                          description="the metric event's value used as the step of intermediate values "
                                      "(the resource of ASHA); the event's own step when absent")

    @field_validator("direction", mode="before")
    @classmethod
    def _spelling(cls, v: Any) -> Any:
        return {"minimise": "minimize", "maximise": "maximize"}.get(v, v) if isinstance(v, str) else v


class Sampler(StrictModel):
    type: Literal["grid", "random", "tpe"] = "tpe"
    seed: int = Field(0, ge=0, le=2**31 - 1)
    n_startup_trials: int = Field(4, ge=0, le=1000, description="tpe: random trials before the model is used")


class EarlyStopping(StrictModel):
    """``asha``: asynchronous successive halving (optuna ``SuccessiveHalvingPruner``): at steps
    ``min_resource * reduction_factor ** (min_early_stopping_rate + k)`` a trial continues only if its value is in
    the top ``1 / reduction_factor`` of the trials that reached that step. ``median``: stop a trial whose value is
    worse than the median of earlier trials at the same step (after ``warmup_steps``)."""

    type: Literal["none", "asha", "median"] = "none"
    min_resource: int = Field(1, ge=1, le=1_000_000)
    reduction_factor: int = Field(3, ge=2, le=100)
    min_early_stopping_rate: int = Field(0, ge=0, le=30)
    warmup_steps: int = Field(0, ge=0, le=1_000_000, description="median: steps before pruning starts")
    startup_trials: int = Field(2, ge=0, le=1000, description="median: trials that are never pruned")


class SweepSpec(StrictModel):
    """The body of ``POST /v1/sweeps`` (and of a sweep YAML file)."""

    name: str | None = Field(None, max_length=150, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    base: dict[str, Any] = Field(description="a job spec of any kind (validated like POST /v1/jobs); the "
                                             "search space overrides its fields in each trial")
    search_space: dict[str, Param] = Field(min_length=1, max_length=MAX_PARAMS,
                                           description="dotted path of a base field -> its distribution")
    objective: Objective
    sampler: Sampler = Field(default_factory=Sampler)
    early_stopping: EarlyStopping = Field(default_factory=EarlyStopping)
    max_trials: int = Field(ge=1, le=MAX_TRIALS, description="the trial budget (grid: at most the grid's size)")
    max_concurrency: int = Field(2, ge=1, le=100, description="trials running (or queued) at once")

    @field_validator("search_space")
    @classmethod
    def _paths(cls, v: dict[str, Any]) -> dict[str, Any]:
        for path in v:
            if not PATH_RE.fullmatch(path):
                raise ValueError(f"{path[:80]!r} is not a dotted field path (e.g. lr or augment.crop_scale)")
            if path.split(".")[0] in ("kind", "experiment", "depends_on", "name"):
                raise ValueError(f"{path!r} cannot be searched: it says what and where the trials are, not how")
        return v
