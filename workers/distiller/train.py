"""``distill`` jobs: SimReg / CompRess distillation with k-NN evaluation, checkpoints and exact resume.

Runs on the shared training loop (``workers.common.loop``): ``DistillMethod`` supplies the model, data, step
and k-NN evaluations; the loop owns resume, schedule, metrics, checkpoints, preemption and DDP.

Two entry points, as for ssl-train:

* ``run(ctx)`` - the platform's (``workers.distiller.train:run``): loads the dataset and the teacher
  checkpoints the supervisor downloaded (``ctx.inputs["checkpoints"]["teachers.<i>"]``), then ``train``;
* ``train(spec, dataset, teachers, ctx=...)`` - the plain function (teachers = checkpoint paths or dicts).

Schedule (epochs numbered from 1): before epoch 1 the k-NN of the random-init student (the baseline) and
of every teacher's backbone (``teacher<i>_knn_*``, so student vs teacher is visible in the result) - both
kept in every checkpoint; every step one forward of the frozen teachers and of the student on the SAME
weak view, loss, SGD; LR once per epoch; k-NN of the student backbone every ``knn_every`` epochs and at
the end; a checkpoint every ``checkpoint_every`` epochs and a final one.

Several processes (``resources.gpus > 1``, torchrun): ``spec.batch_size`` is the GLOBAL batch, split evenly;
DDP averages the student's (and heads') gradients, BatchNorm is synchronised, CompRess banks are written with
the all-gathered batch (identical on every rank), every rank runs the frozen teachers on its own sub-batch, and
only rank 0 evaluates, reports and writes checkpoints.

Resume: the checkpoint holds student, heads / linear map, banks (+ pointers), the 2q EMA student,
optimiser, loss scaler and RNG states; data order and views are functions of (seed, epoch), and the
teachers are deterministic (eval mode). A stop request mid-epoch e saves the current state labelled e - 1
(the epoch is replayed from its first batch on resume, as in ssl-train).

Exported network: the student BACKBONE in the model-checkpoint contract (``workers.vision.checkpoints``)
- heads, banks and the EMA copy are training machinery and are not part of it - so a distilled student
can be evaluated, or distilled again, like any ssl-train model.
"""


from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from shared.data import ImageDataset
from shared.specs import DistillSpec
from workers.common import distributed
from workers.common.context import MethodContext
from workers.common.distributed import Comm
from workers.common.guards import fmt_metrics
from workers.common.loop import FitOutcome, LoopConfig, LoopEnv, Method, StepOutput, TrainingLoop, TrainParts
from workers.common.schedule import LrSchedule
from workers.distiller.compress import CompRess
from workers.distiller.simreg import SimReg
from workers.distiller.teachers import InputNorm, Teacher, TeacherSource, load_teachers, teacher_sources
from workers.runtime.context import JobConfigError
from workers.runtime.local import LocalContext
from workers.vision.augment import EvalTransform, ViewTransform
from workers.vision.backbones import Backbone, create_backbone
from workers.vision.checkpoints import model_payload
from workers.vision.data import EvalDataset, OneViewDataset, check_dataset_fits, epoch_loader, load_job_dataset
from workers.vision.knn import evaluate_knn

LOG_EVERY = 10  # steps between metric events (each costs a device sync)
# RandomResizedCrop scale of the shared weak view: SimReg's weak augmentation (0.2-1, ssl.md 5.2) and
# CompRess's torchvision default (0.08-1, ssl.md 5.6); both add a horizontal flip.
CROP_SCALE = {"simreg": (0.2, 1.0), "compress": (0.08, 1.0)}


def run(ctx: MethodContext[DistillSpec]) -> None:
    """Platform entry point: load the dataset and the teacher checkpoints, then ``train``."""
    spec = ctx.spec
    dataset = load_job_dataset(ctx, image_size=spec.image_size)
    train(spec, dataset, teacher_sources(ctx, len(spec.teachers)), ctx=ctx)


def build_method(spec: DistillSpec, backbone: Backbone, teachers: Sequence[Teacher], *,
                 comm: Comm | None = None) -> SimReg | CompRess:
    """The distillation module for ``spec.method`` around a fresh student backbone."""
    if spec.method == "simreg":
        return SimReg(backbone, [t.dim for t in teachers], head=spec.head)
    opts = spec.compress
    assert opts is not None  # the spec fills the defaults for method compress
    return CompRess(backbone, teachers[0].dim, variant=opts.variant, bank_size=spec.bank_size,
                    temperature=opts.temperature, student_ema=opts.student_ema,
                    generator=torch.Generator().manual_seed(spec.seed), comm=comm)


def train(spec: DistillSpec, dataset: ImageDataset, teachers: Sequence[TeacherSource], *,
          ctx: MethodContext[DistillSpec] | None = None, device: torch.device | None = None) -> dict[str, float]:
    """Distil the teachers into a fresh ``spec.backbone`` and return the result values.

    Args:
        spec: the job spec; ``dataset`` must already be at ``spec.image_size`` and limited.
        dataset: uint8 train/test arrays (``shared.data.load_dataset``).
        teachers: one checkpoint (path or loaded dict) per entry of ``spec.teachers``, in order.
        ctx: a ``JobContext`` (or ``LocalContext``, the default: metrics and checkpoints in memory).
        device: override the automatic choice (CUDA when available; ``cuda:LOCAL_RANK`` under torchrun).

    Raises:
        JobConfigError: a teacher is not a usable model checkpoint, the data cannot fill a batch/bank,
            or the resume checkpoint comes from another config.
        Preempted: a stop was requested; a checkpoint was saved first.
    """
    if len(teachers) != len(spec.teachers):
        raise JobConfigError(f"{len(teachers)} teacher checkpoints for {len(spec.teachers)} teachers in the spec")
    check_dataset_fits(spec, dataset)
    loop = TrainingLoop(DistillMethod(spec, dataset, teachers), ctx if ctx is not None else LocalContext(spec),
                        loop_config(spec), device=device)
    return loop.fit()


def loop_config(spec: DistillSpec) -> LoopConfig:
    return LoopConfig(
        kind="distill", seed=spec.seed, amp=spec.amp, channels_last=spec.channels_last,
        schedule=LrSchedule(spec.lr, spec.epochs, spec.lr_schedule, tuple(spec.lr_milestones or ()), spec.lr_decay),
        checkpoint_every=spec.checkpoint_every, eval_every=spec.knn_every, log_every=LOG_EVERY, eval_key="knn",
        resume_keys=("model", "baseline_knn", "teacher_knn"))


class DistillMethod(Method[DistillSpec]):
    """Frozen teachers -> SimReg or CompRess student on one shared weak view, with k-NN evaluations."""

    def __init__(self, spec: DistillSpec, dataset: ImageDataset, teachers: Sequence[TeacherSource]) -> None:
        self.spec, self.dataset, self.sources = spec, dataset, list(teachers)
        self.baseline: dict[str, float] = {}
        self.teacher_knn: dict[str, float] = {}

    def build(self, env: LoopEnv[DistillSpec]) -> TrainParts:
        spec, dataset, device, fmt = self.spec, self.dataset, env.device, env.memory_format
        self.env = env
        self.local_batch = env.split_batch(spec.batch_size)
        self.teachers = load_teachers(self.sources, features=spec.teacher_features, device=device, memory_format=fmt)
        for ref, t in zip(spec.teachers, self.teachers, strict=True):
            env.log(f"teacher {t.name} ({ref}): {t.meta.get('method')} {t.meta['backbone']}/{t.meta['stem']}, "
                    f"{spec.teacher_features} features, width {t.dim}")
            if int(t.meta["image_size"]) != dataset.image_size:
                env.log(f"warning: teacher {t.name} was trained at {t.meta['image_size']}px, distilling at "
                        f"{dataset.image_size}px; its features may be off-distribution (set image_size to match)")

        # --- data: one weak view in [0, 1], normalised separately for the student and every teacher --------
        self.mean, self.std = dataset.channel_stats()
        self.student_norm = InputNorm(self.mean, self.std)
        view = ViewTransform(dataset.image_size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), strong=False,
                             scale=CROP_SCALE[spec.method])
        self.train_set = OneViewDataset(dataset.train_images, dataset.train_labels, view, seed=spec.seed)
        steps_per_epoch = len(self.train_set) // env.comm.world_size // self.local_batch
        self.student_sets = self._knn_sets(self.mean, self.std)

        # --- model and optimiser ---------------------------------------------------------------------
        model = build_method(spec, create_backbone(spec.backbone, stem=spec.stem), self.teachers, comm=env.comm)
        model.to(device)
        model.to(memory_format=fmt)
        if env.comm.distributed:  # student, heads and the 2q EMA student normalise over the global batch
            model = distributed.convert_sync_batchnorm(model, device)  # type: ignore[assignment]  # same class
        self.model: SimReg | CompRess = model
        optimizer = torch.optim.SGD(model.trainable_parameters(), lr=spec.lr, momentum=spec.momentum,
                                    weight_decay=spec.weight_decay)
        options: dict[str, Any] = {"head": spec.head} if spec.compress is None else spec.compress.model_dump()
        self.meta = {"method": spec.method, "backbone": spec.backbone, "stem": spec.stem,
                     "image_size": dataset.image_size, "classes": dataset.classes,
                     "normalization": {"mean": list(self.mean), "std": list(self.std)},
                     "distill": {"teachers": list(spec.teachers), "teacher_features": spec.teacher_features,
                                 "teacher_methods": [t.meta.get("method") for t in self.teachers], **options}}
        return TrainParts(model, optimizer, steps_per_epoch)

    def _knn_sets(self, mean: Sequence[float], std: Sequence[float]) -> tuple[EvalDataset, EvalDataset]:
        t, d = EvalTransform(mean, std), self.dataset
        return EvalDataset(d.train_images, d.train_labels, t), EvalDataset(d.test_images, d.test_labels, t)

    def _knn(self, network: nn.Module, sets: tuple[EvalDataset, EvalDataset]) -> dict[str, float]:
        spec, env = self.spec, self.env
        return evaluate_knn(network, *sets, ks=spec.knn_k, num_classes=self.dataset.num_classes, device=env.device,
                            seed=spec.seed, amp_dtype=env.amp_dtype, memory_format=env.memory_format,
                            num_workers=spec.num_workers)

    # --- the loop's calls -------------------------------------------------------------------------------
    def epoch_batches(self, epoch: int) -> Iterable[Any]:
        return epoch_loader(self.train_set, self.env, batch_size=self.local_batch, seed=self.spec.seed, epoch=epoch,
                            num_workers=self.spec.num_workers)

    def train_step(self, module: nn.Module, batch: Any) -> StepOutput:
        _, x01, _ = batch
        env = self.env
        x01 = x01.to(env.device, non_blocking=True)
        targets = [t.embed(x01, amp_dtype=env.amp_dtype, memory_format=env.memory_format)  # frozen, no grad
                   for t in self.teachers]
        out: StepOutput = module(self.student_norm(x01).contiguous(memory_format=env.memory_format), targets)
        return out

    def on_fit_start(self, *, resumed: bool) -> dict[str, float]:
        if not resumed:
            t0 = time.perf_counter()
            self.baseline, self.teacher_knn = self.env.on_main(self._baselines)
            self.env.log(f"k-NN ({time.perf_counter() - t0:.1f}s) random-init student: {fmt_metrics(self.baseline)}; "
                         f"teachers: {fmt_metrics(self.teacher_knn)}")
            self.env.log_metrics({f"baseline_{k}": v for k, v in self.baseline.items()} | self.teacher_knn
                                 | {"epoch": 0}, step=0)
        return {}

    def _baselines(self) -> tuple[dict[str, float], dict[str, float]]:
        """k-NN of the random-init student and of every teacher's backbone (with its own normalisation)."""
        baseline = self.evaluate()
        teacher_knn: dict[str, float] = {}
        for i, t in enumerate(self.teachers):
            norm = t.meta["normalization"]
            scores = self._knn(t.encoder.backbone, self._knn_sets(norm["mean"], norm["std"]))
            teacher_knn |= {f"teacher{i}_{k}": v for k, v in scores.items()}
        return baseline, teacher_knn

    def evaluate(self) -> dict[str, float]:
        return self._knn(self.model.student, self.student_sets)

    def state_dict(self) -> dict[str, Any]:
        # The exported student (heads, banks and the EMA copy stay in "model", for resume only).
        return {"model": self.model.state_dict(), "baseline_knn": self.baseline, "teacher_knn": self.teacher_knn,
                **model_payload(self.model.student, meta=self.meta)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.baseline, self.teacher_knn = dict(state["baseline_knn"]), dict(state["teacher_knn"])

    def result(self, outcome: FitOutcome) -> dict[str, float]:
        out = (super().result(outcome) or {}) | {f"baseline_{k}": v for k, v in self.baseline.items()} \
            | self.teacher_knn
        self.env.log(f"done: student {fmt_metrics(outcome.final_eval)} (random init: {fmt_metrics(self.baseline)}; "
                     f"teachers: {fmt_metrics(self.teacher_knn)})")
        return out
