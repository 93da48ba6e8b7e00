"""``ssl-train`` jobs: every bank-based method (MSF, BYOL, CMSF, ISD) on the shared training loop.

Entry points:

* ``run(ctx)`` - the platform's (``workers.ssl_trainer.train:run``): loads the job's dataset and trains,
  turning data problems into ``JobConfigError``;
* ``train(spec, dataset, ctx=...)`` - the plain training function (benchmarks, notebooks): an
  ``ImageDataset`` and, optionally, a ``LocalContext`` that keeps metrics in memory;
* ``Trainer`` - the same, keeping the trained ``model`` (a ``BankMethod``) reachable afterwards.

The shared skeleton (ssl.md section 1), explicit: backbone factory (``create_backbone``) -> method from the
registry (``methods.METHODS``: heads, EMA target, bank, method state) -> two-view data
(``TwoViewDataset``, target/online transforms of ``spec.augmentation``) -> SGD with the LR set once per
epoch -> checkpoints carrying the spec's critical config. ``SslTrainMethod`` adapts a ``BankMethod`` to the
loop (``workers.common.loop``), which owns resume, schedule, metrics, checkpoints, preemption and DDP.

Schedule of one run (epochs numbered from 1, as in the reference):

* before epoch 1: k-NN of the random-init online backbone - the baseline every result is compared
  with; it is stored in every checkpoint so a resumed attempt still reports it;
* every step: method forward (under DDP when several processes), backward, SGD, ``on_step_end``,
  ``ctx.progress``, preemption check; metrics every ``LOG_EVERY`` steps and per epoch;
* per epoch: ``on_epoch_end`` (k-means, pseudo-label head), k-NN every ``knn_every`` epochs and at the end,
  checkpoint every ``checkpoint_every`` epochs and a final one.

Resume: a checkpoint written at the end of epoch e resumes exactly at e + 1 (model with every method buffer -
bank + pointer, CMSF caches, heads -, optimizer, loss scaler, RNG; data order and augmentations are pure
functions of (seed, epoch, rank)). A checkpoint written on preemption in the middle of epoch e holds the
CURRENT state but is labelled epoch e - 1: the next attempt replays epoch e from its first batch.

Several processes (``resources.gpus > 1``, torchrun): ``spec.batch_size`` is the GLOBAL batch, split evenly;
DDP averages gradients, BatchNorm is synchronised, banks are written with the all-gathered batch (same on
every rank), only rank 0 evaluates, reports and writes checkpoints.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from shared.data import ImageDataset
from shared.specs import SslTrainSpec
from shared.specs.recipes import describe as describe_recipe
from workers.common.context import MethodContext
from workers.common.guards import fmt_metrics
from workers.common.loop import FitOutcome, LoopConfig, LoopEnv, Method, StepOutput, TrainingLoop, TrainParts
from workers.common.schedule import LrSchedule
from workers.runtime.local import LocalContext
from workers.ssl_trainer.base import BankMethod, MethodSetup
from workers.ssl_trainer.methods import build_method
from workers.ssl_trainer.msf import spread
from workers.ssl_trainer.state import export_part
from workers.vision.augment import EvalTransform, build_view_transforms
from workers.vision.backbones import create_backbone
from workers.vision.data import EvalDataset, TwoViewDataset, check_dataset_fits, epoch_loader, load_job_dataset
from workers.vision.knn import evaluate_knn

LOG_EVERY = 10  # steps between metric events (each costs a device sync for .item())


def run(ctx: MethodContext[SslTrainSpec]) -> None:
    """Platform entry point: load ``ctx.inputs["dataset"]`` and train (see ``train``)."""
    dataset = load_job_dataset(ctx, image_size=ctx.spec.image_size)
    train(ctx.spec, dataset, ctx=ctx)


def train(spec: SslTrainSpec, dataset: ImageDataset, *, ctx: MethodContext[SslTrainSpec] | None = None,
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


def loop_config(spec: SslTrainSpec) -> LoopConfig:
    return LoopConfig(
        kind="ssl-train", seed=spec.seed, amp=spec.amp, channels_last=spec.channels_last,
        schedule=LrSchedule(spec.lr, spec.epochs, spec.lr_schedule, tuple(spec.lr_milestones or ()), spec.lr_decay,
                            warmup_epochs=spec.warmup_epochs),
        checkpoint_every=spec.checkpoint_every, eval_every=spec.knn_every, log_every=LOG_EVERY, eval_key="knn",
        summary_keys=("purity",), resume_keys=("model", "baseline_knn"))


class Trainer:
    """One ssl-train run; ``fit()`` trains, after which ``model`` holds the trained method."""

    def __init__(self, spec: SslTrainSpec, dataset: ImageDataset, *, ctx: MethodContext[SslTrainSpec] | None = None,
                 device: torch.device | None = None) -> None:
        check_dataset_fits(spec, dataset)
        self.method = SslTrainMethod(spec, dataset)
        self.loop = TrainingLoop(self.method, ctx if ctx is not None else LocalContext(spec), loop_config(spec),
                                 device=device)

    @property
    def model(self) -> BankMethod:
        return self.method.model

    @property
    def local_batch(self) -> int:
        return self.method.local_batch

    @property
    def steps_per_epoch(self) -> int:
        return self.loop.steps_per_epoch

    def fit(self) -> dict[str, float]:
        return self.loop.fit()


class SslTrainMethod(Method[SslTrainSpec]):
    """A registered ``BankMethod`` on two-view data, with the k-NN baseline and evaluation."""

    def __init__(self, spec: SslTrainSpec, dataset: ImageDataset) -> None:
        self.spec, self.dataset = spec, dataset
        self.baseline: dict[str, float] = {}

    def build(self, env: LoopEnv[SslTrainSpec]) -> TrainParts:
        spec, dataset, comm, device = self.spec, self.dataset, env.comm, env.device
        self.env = env
        self.local_batch = env.split_batch(spec.batch_size)

        # --- data: two views per image (target/online), plus un-augmented sets for k-NN ------------------
        self.mean, self.std = dataset.channel_stats()
        t_target, t_online = build_view_transforms(spec.augmentation, dataset.image_size, self.mean, self.std,
                                                   recipe=spec.augment)
        env.log(describe_recipe(spec.augment))
        if dataset.family != spec.augment.preset and spec.augment.preset == "natural":
            env.log(f"note: the dataset looks {dataset.family!r} (grey source images); augment.preset "
                    f"{dataset.family!r} skips colour operations that do nothing on it")
        self.train_set = TwoViewDataset(dataset.train_images, dataset.train_labels, t_target, t_online,
                                        seed=spec.seed)
        self.knn_train = EvalDataset(dataset.train_images, dataset.train_labels, EvalTransform(self.mean, self.std))
        self.knn_test = EvalDataset(dataset.test_images, dataset.test_labels, EvalTransform(self.mean, self.std))
        self.steps_per_epoch = len(self.train_set) // comm.world_size // self.local_batch

        # --- model: backbone factory -> registered method; optimiser over its trainable part -------------
        setup = MethodSetup(
            backbone=create_backbone(spec.backbone, stem=spec.stem), num_train=len(self.train_set),
            num_classes=dataset.num_classes, train_labels=self.train_set.labels,
            train_images=dataset.train_images, normalization=(tuple(self.mean), tuple(self.std)),
            inputs=dict(env.ctx.inputs or {}), device=device, comm=comm, seed=spec.seed)
        self.model = build_method(spec, setup)
        self.model.to(device)
        self.model.to(memory_format=env.memory_format)
        if comm.distributed:
            self.model.convert_sync_batchnorm(device)
        optimizer = torch.optim.SGD(self.model.trainable_parameters(), lr=spec.lr, momentum=spec.momentum,
                                    weight_decay=spec.weight_decay)
        return TrainParts(self.model, optimizer, self.steps_per_epoch)

    # --- the loop's calls -------------------------------------------------------------------------------
    def epoch_batches(self, epoch: int) -> Iterable[Any]:
        return epoch_loader(self.train_set, self.env, batch_size=self.local_batch, seed=self.spec.seed, epoch=epoch,
                            num_workers=self.spec.num_workers)

    def train_step(self, module: nn.Module, batch: Any) -> StepOutput:
        indices, (v_target, v_online), labels = batch
        device, fmt = self.env.device, self.env.memory_format
        out = module(v_target.to(device, non_blocking=True).contiguous(memory_format=fmt),
                     v_online.to(device, non_blocking=True).contiguous(memory_format=fmt),
                     labels.to(device, non_blocking=True), indices.to(device, non_blocking=True))
        purity = out.purity.detach() if out.purity is not None else torch.zeros((), device=device)
        return StepOutput(loss=out.loss, metrics={"purity": purity, **{k: v.detach() for k, v in out.extras.items()}},
                          aux=out)

    def log_extras(self, out: StepOutput) -> dict[str, float]:
        return {"spread_target": float(spread(out.aux.u)), "spread_online": float(spread(out.aux.q))}

    def on_fit_start(self, *, resumed: bool) -> dict[str, float]:
        if not resumed:
            t0 = time.perf_counter()
            self.baseline = self.env.on_main(self.evaluate)
            self.env.log(f"random-init k-NN baseline ({time.perf_counter() - t0:.1f}s): {fmt_metrics(self.baseline)}")
            self.env.log_metrics({f"baseline_{k}": v for k, v in self.baseline.items()} | {"epoch": 0}, step=0)
        return self.model.on_fit_start(self.env.ctx, resumed=resumed)

    def after_step(self, *, epoch: int, step_in_epoch: int, steps_per_epoch: int) -> dict[str, float]:
        return self.model.on_step_end(self.env.ctx, epoch=epoch, step_in_epoch=step_in_epoch,
                                      steps_per_epoch=steps_per_epoch)

    def on_epoch_end(self, *, epoch: int, last: bool, summary: Mapping[str, float]) -> dict[str, float]:
        return {"bank_full": float(self.model.bank.is_full)} | self.model.on_epoch_end(self.env.ctx, epoch=epoch,
                                                                                         last=last)

    def evaluate(self) -> dict[str, float]:
        """k-NN of the online backbone (eval-mode BN: no collectives)."""
        spec, env = self.spec, self.env
        return evaluate_knn(self.model.online.backbone, self.knn_train, self.knn_test, ks=spec.knn_k,
                            num_classes=self.dataset.num_classes, device=env.device, seed=spec.seed,
                            amp_dtype=env.amp_dtype, memory_format=env.memory_format, num_workers=spec.num_workers)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "baseline_knn": self.baseline,
                **export_part(self.model, self.spec, image_size=self.dataset.image_size, mean=self.mean,
                              std=self.std, classes=self.dataset.classes)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.baseline = dict(state["baseline_knn"])

    def result(self, outcome: FitOutcome) -> dict[str, float]:
        out = (super().result(outcome) or {}) | {f"baseline_{k}": v for k, v in self.baseline.items()}
        self.env.log(f"done: {fmt_metrics(outcome.final_eval)} (random init: {fmt_metrics(self.baseline)})")
        return out
