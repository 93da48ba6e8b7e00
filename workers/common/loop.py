"""The one training loop every trainer runs on (ssl-train, distill, the eval job's linear probe; CLIP, LoRA
experts and poison scanning next). Modality-neutral: it knows modules, optimisers and scalar metrics, never
images or tokens.

A trainer subclasses ``Method`` - it builds its model and data (``build``), yields batches
(``epoch_batches``), computes one step's loss (``train_step``) and says what goes into a checkpoint
(``state_dict``/``load_state_dict``); optional hooks add start-of-run work, per-step and per-epoch work, an
evaluation and the result. ``TrainingLoop(method, ctx, LoopConfig(...)).fit()`` does the rest:

* resume from ``ctx.load_checkpoint()`` after the critical-config check (``guards.check_resumable``): method
  state, optimiser, loss scaler, RNG; a checkpoint written after epoch e resumes at epoch e + 1;
* the LR schedule (``schedule.LrSchedule``: per epoch like the reference, or per step with warm-up);
* forward under AMP (CUDA only), backward through the loss scaler, optional gradient clipping, optimiser step;
* metric windows (mean of the last ``log_every`` steps) and per-epoch means (weighted by
  ``StepOutput.weight``, averaged over all processes), progress for the ETA, the finite-loss guard;
* evaluation every ``eval_every`` epochs and at the end (rank 0 only, shared with every rank);
* checkpoints every ``checkpoint_every`` epochs, a final one, and one on a stop request (SIGTERM, cancel,
  preemption) at the next step boundary: it holds the CURRENT state labelled as the last finished epoch, so
  the next attempt replays the interrupted epoch from its first batch (data order and augmentations must be
  functions of (seed, epoch, rank) - they are for every trainer here);
* several processes under torchrun (``distributed``): the method's module is wrapped in DDP, only rank 0
  reports and checkpoints, a stop request seen by one rank stops all of them at the same step, and rank 0's
  final checkpoint is safe before any rank returns;
* the result: ``method.result(outcome)`` goes to ``ctx.set_result``.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

import torch
from torch import Tensor, nn

from workers.common import device as dev
from workers.common import distributed
from workers.common.context import MethodContext
from workers.common.distributed import Comm
from workers.common.guards import check_finite, check_resumable, fmt_metrics
from workers.common.schedule import LrSchedule, set_lr
from workers.common.seeding import rng_state, seed_everything, set_rng_state
from workers.runtime.context import JobConfigError

SpecT = TypeVar("SpecT")
T = TypeVar("T")

PREEMPT_SYNC_EVERY = 10  # steps between the all-reduces that agree on a stop request (several processes)


@dataclass
class StepOutput:
    """One training step, as the loop sees it.

    ``metrics``: detached scalar tensors, averaged over log windows and epochs (no host sync until logged).
    ``weight``: how much this step counts in those means (e.g. the batch size when the last batch is short).
    ``aux``: anything the method's ``log_extras`` wants from the last step of a window.
    """

    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)
    weight: float = 1.0
    aux: Any = None


@dataclass
class TrainParts:
    """What ``Method.build`` hands to the loop. ``module``'s ``forward`` is what ``train_step`` calls for the
    gradient-carrying computation (DDP wraps it); it must already be on ``env.device``."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    steps_per_epoch: int


@dataclass(frozen=True)
class LoopConfig:
    """How the loop drives a method; a trainer builds it from its spec.

    Attributes:
        kind: the job kind, for messages (``"ssl-train"``).
        schedule: the LR curve; ``schedule.epochs`` is the run's length.
        eval_key: checkpoint key that keeps the last evaluation (so a resumed run still reports it);
            None: evaluations are not checkpointed.
        epoch_prefix: the per-epoch mean of step metric ``m`` is logged as ``f"{epoch_prefix}{m}"``.
        summary_keys: step metrics shown in the per-epoch log line besides the loss.
        resume_keys: checkpoint keys the method's ``load_state_dict`` reads (checked before resuming).
        log_every: steps per metric window (0: per-epoch records only).
        eval_every: epochs between evaluations before the last (0: only at the end).
        metric_axis: ``"step"`` - metric records and checkpoints are indexed by the global step; ``"epoch"`` -
            by the epoch number (for per-epoch methods such as the linear probe; use with ``log_every=0``).
    """

    kind: str
    schedule: LrSchedule
    seed: int = 0
    amp: bool = True
    channels_last: bool = True
    checkpoint_every: int = 1
    eval_every: int = 0
    log_every: int = 10
    eval_key: str | None = None
    epoch_prefix: str = "epoch_"
    summary_keys: tuple[str, ...] = ()
    resume_keys: tuple[str, ...] = ()
    grad_clip: float | None = None
    metric_axis: Literal["step", "epoch"] = "step"

    @property
    def epochs(self) -> int:
        return self.schedule.epochs


@dataclass
class LoopEnv(Generic[SpecT]):
    """Where a method runs: its context, device, process group and the CUDA-only speed settings."""

    ctx: MethodContext[SpecT]
    device: torch.device
    comm: Comm
    amp_dtype: torch.dtype | None  # autocast dtype of train_step (None: fp32)
    memory_format: torch.memory_format  # for 4-D inputs and conv models (channels-last on CUDA only)

    @property
    def spec(self) -> SpecT:
        return self.ctx.spec

    def split_batch(self, global_batch: int) -> int:
        """This process's share of a global batch (the spec's batch size is global under torchrun)."""
        world = self.comm.world_size
        if global_batch % world:
            raise JobConfigError(f"batch_size={global_batch} does not split over {world} processes; "
                                 f"use a multiple of resources.gpus={world}")
        return global_batch // world

    def log(self, message: str) -> None:
        """A log line from rank 0 (the other ranks' copies would duplicate it)."""
        if self.comm.is_main:
            self.ctx.log(message)

    def log_metrics(self, values: dict[str, float], *, step: int) -> None:
        if self.comm.is_main:
            self.ctx.log_metrics(values, step=step)

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only (it must not use collectives) and give every rank its result."""
        value = fn() if self.comm.is_main else None
        return self.comm.broadcast_object(value)  # pickled across ranks


@dataclass
class FitOutcome:
    """How a run ended, for ``Method.result``."""

    final_eval: dict[str, float]
    final_loss: float  # mean loss of the last epoch run in this attempt (nan when none ran)
    epochs: int
    start_epoch: int


class Method(ABC, Generic[SpecT]):
    """A trainer's part of the loop. Required: ``build``, ``epoch_batches``, ``train_step``, ``state_dict``,
    ``load_state_dict``; the hooks default to doing nothing. Hooks run on every rank (collectives allowed)
    except ``evaluate``, which runs on rank 0 only."""

    @abstractmethod
    def build(self, env: LoopEnv[SpecT]) -> TrainParts:
        """Create data, model (on ``env.device``) and optimiser; called once, after seeding."""

    @abstractmethod
    def epoch_batches(self, epoch: int) -> Iterable[Any]:
        """The batches of ``epoch`` (1-based) for this rank: exactly ``steps_per_epoch`` of them, a pure
        function of (seed, epoch, rank) so a resumed attempt replays them."""

    @abstractmethod
    def train_step(self, module: nn.Module, batch: Any) -> StepOutput:
        """Forward one batch through ``module`` (the built module, or its DDP wrapper) and return the loss;
        runs under autocast when AMP is on. The loop does backward and the optimiser step."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """The method's part of a checkpoint (model weights, buffers, baselines, exports). The loop adds
        ``optimizer``, ``scaler``, ``epoch``, ``global_step``, ``rng`` and the last evaluation."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from a checkpoint written by ``state_dict`` (plus the loop's keys)."""

    def on_fit_start(self, *, resumed: bool) -> dict[str, float]:
        """Once per attempt, before the first step (e.g. baseline evaluations); returns metrics to log."""
        return {}

    def after_step(self, *, epoch: int, step_in_epoch: int, steps_per_epoch: int) -> dict[str, float]:
        """After each optimiser step (``step_in_epoch`` from 1); returns metrics to log now."""
        return {}

    def log_extras(self, out: StepOutput) -> dict[str, float]:
        """Extra values for a window record, from its last step (e.g. collapse monitors)."""
        return {}

    def on_epoch_end(self, *, epoch: int, last: bool, summary: Mapping[str, float]) -> dict[str, float]:
        """After the last step of ``epoch``, before its evaluation and checkpoint; ``summary`` is the epoch
        record so far (means, lr, time). Returns values added to it."""
        return {}

    def evaluate(self) -> dict[str, float]:
        """Evaluation of the current model (rank 0 only, no collectives); {} when the method has none."""
        return {}

    def result(self, outcome: FitOutcome) -> dict[str, float] | None:
        """The run's result (sent to ``ctx.set_result``); None leaves the result to the caller."""
        out = {**outcome.final_eval, "epochs": float(outcome.epochs)}
        if not math.isnan(outcome.final_loss):
            out["final_loss"] = outcome.final_loss
        return out


class TrainingLoop(Generic[SpecT]):
    """Builds ``method`` on this process's device (joining the torchrun group, if any); ``fit()`` trains it."""

    def __init__(self, method: Method[SpecT], ctx: MethodContext[SpecT], config: LoopConfig, *,
                 device: torch.device | None = None) -> None:
        self.method, self.ctx, self.config = method, ctx, config
        dev.configure_threads()
        self.comm, device, self._owns_group = distributed.setup(device)
        try:
            dev.configure_backend(device)
            amp = dev.amp_dtype(device, config.amp)
            self.env = LoopEnv(ctx, device, self.comm, amp, dev.memory_format(device, config.channels_last))
            seed_everything(config.seed)
            parts = method.build(self.env)
            if parts.steps_per_epoch < 1:
                raise JobConfigError(f"{config.kind}: an epoch has no full batch; lower batch_size or use more data")
        except BaseException:
            distributed.teardown(self._owns_group)
            raise
        self.module, self.optimizer, self.steps_per_epoch = parts.module, parts.optimizer, parts.steps_per_epoch
        self.device = device
        self.scaler = dev.grad_scaler(device, amp)
        self.total_steps = config.epochs * self.steps_per_epoch
        self.last_eval: dict[str, float] = {}
        self._resumed = False

    # --- the run ---------------------------------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        """Train (or finish training) and return the result (``{}`` when the method leaves it to the caller).

        Raises:
            JobConfigError: the resume checkpoint was written under another config or by another kind.
            Preempted: a stop was requested; a checkpoint was saved first.
            FloatingPointError: the loss stopped being finite.
        """
        try:
            return self._fit()
        finally:
            distributed.teardown(self._owns_group)

    def _fit(self) -> dict[str, float]:
        cfg, method, env = self.config, self.method, self.env
        start_epoch = self._resume()
        step = (start_epoch - 1) * self.steps_per_epoch
        start_metrics = method.on_fit_start(resumed=self._resumed)
        if start_metrics:
            env.log_metrics(start_metrics, step=self._x(step, start_epoch - 1))
        runner: nn.Module = self.module
        if self.comm.distributed and any(p.requires_grad for p in self.module.parameters()):
            runner = distributed.wrap_ddp(self.module, self.device)
        self.module.train()
        epoch_loss = float("nan")
        for epoch in range(start_epoch, cfg.epochs + 1):
            epoch_loss, step = self._epoch(runner, epoch, step)

        if start_epoch <= cfg.epochs or not self.last_eval:
            self.last_eval = self._evaluate()
        if self.last_eval:
            env.log_metrics(self.last_eval | {"epoch": cfg.epochs}, step=self._x(step, cfg.epochs))
        self._checkpoint(cfg.epochs, final=True)
        result = method.result(FitOutcome(dict(self.last_eval), epoch_loss, cfg.epochs, start_epoch))
        if result is not None and self.comm.is_main:
            self.ctx.set_result(result)
        self.comm.barrier()  # rank 0's final upload completes before any rank exits
        return dict(result or {})

    def _resume(self) -> int:
        """Load the resume checkpoint, if any; returns the first epoch to run."""
        state = self.ctx.load_checkpoint()  # every rank reads the same resume checkpoint
        if state is None:
            return 1
        check_resumable(state, self.ctx.spec, required=("epoch", "optimizer", "rng", *self.config.resume_keys),
                        what=self.config.kind)
        self.method.load_state_dict(state)
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler") and self.scaler.is_enabled():  # empty when saved without fp16 scaling
            self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        if self.config.eval_key:
            self.last_eval = dict(state.get(self.config.eval_key) or {})
        self._resumed = True
        done = int(state["epoch"])
        self.env.log(f"resumed from the checkpoint of epoch {done}")
        return done + 1

    def _epoch(self, runner: nn.Module, epoch: int, step: int) -> tuple[float, int]:
        cfg, method, env, spe = self.config, self.method, self.env, self.steps_per_epoch
        sched = cfg.schedule
        lr = sched.at(epoch, 1, spe)
        set_lr(self.optimizer, lr)
        t_epoch = time.perf_counter()
        sums: dict[str, Tensor] = {}
        window: dict[str, Tensor] = {}
        w_epoch = w_window = 0.0
        step_in_epoch = 0
        for step_in_epoch, batch in enumerate(method.epoch_batches(epoch), 1):
            if sched.changes_per_step and step_in_epoch > 1:
                lr = sched.at(epoch, step_in_epoch, spe)
                set_lr(self.optimizer, lr)
            out = self._step(runner, batch)
            hook_values = method.after_step(epoch=epoch, step_in_epoch=step_in_epoch, steps_per_epoch=spe)
            step += 1
            _accumulate(out, sums, window)
            w_epoch += out.weight
            w_window += out.weight
            if hook_values:
                env.log_metrics(hook_values | {"epoch": epoch}, step=self._x(step, epoch))
            if cfg.log_every and step % cfg.log_every == 0:
                means = {k: float(v) / w_window for k, v in window.items()}
                check_finite(means["loss"], lr)
                env.log_metrics(means | {"lr": lr, "epoch": epoch} | method.log_extras(out),
                                step=self._x(step, epoch))
                window, w_window = {}, 0.0
            if self.comm.is_main:
                self.ctx.progress(step, self.total_steps, epoch=epoch)
            self._preempt_point(epoch, step, last_in_epoch=step_in_epoch == spe)
        if step_in_epoch == 0:
            raise RuntimeError(f"{cfg.kind}: epoch {epoch} yielded no batch; epoch_batches must yield "
                               f"{spe} batches")

        # --- end of epoch: global means, method hook, evaluation, checkpoint ---------------------------
        keys = sorted(sums)
        totals = self.comm.all_reduce_sum(torch.stack(
            [sums[k].double() for k in keys] + [torch.tensor(w_epoch, dtype=torch.float64, device=self.device)]))
        flat = totals.tolist()
        means = {k: v / flat[-1] for k, v in zip(keys, flat[:-1], strict=True)}
        epoch_loss = means["loss"]
        check_finite(epoch_loss, lr)
        values = {f"{cfg.epoch_prefix}{k}": v for k, v in means.items()} | {
            "epoch_time_s": time.perf_counter() - t_epoch, "lr": lr, "epoch": epoch}
        last = epoch == cfg.epochs
        values |= method.on_epoch_end(epoch=epoch, last=last, summary=dict(values))
        evaluated = not last and bool(cfg.eval_every) and epoch % cfg.eval_every == 0
        if evaluated:
            self.last_eval = self._evaluate()
            values |= self.last_eval
        env.log_metrics(values, step=self._x(step, epoch))
        extra = "".join(f", {k} {means[k]:.3f}" for k in cfg.summary_keys if k in means)
        env.log(f"epoch {epoch}/{cfg.epochs}: loss {epoch_loss:.4f}{extra}, {values['epoch_time_s']:.1f}s"
                + (f", {fmt_metrics(self.last_eval)}" if evaluated and self.last_eval else ""))
        if not last and epoch % cfg.checkpoint_every == 0:
            self._checkpoint(epoch)
        return epoch_loss, step

    def _step(self, runner: nn.Module, batch: Any) -> StepOutput:
        with dev.autocast(self.device, self.env.amp_dtype):
            out = self.method.train_step(runner, batch)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(out.loss).backward()
        if self.config.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return out

    # --- evaluation, checkpoints, preemption -----------------------------------------------------------
    def _evaluate(self) -> dict[str, float]:
        return dict(self.env.on_main(self.method.evaluate) or {})

    def _checkpoint(self, epoch_done: int, *, final: bool = False) -> None:
        if not self.comm.is_main:
            return
        step = epoch_done * self.steps_per_epoch
        payload = {**self.method.state_dict(), "optimizer": self.optimizer.state_dict(),
                   "scaler": self.scaler.state_dict(), "epoch": epoch_done, "global_step": step, "rng": rng_state()}
        if self.config.eval_key:
            payload[self.config.eval_key] = self.last_eval
        self.ctx.save_checkpoint(payload, epoch=epoch_done, step=self._x(step, epoch_done), final=final)

    def _x(self, step: int, epoch: int) -> int:
        """Index of a metric record or checkpoint on the configured axis."""
        return epoch if self.config.metric_axis == "epoch" else step

    def _preempt_point(self, epoch: int, step: int, *, last_in_epoch: bool) -> None:
        """On a stop request (any rank): save the current state labelled as the last finished epoch, then raise
        ``Preempted``. Several processes agree on the step with one all-reduce every ``PREEMPT_SYNC_EVERY``
        steps and at the end of each epoch (each costs a device sync); a single process checks every step."""
        stop = bool(self.ctx.stop_requested)
        if self.comm.distributed:
            if step % PREEMPT_SYNC_EVERY and not last_in_epoch:
                return
            stop = self.comm.any(stop, self.device)
        if not stop:
            return
        self.ctx.stop_requested = True

        def save() -> None:
            self._checkpoint(epoch - 1)
            self.comm.barrier()  # nobody exits before rank 0's checkpoint is safe

        self.ctx.check_preempt(save)


def _accumulate(out: StepOutput, *accs: dict[str, Tensor]) -> None:
    """Add this step's (weighted) loss and metrics to the running sums, on the device (no host sync)."""
    values = {"loss": out.loss.detach(), **{k: v.detach() for k, v in out.metrics.items()}}
    for k, v in values.items():
        if out.weight != 1.0:
            v = v * out.weight
        for acc in accs:
            acc[k] = acc[k] + v if k in acc else v.clone()
