"""``distill`` jobs: SimReg / CompRess distillation with k-NN evaluation, checkpoints and exact resume.

Two entry points, as for ssl-train:

* ``run(ctx)`` - the platform's (``workers.distiller.train:run``): loads the dataset and the teacher
  checkpoints the supervisor downloaded (``ctx.inputs["checkpoints"]["teachers.<i>"]``), then ``train``;
* ``train(spec, dataset, teachers, ctx=...)`` - the plain function (teachers = checkpoint paths or dicts).

Schedule (epochs numbered from 1): before epoch 1 the k-NN of the random-init student (the baseline) and
of every teacher's backbone (``teacher<i>_knn_*``, so student vs teacher is visible in the result) - both
kept in every checkpoint; every step one forward of the frozen teachers and of the student on the SAME
weak view, loss, SGD; LR once per epoch; k-NN of the student backbone every ``knn_every`` epochs and at
the end; a checkpoint every ``checkpoint_every`` epochs and a final one.

Resume: the checkpoint holds student, heads / linear map, banks (+ pointers), the 2q EMA student,
optimiser, loss scaler and RNG states; data order and views are functions of (seed, epoch), and the
teachers are deterministic (eval mode). A stop request mid-epoch e saves the current state labelled e - 1
(the epoch is replayed from its first batch on resume, as in ssl-train).

Exported network: the student BACKBONE in the model-checkpoint contract (``workers.vision.checkpoints``)
- heads, banks and the EMA copy are training machinery and are not part of it - so a distilled student
can be evaluated, or distilled again, like any ssl-train model.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from shared.data import ImageDataset
from shared.specs import DistillSpec
from workers.common import device as dev
from workers.common.guards import check_finite, check_resumable, fmt_metrics
from workers.common.schedule import lr_at_epoch, set_lr
from workers.common.seeding import rng_state, seed_everything, set_rng_state
from workers.distiller.compress import CompRess
from workers.distiller.simreg import SimReg
from workers.distiller.teachers import InputNorm, Teacher, TeacherSource, load_teachers, teacher_sources
from workers.runtime.context import JobConfigError
from workers.runtime.local import LocalContext
from workers.vision.augment import EvalTransform, ViewTransform
from workers.vision.backbones import create_backbone
from workers.vision.checkpoints import model_payload
from workers.vision.data import EvalDataset, OneViewDataset, load_job_dataset, train_loader
from workers.vision.knn import evaluate_knn

LOG_EVERY = 10  # steps between metric events (each costs a device sync)
# RandomResizedCrop scale of the shared weak view: SimReg's weak augmentation (0.2-1, ssl.md 5.2) and
# CompRess's torchvision default (0.08-1, ssl.md 5.6); both add a horizontal flip.
CROP_SCALE = {"simreg": (0.2, 1.0), "compress": (0.08, 1.0)}


def run(ctx: Any) -> None:
    """Platform entry point: load the dataset and the teacher checkpoints, then ``train``."""
    spec = ctx.spec
    if not isinstance(spec, DistillSpec):
        raise JobConfigError(f"distill got a {type(spec).__name__} spec")
    dataset = load_job_dataset(ctx, image_size=spec.image_size)
    train(spec, dataset, teacher_sources(ctx, len(spec.teachers)), ctx=ctx)


def check_sizes(spec: DistillSpec, dataset: ImageDataset) -> None:
    """Refuse configurations the loader or the bank cannot serve, with the fix in the message."""
    n = len(dataset.train_images)
    if n < spec.batch_size:
        raise JobConfigError(f"the dataset has {n} training images, fewer than one batch of {spec.batch_size}; "
                             "lower batch_size or raise limit_train")
    if spec.method == "compress" and n < spec.bank_size:
        best = max(spec.batch_size, n // spec.batch_size * spec.batch_size)
        raise JobConfigError(f"bank_size={spec.bank_size} exceeds the {n} training images: anchors would repeat "
                             f"the same images; use bank_size <= {best} (a multiple of batch_size)")
    if len(dataset.test_images) == 0:
        raise JobConfigError("the dataset has no test images for the k-NN evaluation")


def build_method(spec: DistillSpec, backbone: nn.Module, teachers: Sequence[Teacher]) -> SimReg | CompRess:
    """The distillation module for ``spec.method`` around a fresh student backbone."""
    if spec.method == "simreg":
        return SimReg(backbone, [t.dim for t in teachers], head=spec.head)
    opts = spec.compress
    assert opts is not None  # the spec fills the defaults for method compress
    return CompRess(backbone, teachers[0].dim, variant=opts.variant, bank_size=spec.bank_size,
                    temperature=opts.temperature, student_ema=opts.student_ema,
                    generator=torch.Generator().manual_seed(spec.seed))


def train(spec: DistillSpec, dataset: ImageDataset, teachers: Sequence[TeacherSource], *, ctx: Any | None = None,
          device: torch.device | None = None) -> dict[str, float]:
    """Distil the teachers into a fresh ``spec.backbone`` and return the result values.

    Args:
        spec: the job spec; ``dataset`` must already be at ``spec.image_size`` and limited.
        dataset: uint8 train/test arrays (``shared.data.load_dataset``).
        teachers: one checkpoint (path or loaded dict) per entry of ``spec.teachers``, in order.
        ctx: a ``JobContext`` (or ``LocalContext``, the default: metrics and checkpoints in memory).
        device: override the automatic choice (CUDA when available).

    Raises:
        JobConfigError: a teacher is not a usable model checkpoint, the data cannot fill a batch/bank,
            or the resume checkpoint comes from another config.
        Preempted: a stop was requested; a checkpoint was saved first.
    """
    ctx = ctx if ctx is not None else LocalContext(spec)
    if len(teachers) != len(spec.teachers):
        raise JobConfigError(f"{len(teachers)} teacher checkpoints for {len(spec.teachers)} teachers in the spec")
    check_sizes(spec, dataset)
    dev.configure_threads()
    device = device or dev.select_device()
    dev.configure_backend(device)
    amp = dev.amp_dtype(device, spec.amp)
    fmt = dev.memory_format(device, spec.channels_last)
    seed_everything(spec.seed)

    frozen = load_teachers(teachers, features=spec.teacher_features, device=device, memory_format=fmt)
    for ref, t in zip(spec.teachers, frozen, strict=True):
        ctx.log(f"teacher {t.name} ({ref}): {t.meta.get('method')} {t.meta['backbone']}/{t.meta['stem']}, "
                f"{spec.teacher_features} features, width {t.dim}")
        if int(t.meta["image_size"]) != dataset.image_size:
            ctx.log(f"warning: teacher {t.name} was trained at {t.meta['image_size']}px, distilling at "
                    f"{dataset.image_size}px; its features may be off-distribution (set image_size to match)")

    # --- data: one weak view in [0, 1], normalised separately for the student and every teacher --------
    mean, std = dataset.channel_stats()
    student_norm = InputNorm(mean, std)
    view = ViewTransform(dataset.image_size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), strong=False,
                         scale=CROP_SCALE[spec.method])
    train_set = OneViewDataset(dataset.train_images, dataset.train_labels, view, seed=spec.seed)
    steps_per_epoch = len(train_set) // spec.batch_size
    total_steps = spec.epochs * steps_per_epoch

    def knn_sets(mean_: Sequence[float], std_: Sequence[float]) -> tuple[EvalDataset, EvalDataset]:
        t = EvalTransform(mean_, std_)
        return (EvalDataset(dataset.train_images, dataset.train_labels, t),
                EvalDataset(dataset.test_images, dataset.test_labels, t))

    def knn(network: nn.Module, sets: tuple[EvalDataset, EvalDataset]) -> dict[str, float]:
        return evaluate_knn(network, *sets, ks=spec.knn_k, num_classes=dataset.num_classes, device=device,
                            seed=spec.seed, amp_dtype=amp, memory_format=fmt, num_workers=spec.num_workers)

    student_sets = knn_sets(mean, std)

    # --- model and optimiser ---------------------------------------------------------------------
    model = build_method(spec, create_backbone(spec.backbone, stem=spec.stem), frozen)
    model.to(device=device, memory_format=fmt)
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=spec.lr, momentum=spec.momentum,
                                weight_decay=spec.weight_decay)
    scaler = dev.grad_scaler(device, amp)

    # --- fresh start or resume -------------------------------------------------------------------
    state = ctx.load_checkpoint()
    if state is not None:
        check_resumable(state, spec, required=("model", "optimizer", "epoch", "rng", "baseline_knn", "teacher_knn"),
                        what="distill")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        start_epoch, baseline, teacher_knn = int(state["epoch"]) + 1, dict(state["baseline_knn"]), \
            dict(state["teacher_knn"])
        last_knn: dict[str, float] = dict(state.get("knn") or {})
        ctx.log(f"resumed from the checkpoint of epoch {start_epoch - 1}")
    else:
        start_epoch, last_knn = 1, {}
        t0 = time.perf_counter()
        baseline = knn(model.student, student_sets)
        teacher_knn = {}
        for i, t in enumerate(frozen):
            norm = t.meta["normalization"]
            scores = knn(t.encoder.backbone, knn_sets(norm["mean"], norm["std"]))
            teacher_knn |= {f"teacher{i}_{k}": v for k, v in scores.items()}
        ctx.log(f"k-NN ({time.perf_counter() - t0:.1f}s) random-init student: {fmt_metrics(baseline)}; "
                f"teachers: {fmt_metrics(teacher_knn)}")
        ctx.log_metrics({f"baseline_{k}": v for k, v in baseline.items()} | teacher_knn | {"epoch": 0}, step=0)
    step = (start_epoch - 1) * steps_per_epoch
    epoch_loss = float("nan")

    method_options = {"head": spec.head} if spec.method == "simreg" else spec.compress.model_dump()  # type: ignore[union-attr]
    meta = {"method": spec.method, "backbone": spec.backbone, "stem": spec.stem, "image_size": dataset.image_size,
            "normalization": {"mean": list(mean), "std": list(std)}, "classes": dataset.classes,
            "distill": {"teachers": list(spec.teachers), "teacher_features": spec.teacher_features,
                        "teacher_methods": [t.meta.get("method") for t in frozen], **method_options}}

    def checkpoint(epoch_done: int, *, final: bool = False) -> None:
        payload = {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "epoch": epoch_done, "global_step": epoch_done * steps_per_epoch, "rng": rng_state(),
            "baseline_knn": baseline, "teacher_knn": teacher_knn, "knn": last_knn,
            # The exported student (heads, banks and the EMA copy stay in "model", for resume only).
            **model_payload(model.student, meta=meta),
        }
        ctx.save_checkpoint(payload, epoch=epoch_done, step=epoch_done * steps_per_epoch, final=final)

    # --- epochs ----------------------------------------------------------------------------------
    model.train()
    for epoch in range(start_epoch, spec.epochs + 1):
        lr = lr_at_epoch(epoch, base_lr=spec.lr, epochs=spec.epochs, schedule=spec.lr_schedule,
                         milestones=spec.lr_milestones, decay=spec.lr_decay)
        set_lr(optimizer, lr)
        t_epoch = time.perf_counter()
        sums: dict[str, Any] = {}  # name -> running device tensor (summed without a host sync)
        window: dict[str, Any] = {}
        n_win = 0
        loader = train_loader(train_set, spec.batch_size, seed=spec.seed, epoch=epoch,
                              num_workers=spec.num_workers, pin_memory=device.type == "cuda")
        for _, x01, _ in loader:
            x01 = x01.to(device, non_blocking=True)
            targets = [t.embed(x01, amp_dtype=amp, memory_format=fmt) for t in frozen]  # frozen, no grad
            x = student_norm(x01).contiguous(memory_format=fmt)
            with dev.autocast(device, amp):
                out = model.step(x, targets)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(out.loss).backward()
            scaler.step(optimizer)
            scaler.update()
            step += 1
            for k, v in {"loss": out.loss.detach(), **out.metrics}.items():
                sums[k] = sums.get(k, 0.0) + v
                window[k] = window.get(k, 0.0) + v
            n_win += 1
            if step % LOG_EVERY == 0:
                values = {k: float(v) / n_win for k, v in window.items()}
                check_finite(values["loss"], lr)
                ctx.log_metrics(values | {"lr": lr, "epoch": epoch}, step=step)
                window, n_win = {}, 0
            ctx.progress(step, total_steps, epoch=epoch)
            ctx.check_preempt(lambda e=epoch: checkpoint(e - 1))

        epoch_values = {f"epoch_{k}": float(v) / steps_per_epoch for k, v in sums.items()}
        epoch_loss = epoch_values["epoch_loss"]
        check_finite(epoch_loss, lr)
        epoch_values |= {"epoch_time_s": time.perf_counter() - t_epoch, "lr": lr, "epoch": epoch}
        if epoch < spec.epochs and spec.knn_every and epoch % spec.knn_every == 0:
            last_knn = knn(model.student, student_sets)
            epoch_values |= last_knn
        ctx.log_metrics(epoch_values, step=step)
        knn_now = any(k.startswith("knn_") for k in epoch_values)
        ctx.log(f"epoch {epoch}/{spec.epochs}: loss {epoch_loss:.4f}, {epoch_values['epoch_time_s']:.1f}s"
                + (f", {fmt_metrics(last_knn)}" if knn_now else ""))
        if epoch < spec.epochs and epoch % spec.checkpoint_every == 0:
            checkpoint(epoch)

    # --- final evaluation, checkpoint and result ---------------------------------------------------
    if start_epoch <= spec.epochs or not last_knn:
        last_knn = knn(model.student, student_sets)
    ctx.log_metrics(last_knn | {"epoch": spec.epochs}, step=step)
    checkpoint(spec.epochs, final=True)
    result = {**last_knn, **{f"baseline_{k}": v for k, v in baseline.items()}, **teacher_knn,
              "epochs": float(spec.epochs)}
    if not math.isnan(epoch_loss):
        result["final_loss"] = epoch_loss
    ctx.set_result(result)
    ctx.log(f"done: student {fmt_metrics(last_knn)} (random init: {fmt_metrics(baseline)}; "
            f"teachers: {fmt_metrics(teacher_knn)})")
    return result
