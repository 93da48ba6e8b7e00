"""``ssl-train`` jobs: one training loop for every bank-based method (MSF, BYOL, CMSF, ISD).

Entry points:

* ``run(ctx)`` - the platform's (``workers.ssl_trainer.train:run``): loads the job's dataset and trains,
  turning data problems into ``JobConfigError``;
* ``train(spec, dataset, ctx=...)`` - the plain training function (benchmarks, notebooks): an
  ``ImageDataset`` and, optionally, a ``LocalContext`` that keeps metrics in memory;
* ``Trainer`` - the same, keeping the trained ``model`` (a ``BankMethod``) reachable afterwards.

The shared skeleton (ssl.md section 1), explicit: backbone factory (``create_backbone``) -> method from the
registry (``methods.METHODS``: heads, EMA target, bank, method state) -> two-view data
(``TwoViewDataset``, target/online transforms of ``spec.augmentation``) -> SGD with the LR set once per
epoch -> checkpoints carrying the spec's critical config. Methods only implement ``step`` and hooks.

Schedule of one run (epochs numbered from 1, as in the reference):

* before epoch 1: k-NN of the random-init online backbone - the baseline every result is compared
  with; it is stored in every checkpoint so a resumed attempt still reports it;
* every step: method forward (under DDP when several processes), backward, SGD, ``on_step_end``,
  ``ctx.progress``, preemption check; metrics every ``LOG_EVERY`` steps and per epoch;
* per epoch: ``on_epoch_end`` (k-means, pseudo-label head), k-NN every ``knn_every`` epochs and at the end,
  checkpoint every ``checkpoint_every`` epochs and a final one.

Resume: checkpoints are per epoch. A checkpoint written at the end of epoch e resumes exactly at e + 1
(model with every method buffer - bank + pointer, CMSF caches, heads -, optimizer, loss scaler, RNG; data
order and augmentations are pure functions of (seed, epoch, rank)). A checkpoint written on preemption
in the middle of epoch e holds the CURRENT state but is labelled epoch e - 1: the next attempt replays
epoch e from its first batch (those batches are seen twice; harmless, but not bit-identical).

Several processes (``resources.gpus > 1``, torchrun): ``spec.batch_size`` is the GLOBAL batch, split evenly;
DDP averages gradients, BatchNorm is synchronised, banks are written with the all-gathered batch (same on
every rank), only rank 0 evaluates, reports and writes checkpoints, and a stop request seen by any rank
stops all of them at the same step.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import Tensor

from shared.data import ImageDataset
from shared.specs import SslTrainSpec
from shared.specs.recipes import describe as describe_recipe
from workers.common import device as dev
from workers.common import distributed
from workers.common.guards import check_finite, check_resumable, fmt_metrics
from workers.common.schedule import lr_at_epoch, set_lr
from workers.common.seeding import rng_state, seed_everything, set_rng_state
from workers.runtime.context import JobConfigError
from workers.runtime.local import LocalContext
from workers.ssl_trainer.base import MethodSetup
from workers.ssl_trainer.methods import build_method
from workers.ssl_trainer.msf import spread
from workers.ssl_trainer.state import export_part
from workers.vision.augment import EvalTransform, build_view_transforms
from workers.vision.backbones import create_backbone
from workers.vision.data import EvalDataset, TwoViewDataset, load_job_dataset, train_loader
from workers.vision.knn import evaluate_knn

LOG_EVERY = 10  # steps between metric events (each costs a device sync for .item())


def run(ctx: Any) -> None:
    """Platform entry point: load ``ctx.inputs["dataset"]`` and train (see ``train``)."""
    spec = ctx.spec
    if not isinstance(spec, SslTrainSpec):
        raise JobConfigError(f"ssl-train got a {type(spec).__name__} spec")
    dataset = load_job_dataset(ctx, image_size=spec.image_size)
    train(spec, dataset, ctx=ctx)


def check_sizes(spec: SslTrainSpec, dataset: ImageDataset) -> None:
    """Refuse configurations the bank or the loader cannot serve, with the fix in the message."""
    n = len(dataset.train_images)
    if n < spec.batch_size:
        raise JobConfigError(f"the dataset has {n} training images, fewer than one batch of {spec.batch_size}; "
                             "lower batch_size or raise limit_train")
    if n < spec.bank_size:
        best = max(spec.batch_size, n // spec.batch_size * spec.batch_size)
        raise JobConfigError(f"bank_size={spec.bank_size} exceeds the {n} training images: the bank would hold "
                             f"stale copies of the same images as their own 'neighbours'; use bank_size <= {best} "
                             "(a multiple of batch_size)")
    if len(dataset.test_images) == 0:
        raise JobConfigError("the dataset has no test images for the k-NN evaluation")


def train(spec: SslTrainSpec, dataset: ImageDataset, *, ctx: Any | None = None,
          device: torch.device | None = None) -> dict[str, float]:
    """Pre-train with ``spec.method`` and return the result values (also sent to ``ctx.set_result``).

    Args:
        spec: the job spec; ``dataset`` must already be at ``spec.image_size`` and limited.
        dataset: uint8 train/test arrays (``shared.data.load_dataset``).
        ctx: a ``JobContext`` (or ``LocalContext``, the default: no checkpoints, metrics kept in memory).
        device: override the automatic choice (CUDA when available; ``cuda:LOCAL_RANK`` under torchrun).

    Raises:
        JobConfigError: dataset smaller than the bank or one batch, or a checkpoint from another config.
        Preempted: a stop was requested; a checkpoint was saved first.
    """
    return Trainer(spec, dataset, ctx=ctx, device=device).fit()


class Trainer:
    """One ssl-train run; ``fit()`` trains, after which ``model`` holds the trained method."""

    def __init__(self, spec: SslTrainSpec, dataset: ImageDataset, *, ctx: Any | None = None,
                 device: torch.device | None = None) -> None:
        self.spec, self.dataset = spec, dataset
        self.ctx = ctx if ctx is not None else LocalContext(spec)
        check_sizes(spec, dataset)
        dev.configure_threads()
        self.comm, self.device, self._owns_group = distributed.setup(device)
        try:
            self._build()
        except BaseException:
            distributed.teardown(self._owns_group)
            raise

    def _build(self) -> None:
        spec, dataset, comm, device = self.spec, self.dataset, self.comm, self.device
        if spec.batch_size % comm.world_size:
            raise JobConfigError(f"batch_size={spec.batch_size} does not split over {comm.world_size} processes; "
                                 f"use a multiple of resources.gpus={comm.world_size}")
        self.local_batch = spec.batch_size // comm.world_size
        dev.configure_backend(device)
        self.amp = dev.amp_dtype(device, spec.amp)
        self.fmt = dev.memory_format(device, spec.channels_last)
        seed_everything(spec.seed)

        # --- data: two views per image (target/online), plus un-augmented sets for k-NN ------------------
        self.mean, self.std = dataset.channel_stats()
        t_target, t_online = build_view_transforms(spec.augmentation, dataset.image_size, self.mean, self.std,
                                                   recipe=spec.augment)
        self._say(describe_recipe(spec.augment))
        if dataset.family != spec.augment.preset and spec.augment.preset == "natural":
            self._say(f"note: the dataset looks {dataset.family!r} (grey source images); augment.preset "
                      f"{dataset.family!r} skips colour operations that do nothing on it")
        self.train_set = TwoViewDataset(dataset.train_images, dataset.train_labels, t_target, t_online,
                                        seed=spec.seed)
        self.knn_train = EvalDataset(dataset.train_images, dataset.train_labels, EvalTransform(self.mean, self.std))
        self.knn_test = EvalDataset(dataset.test_images, dataset.test_labels, EvalTransform(self.mean, self.std))
        self.steps_per_epoch = len(self.train_set) // comm.world_size // self.local_batch
        self.total_steps = spec.epochs * self.steps_per_epoch

        # --- model: backbone factory -> registered method; optimiser over its trainable part -------------
        setup = MethodSetup(
            backbone=create_backbone(spec.backbone, stem=spec.stem), num_train=len(self.train_set),
            num_classes=dataset.num_classes, train_labels=self.train_set.labels,
            train_images=dataset.train_images, normalization=(tuple(self.mean), tuple(self.std)),
            inputs=dict(getattr(self.ctx, "inputs", None) or {}), device=device, comm=comm, seed=spec.seed)
        self.model = build_method(spec, setup)
        self.model.to(device=device, memory_format=self.fmt)
        if comm.distributed:
            self.model.convert_sync_batchnorm(device)
        self.optimizer = torch.optim.SGD(self.model.trainable_parameters(), lr=spec.lr, momentum=spec.momentum,
                                         weight_decay=spec.weight_decay)
        self.scaler = dev.grad_scaler(device, self.amp)
        self.baseline: dict[str, float] = {}
        self.last_knn: dict[str, float] = {}

    # --- reporting (rank 0 only) ------------------------------------------------------------------------
    def _log(self, values: dict[str, float], step: int) -> None:
        if self.comm.is_main:
            self.ctx.log_metrics(values, step=step)

    def _say(self, message: str) -> None:
        if self.comm.is_main:
            self.ctx.log(message)

    def _knn(self) -> dict[str, float]:
        """k-NN of the online backbone on rank 0 (eval-mode BN: no collectives), shared with every rank."""
        res = None
        if self.comm.is_main:
            res = evaluate_knn(self.model.online.backbone, self.knn_train, self.knn_test, ks=self.spec.knn_k,
                               num_classes=self.dataset.num_classes, device=self.device, seed=self.spec.seed,
                               amp_dtype=self.amp, memory_format=self.fmt, num_workers=self.spec.num_workers)
        return dict(self.comm.broadcast_object(res))

    def _checkpoint(self, epoch_done: int, *, final: bool = False) -> None:
        if not self.comm.is_main:
            return
        payload = {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(), "epoch": epoch_done,
            "global_step": epoch_done * self.steps_per_epoch, "rng": rng_state(),
            "baseline_knn": self.baseline, "knn": self.last_knn,
            **export_part(self.model, self.spec, image_size=self.dataset.image_size, mean=self.mean, std=self.std,
                          classes=self.dataset.classes),
        }
        self.ctx.save_checkpoint(payload, epoch=epoch_done, step=epoch_done * self.steps_per_epoch, final=final)

    # --- the run ----------------------------------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        try:
            return self._fit()
        finally:
            distributed.teardown(self._owns_group)

    def _fit(self) -> dict[str, float]:
        spec, ctx, model = self.spec, self.ctx, self.model
        state = ctx.load_checkpoint()  # every rank reads the same resume checkpoint
        if state is not None:
            check_resumable(state, spec, required=("model", "epoch"), what="ssl-train")
            model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            if state.get("scaler") and self.scaler.is_enabled():  # empty when saved without fp16 scaling
                self.scaler.load_state_dict(state["scaler"])
            set_rng_state(state["rng"])
            start_epoch = int(state["epoch"]) + 1
            self.baseline, self.last_knn = dict(state["baseline_knn"]), dict(state.get("knn") or {})
            self._say(f"resumed from the checkpoint of epoch {start_epoch - 1}")
        else:
            start_epoch = 1
            t0 = time.perf_counter()
            self.baseline = self._knn()
            self._say(f"random-init k-NN baseline ({time.perf_counter() - t0:.1f}s): {fmt_metrics(self.baseline)}")
            self._log({f"baseline_{k}": v for k, v in self.baseline.items()} | {"epoch": 0}, step=0)
        step = (start_epoch - 1) * self.steps_per_epoch
        start_metrics = model.on_fit_start(ctx, resumed=state is not None)
        if start_metrics:
            self._log(start_metrics, step=step)

        runner: Any = model
        if self.comm.distributed:
            runner = distributed.wrap_ddp(model, self.device)
        model.train()
        epoch_loss = float("nan")
        for epoch in range(start_epoch, spec.epochs + 1):
            epoch_loss, step = self._epoch(runner, epoch, step)

        # --- final evaluation, checkpoint and result ---------------------------------------------------
        if start_epoch <= spec.epochs or not self.last_knn:
            self.last_knn = self._knn()
        self._log(self.last_knn | {"epoch": spec.epochs}, step=step)
        self._checkpoint(spec.epochs, final=True)
        result = {**self.last_knn, **{f"baseline_{k}": v for k, v in self.baseline.items()},
                  "epochs": float(spec.epochs)}
        if not math.isnan(epoch_loss):
            result["final_loss"] = epoch_loss
        if self.comm.is_main:
            ctx.set_result(result)
        self._say(f"done: {fmt_metrics(self.last_knn)} (random init: {fmt_metrics(self.baseline)})")
        self.comm.barrier()  # rank 0's final upload completes before any rank exits
        return result

    def _epoch(self, runner: Any, epoch: int, step: int) -> tuple[float, int]:
        spec, ctx, model, device = self.spec, self.ctx, self.model, self.device
        lr = lr_at_epoch(epoch, base_lr=spec.lr, epochs=spec.epochs, schedule=spec.lr_schedule,
                         milestones=spec.lr_milestones, decay=spec.lr_decay, warmup_epochs=spec.warmup_epochs)
        set_lr(self.optimizer, lr)
        t_epoch = time.perf_counter()
        sums: dict[str, Tensor] = {}
        window: dict[str, Tensor] = {}
        n_win = 0
        loader = train_loader(self.train_set, self.local_batch, seed=spec.seed, epoch=epoch,
                              num_workers=spec.num_workers, pin_memory=device.type == "cuda",
                              rank=self.comm.rank, world_size=self.comm.world_size)
        for step_in_epoch, (indices, (v_target, v_online), labels) in enumerate(loader, 1):
            v_target = v_target.to(device, non_blocking=True).contiguous(memory_format=self.fmt)
            v_online = v_online.to(device, non_blocking=True).contiguous(memory_format=self.fmt)
            labels = labels.to(device, non_blocking=True)
            indices = indices.to(device, non_blocking=True)
            with dev.autocast(device, self.amp):
                out = runner(v_target, v_online, labels, indices)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(out.loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            hook_values = model.on_step_end(ctx, epoch=epoch, step_in_epoch=step_in_epoch,
                                            steps_per_epoch=self.steps_per_epoch)
            step += 1
            values = {"loss": out.loss.detach(),
                      "purity": out.purity.detach() if out.purity is not None else torch.zeros((), device=device),
                      **{k: v.detach() for k, v in out.extras.items()}}
            for acc in (sums, window):
                for k, v in values.items():
                    acc[k] = acc[k] + v if k in acc else v.clone()
            n_win += 1
            if hook_values:
                self._log(hook_values | {"epoch": epoch}, step=step)
            if step % LOG_EVERY == 0:
                means = {k: float(v) / n_win for k, v in window.items()}
                check_finite(means["loss"], lr)
                self._log(means | {"lr": lr, "epoch": epoch, "spread_target": float(spread(out.u)),
                                   "spread_online": float(spread(out.q))}, step=step)
                window, n_win = {}, 0
            if self.comm.is_main:
                ctx.progress(step, self.total_steps, epoch=epoch)
            self._preempt_point(epoch, step, last_in_epoch=step_in_epoch == self.steps_per_epoch)

        # --- end of epoch: global means, method hooks, k-NN, checkpoint ---------------------------------
        keys = sorted(sums)
        totals = self.comm.all_reduce_sum(torch.stack([sums[k].double() for k in keys]))
        n = self.steps_per_epoch * self.comm.world_size
        means = {k: float(v) / n for k, v in zip(keys, totals.tolist(), strict=True)}
        epoch_loss = means["loss"]
        check_finite(epoch_loss, lr)
        epoch_values = {f"epoch_{k}": v for k, v in means.items()} | {
            "epoch_time_s": time.perf_counter() - t_epoch, "lr": lr, "epoch": epoch,
            "bank_full": float(model.bank.is_full)}
        epoch_values |= model.on_epoch_end(ctx, epoch=epoch, last=epoch == spec.epochs)
        if epoch < spec.epochs and spec.knn_every and epoch % spec.knn_every == 0:
            self.last_knn = self._knn()
            epoch_values |= self.last_knn
        self._log(epoch_values, step=step)
        knn_part = f", {fmt_metrics(self.last_knn)}" if "knn_top1_k1" in epoch_values else ""
        self._say(f"epoch {epoch}/{spec.epochs}: loss {epoch_loss:.4f}, purity {epoch_values['epoch_purity']:.3f}, "
                  f"{epoch_values['epoch_time_s']:.1f}s{knn_part}")
        if epoch < spec.epochs and epoch % spec.checkpoint_every == 0:
            self._checkpoint(epoch)
        return epoch_loss, step

    def _preempt_point(self, epoch: int, step: int, *, last_in_epoch: bool) -> None:
        """On a stop request (any rank): save the current state labelled as the last finished epoch.

        Several processes agree on the step to stop at with one all-reduce, every ``LOG_EVERY`` steps and at
        the end of each epoch only (each costs a device sync); a single process checks every step.
        """
        stop = bool(getattr(self.ctx, "stop_requested", False))
        if self.comm.distributed:
            if step % LOG_EVERY and not last_in_epoch:
                return
            stop = self.comm.any(stop, self.device)
        if not stop:
            return
        self.ctx.stop_requested = True

        def save() -> None:
            self._checkpoint(epoch - 1)
            self.comm.barrier()  # nobody exits before rank 0's checkpoint is safe

        self.ctx.check_preempt(save)
