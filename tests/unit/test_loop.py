"""The shared training loop with a toy method on CPU: checkpoint cadence, exact resume, preemption replay,
LR schedules, the finite-loss guard, the critical-config check, evaluation cadence and the context protocol."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from workers.common.context import MethodContext
from workers.common.loop import LoopConfig, LoopEnv, Method, StepOutput, TrainingLoop, TrainParts
from workers.common.schedule import LrSchedule, lr_at_epoch
from workers.runtime.context import JobConfigError, Preempted
from workers.runtime.local import LocalContext

STEPS = 4  # batches per epoch


@dataclass
class ToySpec:
    epochs: int = 5
    lr: float = 0.1
    seed: int = 0
    width: int = 3

    def critical_config(self) -> dict[str, Any]:
        return {"kind": "toy", "width": self.width, "seed": self.seed}


@dataclass
class Toy(Method[ToySpec]):
    """Linear regression onto a fixed target; batches are a function of (seed, epoch)."""

    nan_at_step: int | None = None
    evaluations: list[int] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    steps_done: int = 0

    def build(self, env: LoopEnv[ToySpec]) -> TrainParts:
        self.env, spec = env, env.spec
        self.model = nn.Linear(spec.width, 1)
        self.target = torch.arange(1.0, spec.width + 1.0)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=spec.lr, momentum=0.9)
        return TrainParts(self.model, self.optimizer, STEPS)

    def epoch_batches(self, epoch: int) -> Iterator[Tensor]:
        g = torch.Generator().manual_seed(self.env.spec.seed * 1000 + epoch)
        for _ in range(STEPS):
            yield torch.randn(8, self.env.spec.width, generator=g)

    def train_step(self, module: nn.Module, batch: Tensor) -> StepOutput:
        self.steps_done += 1
        loss = ((module(batch).squeeze(1) - batch @ self.target) ** 2).mean()
        if self.nan_at_step == self.steps_done:
            loss = loss * float("nan")
        return StepOutput(loss=loss, metrics={"abs_w": self.model.weight.detach().abs().mean()})

    def after_step(self, *, epoch: int, step_in_epoch: int, steps_per_epoch: int) -> dict[str, float]:
        self.lrs.append(self.optimizer.param_groups[0]["lr"])
        return {}

    def evaluate(self) -> dict[str, float]:
        self.evaluations.append(self.steps_done)
        return {"err": float((self.model.weight.detach().squeeze(0) - self.target).norm())}

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])


def _config(spec: ToySpec, **kw: Any) -> LoopConfig:
    schedule = kw.pop("schedule", LrSchedule(spec.lr, spec.epochs, "cosine"))
    return LoopConfig(kind="toy", schedule=schedule, seed=spec.seed, **{"log_every": 3, "eval_key": "last_eval",
                                                                           "resume_keys": ("model",), **kw})


def _fit(spec: ToySpec, ctx: LocalContext[ToySpec], method: Toy | None = None, **kw: Any) -> tuple[Toy, dict]:
    method = method or Toy()
    return method, TrainingLoop(method, ctx, _config(spec, **kw), device=torch.device("cpu")).fit()


def _weights(state: Mapping[str, Any]) -> dict[str, Tensor]:
    return dict(state["model"])


def test_cadence_metrics_schedule_and_exact_resume(tmp_path: Path) -> None:
    spec = ToySpec()
    ctx = LocalContext(spec, checkpoint_dir=tmp_path / "a")
    method, result = _fit(spec, ctx, checkpoint_every=2, eval_every=2)
    assert [(c["epoch"], c["final"]) for c in ctx.checkpoints] == [(2, False), (4, False), (5, True)]
    assert result == ctx.result and result["epochs"] == 5.0
    assert result["err"] == pytest.approx(ctx.checkpoint_state(-1)["last_eval"]["err"])
    assert method.evaluations == [2 * STEPS, 4 * STEPS, 5 * STEPS]  # every 2 epochs before the last, then the end
    epochs = [m for _, m in ctx.metrics if "epoch_loss" in m]
    assert [m["epoch"] for m in epochs] == [1, 2, 3, 4, 5] and all("epoch_abs_w" in m for m in epochs)
    assert result["final_loss"] == epochs[-1]["epoch_loss"] < epochs[0]["epoch_loss"]  # it learns
    assert [m["lr"] for m in epochs] == pytest.approx([lr_at_epoch(e, base_lr=0.1, epochs=5) for e in range(1, 6)])
    windows = [s for s, m in ctx.metrics if "loss" in m and "epoch_loss" not in m]
    assert windows == list(range(3, 5 * STEPS + 1, 3))  # a window record every log_every steps
    assert [p[0] for p in ctx.progress_events] == list(range(1, 5 * STEPS + 1))
    assert ctx.progress_events[-1][:2] == (20, 20)
    first = ctx.checkpoint_state(0)
    assert first["epoch"] == 2 and first["global_step"] == 2 * STEPS and {"optimizer", "scaler", "rng"} <= set(first)

    # Attempt 2 from the epoch-2 checkpoint: epochs 3-5 only, same weights and result as the straight run.
    resumed = LocalContext(spec, checkpoint_dir=tmp_path / "b", resume=Path(ctx.checkpoints[0]["path"]))
    method_b, result_b = _fit(spec, resumed, checkpoint_every=2, eval_every=2)
    assert resumed.progress_events[0][0] == 2 * STEPS + 1
    assert [(c["epoch"], c["final"]) for c in resumed.checkpoints] == [(4, False), (5, True)]
    assert result_b == result
    for k, v in _weights(ctx.checkpoint_state(-1)).items():
        assert torch.equal(v, _weights(resumed.checkpoint_state(-1))[k]), k

    # From the final checkpoint nothing is left to train: the stored evaluation is reported, not recomputed.
    done = LocalContext(spec, resume=Path(ctx.checkpoints[-1]["path"]))
    method_c, result_c = _fit(spec, done, checkpoint_every=2, eval_every=2)
    assert method_c.steps_done == 0 and method_c.evaluations == [] and result_c["err"] == result["err"]
    assert "final_loss" not in result_c  # no epoch ran in this attempt


def test_stop_request_saves_the_last_epoch_and_the_replay_ends_identical(tmp_path: Path) -> None:
    spec = ToySpec(epochs=3)
    _, straight = _fit(spec, ctx_a := LocalContext(spec))

    ctx = LocalContext(spec, checkpoint_dir=tmp_path)
    original = ctx.progress

    def progress(done: int, total: int, **kw: Any) -> None:
        original(done, total, **kw)
        if done == STEPS + 2:  # mid-epoch 2
            ctx.stop_requested = True

    ctx.progress = progress  # type: ignore[method-assign]  # a stop request arriving mid-epoch
    with pytest.raises(Preempted):
        _fit(spec, ctx)
    assert [(c["epoch"], c["final"]) for c in ctx.checkpoints] == [(1, False), (1, False)]  # cadence, then stop
    assert ctx.result is None

    resumed = LocalContext(spec, resume=Path(ctx.checkpoints[-1]["path"]))
    _, result = _fit(spec, resumed)
    assert resumed.progress_events[0][0] == STEPS + 1  # epoch 2 is replayed from its first batch
    assert set(result) == set(straight)  # same keys; the replayed steps were applied twice, so not the values
    assert ctx_a.result == straight


def test_per_step_schedule_with_warmup() -> None:
    spec = ToySpec(epochs=2)
    schedule = LrSchedule(0.1, 2, "cosine", per_step=True, warmup_steps=3)
    method, _ = _fit(spec, LocalContext(spec), schedule=schedule)
    expected = [schedule.at(e, s, STEPS) for e in (1, 2) for s in range(1, STEPS + 1)]
    assert method.lrs == pytest.approx(expected)
    assert expected[:3] == pytest.approx([0.1 / 3 * 0.5 * (1 + math.cos(math.pi * i / 8)) * (i + 1)
                                          for i in range(3)])  # warm-up ramp times the per-step cosine
    assert len(set(method.lrs)) == len(method.lrs)  # changes every step
    step = LrSchedule(1.0, 4, "step", milestones=(1, 3), decay=0.5)
    assert [step.at(e, 2, STEPS) for e in (1, 2, 3, 4)] == [1.0, 0.5, 0.5, 0.25]


def test_a_non_finite_loss_stops_the_run_with_the_fix() -> None:
    spec = ToySpec(epochs=2)
    ctx = LocalContext(spec)
    with pytest.raises(FloatingPointError, match="lower lr"):
        _fit(spec, ctx, Toy(nan_at_step=2))
    assert not ctx.checkpoints and ctx.result is None  # nothing saved past the bad step


def test_resume_refuses_another_config_or_kind() -> None:
    spec = ToySpec(epochs=1)
    ctx = LocalContext(spec)
    _fit(spec, ctx)
    state = ctx.checkpoint_state(-1)
    other = ToySpec(epochs=1, width=4)
    with pytest.raises(JobConfigError, match=r"different config \(width changed\)"):
        _fit(other, LocalContext(other, resume=state))
    foreign = {k: v for k, v in state.items() if k != "model"}
    with pytest.raises(JobConfigError, match="not a toy checkpoint"):
        _fit(spec, LocalContext(spec, resume=foreign))


def test_both_contexts_implement_the_protocol(job_context: Any) -> None:
    job, _, _ = job_context("j", "ssl-train", {"kind": "ssl-train", "method": "msf"})
    local: MethodContext[ToySpec] = LocalContext(ToySpec())
    assert isinstance(job, MethodContext) and isinstance(local, MethodContext)
    assert job.workdir is not None and local.workdir is None


def test_dataset_checks_apply_the_spec_rules_once(tiny_dataset: Any) -> None:
    from shared.specs import DistillSpec, SslTrainSpec
    from workers.vision.data import check_dataset_fits

    base = {"dataset": "builtin://shapes", "batch_size": 32}
    ssl = SslTrainSpec.model_validate({"kind": "ssl-train", "method": "msf", **base, "bank_size": 256})
    with pytest.raises(JobConfigError, match="bank_size=256 exceeds the 128 training images"):
        check_dataset_fits(ssl, tiny_dataset)
    distill = DistillSpec.model_validate({"kind": "distill", "method": "compress", **base, "bank_size": 256,
                                          "teachers": ["job:00000000-0000-0000-0000-000000000001"]})
    with pytest.raises(JobConfigError, match="bank_size=256 exceeds the 128 training images"):
        check_dataset_fits(distill, tiny_dataset)
    check_dataset_fits(SslTrainSpec.model_validate({"kind": "ssl-train", "method": "msf", **base, "bank_size": 64}),
                       tiny_dataset)


def test_the_loop_is_modality_neutral() -> None:
    import subprocess
    import sys

    code = ("import sys, workers.common.loop, workers.common.context, workers.runtime.local; "
            "bad = sorted(m for m in sys.modules if m.startswith(('workers.vision', 'workers.text', 'torchvision'))); "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
