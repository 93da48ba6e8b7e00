"""``ssl-train`` jobs: MSF / BYOL pre-training with k-NN evaluation, checkpoints and exact resume.

Two entry points:

* ``run(ctx)`` - the platform's (``workers.ssl_trainer.train:run``): loads the job's dataset and calls
  ``train``, turning data problems into ``JobConfigError``;
* ``train(spec, dataset, ctx=...)`` - the plain training function; benchmarks and notebooks call it
  directly with an ``ImageDataset`` and, optionally, a ``LocalContext`` that keeps metrics in memory.

Schedule of one run (epochs numbered from 1, as in the reference):

* before epoch 1: k-NN of the random-init online backbone - the baseline every result is compared
  with; it is stored in every checkpoint so a resumed attempt still reports it;
* every step: MSF forward/backward/SGD, ``ctx.progress``, ``ctx.check_preempt(save)``; metrics every
  ``LOG_EVERY`` steps and per epoch;
* LR set once per epoch (``schedule.lr_at_epoch``); k-NN every ``knn_every`` epochs and at the end;
* checkpoint every ``checkpoint_every`` epochs and a final one.

Resume: checkpoints are per epoch. A checkpoint written at the end of epoch e resumes exactly at e + 1
(model, target, predictor, optimizer, bank + pointer, loss scaler, RNG states; the data order and the
augmentations are pure functions of (seed, epoch)). A checkpoint written on preemption in the middle
of epoch e holds the CURRENT weights/bank/optimizer but is labelled epoch e - 1: the next attempt
replays epoch e from its first batch, so the batches seen before the preemption are seen twice. That is
harmless for training, but such a run is not bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import math
import random
import time
from typing import Any

import numpy as np
import torch

from shared.data import DatasetError, ImageDataset, load_dataset
from shared.specs import SslTrainSpec
from workers.runtime.context import JobConfigError
from workers.ssl_trainer.msf import MSF, spread
from workers.vision import device as dev
from workers.vision.augment import EvalTransform, build_view_transforms
from workers.vision.backbones import backbone_state_dict, create_backbone
from workers.vision.data import EvalDataset, TwoViewDataset, train_loader
from workers.vision.knn import evaluate_knn
from workers.vision.local import LocalContext
from workers.vision.schedule import lr_at_epoch, set_lr

LOG_EVERY = 10  # steps between metric events (each costs a device sync for .item())


def run(ctx: Any) -> None:
    """Platform entry point: load ``ctx.inputs["dataset"]`` and train (see ``train``)."""
    spec = ctx.spec
    if not isinstance(spec, SslTrainSpec):
        raise JobConfigError(f"ssl-train got a {type(spec).__name__} spec")
    ref = ctx.inputs.get("dataset") or {"uri": spec.dataset}
    try:
        dataset = load_dataset(ref, image_size=spec.image_size, limit_train=spec.limit_train,
                               limit_test=spec.limit_test)
    except DatasetError as exc:
        raise JobConfigError(str(exc)) from exc
    ctx.log(f"dataset {dataset.name}: {len(dataset.train_images)} train / {len(dataset.test_images)} test "
            f"images, {dataset.num_classes} classes, {dataset.image_size}px")
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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train(spec: SslTrainSpec, dataset: ImageDataset, *, ctx: Any | None = None,
          device: torch.device | None = None) -> dict[str, float]:
    """Pre-train with MSF (``byol`` = k 1) and return the result values (also sent to ``ctx.set_result``).

    Args:
        spec: the job spec; ``dataset`` must already be at ``spec.image_size`` and limited.
        dataset: uint8 train/test arrays (``shared.data.load_dataset``).
        ctx: a ``JobContext`` (or ``LocalContext``, the default: no checkpoints, metrics kept in memory).
        device: override the automatic choice (CUDA when available).

    Raises:
        JobConfigError: dataset smaller than the bank or one batch, or a checkpoint from another config.
        Preempted: a stop was requested; a checkpoint was saved first.
    """
    ctx = ctx if ctx is not None else LocalContext(spec)
    check_sizes(spec, dataset)
    dev.configure_threads()
    device = device or dev.select_device()
    dev.configure_backend(device)
    amp = dev.amp_dtype(device, spec.amp)
    fmt = dev.memory_format(device, spec.channels_last)
    seed_everything(spec.seed)

    # --- data ------------------------------------------------------------------------------------
    mean, std = dataset.channel_stats()
    t_target, t_online = build_view_transforms(spec.augmentation, dataset.image_size, mean, std)
    train_set = TwoViewDataset(dataset.train_images, dataset.train_labels, t_target, t_online, seed=spec.seed)
    knn_train = EvalDataset(dataset.train_images, dataset.train_labels, EvalTransform(mean, std))
    knn_test = EvalDataset(dataset.test_images, dataset.test_labels, EvalTransform(mean, std))
    steps_per_epoch = len(train_set) // spec.batch_size
    total_steps = spec.epochs * steps_per_epoch

    # --- model and optimiser ---------------------------------------------------------------------
    backbone = create_backbone(spec.backbone, stem=spec.stem)
    model = MSF(backbone, topk=int(spec.topk or 1), bank_size=spec.bank_size, ema_momentum=spec.ema_momentum,
                proj_hidden_dim=spec.proj_hidden_dim, proj_dim=spec.proj_dim,
                bank_generator=torch.Generator().manual_seed(spec.seed))
    model.to(device=device, memory_format=fmt)
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=spec.lr, momentum=spec.momentum,
                                weight_decay=spec.weight_decay)
    scaler = dev.grad_scaler(device, amp)

    def knn() -> dict[str, float]:
        return evaluate_knn(model.online.backbone, knn_train, knn_test, ks=spec.knn_k,
                            num_classes=dataset.num_classes, device=device, seed=spec.seed, amp_dtype=amp,
                            memory_format=fmt, num_workers=spec.num_workers)

    # --- fresh start or resume -------------------------------------------------------------------
    state = ctx.load_checkpoint()
    if state is not None:
        _check_resumable(state, spec)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler") and scaler.is_enabled():  # empty when saved by a run without fp16 scaling
            scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        start_epoch, baseline = int(state["epoch"]) + 1, dict(state["baseline_knn"])
        last_knn: dict[str, float] = dict(state.get("knn") or {})
        ctx.log(f"resumed from the checkpoint of epoch {start_epoch - 1}")
    else:
        start_epoch = 1
        t0 = time.perf_counter()
        baseline = knn()
        last_knn = {}
        ctx.log(f"random-init k-NN baseline ({time.perf_counter() - t0:.1f}s): {_fmt(baseline)}")
        ctx.log_metrics({f"baseline_{k}": v for k, v in baseline.items()} | {"epoch": 0}, step=0)
    step = (start_epoch - 1) * steps_per_epoch
    epoch_loss = float("nan")

    def checkpoint(epoch_done: int, *, final: bool = False) -> None:
        payload = {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "epoch": epoch_done, "global_step": epoch_done * steps_per_epoch, "rng": _rng_state(),
            "baseline_knn": baseline, "knn": last_knn,
            # Plain torchvision-keyed weights of the ONLINE backbone, for downstream jobs.
            "backbone": backbone_state_dict(model.online.backbone),
            "meta": {"method": spec.method, "backbone": spec.backbone, "stem": spec.stem,
                     "out_dim": int(model.online.backbone.out_dim), "image_size": dataset.image_size,
                     "normalization": {"mean": list(mean), "std": list(std)}, "classes": dataset.classes},
        }
        ctx.save_checkpoint(payload, epoch=epoch_done, step=epoch_done * steps_per_epoch, final=final)

    # --- epochs ----------------------------------------------------------------------------------
    model.train()
    for epoch in range(start_epoch, spec.epochs + 1):
        lr = lr_at_epoch(epoch, base_lr=spec.lr, epochs=spec.epochs, schedule=spec.lr_schedule,
                         milestones=spec.lr_milestones, decay=spec.lr_decay)
        set_lr(optimizer, lr)
        t_epoch = time.perf_counter()
        sums = {"loss": torch.zeros((), device=device), "purity": torch.zeros((), device=device)}
        window = {"loss": torch.zeros((), device=device), "purity": torch.zeros((), device=device)}
        n_win = 0
        loader = train_loader(train_set, spec.batch_size, seed=spec.seed, epoch=epoch,
                              num_workers=spec.num_workers, pin_memory=device.type == "cuda")
        for _, (v_target, v_online), labels in loader:
            v_target = v_target.to(device, non_blocking=True).contiguous(memory_format=fmt)
            v_online = v_online.to(device, non_blocking=True).contiguous(memory_format=fmt)
            labels = labels.to(device, non_blocking=True)
            with dev.autocast(device, amp):
                out = model.step(v_target, v_online, labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(out.loss).backward()
            scaler.step(optimizer)
            scaler.update()
            step += 1
            pur = out.purity.detach() if out.purity is not None else torch.zeros((), device=device)
            for acc in (sums, window):
                acc["loss"] += out.loss.detach()
                acc["purity"] += pur
            n_win += 1
            if step % LOG_EVERY == 0:
                values = {k: float(v) / n_win for k, v in window.items()}
                _check_finite(values["loss"], lr)
                ctx.log_metrics(values | {"lr": lr, "epoch": epoch, "spread_target": float(spread(out.u)),
                                          "spread_online": float(spread(out.q))}, step=step)
                window = {k: torch.zeros_like(v) for k, v in window.items()}
                n_win = 0
            ctx.progress(step, total_steps, epoch=epoch)
            # On a stop request: save the current state labelled as the last finished epoch (see module doc).
            ctx.check_preempt(lambda e=epoch: checkpoint(e - 1))

        epoch_loss = float(sums["loss"]) / steps_per_epoch
        _check_finite(epoch_loss, lr)
        epoch_values = {"epoch_loss": epoch_loss, "epoch_purity": float(sums["purity"]) / steps_per_epoch,
                        "epoch_time_s": time.perf_counter() - t_epoch, "lr": lr, "epoch": epoch,
                        "bank_full": float(model.bank.is_full)}
        if epoch < spec.epochs and spec.knn_every and epoch % spec.knn_every == 0:
            last_knn = knn()
            epoch_values |= last_knn
        ctx.log_metrics(epoch_values, step=step)
        ctx.log(f"epoch {epoch}/{spec.epochs}: loss {epoch_loss:.4f}, purity {epoch_values['epoch_purity']:.3f}, "
                f"{epoch_values['epoch_time_s']:.1f}s" + (f", {_fmt(last_knn)}" if "knn_top1_k1" in epoch_values
                                                           else ""))
        if epoch < spec.epochs and epoch % spec.checkpoint_every == 0:
            checkpoint(epoch)

    # --- final evaluation, checkpoint and result ---------------------------------------------------
    if start_epoch <= spec.epochs or not last_knn:
        last_knn = knn()
    ctx.log_metrics(last_knn | {"epoch": spec.epochs}, step=step)
    checkpoint(spec.epochs, final=True)
    result = {**last_knn, **{f"baseline_{k}": v for k, v in baseline.items()}, "epochs": float(spec.epochs)}
    if not math.isnan(epoch_loss):
        result["final_loss"] = epoch_loss
    ctx.set_result(result)
    ctx.log(f"done: {_fmt(last_knn)} (random init: {_fmt(baseline)})")
    return result


def _check_resumable(state: dict[str, Any], spec: SslTrainSpec) -> None:
    saved = (state.get("crucible") or {}).get("critical")
    if saved is not None and saved != spec.critical_config():
        diff = sorted(k for k in set(saved) | set(spec.critical_config())
                      if saved.get(k) != spec.critical_config().get(k))
        raise JobConfigError(f"the checkpoint was written under a different config ({', '.join(diff)} changed); "
                             "submit a new job to train from scratch")
    if "model" not in state or "epoch" not in state:
        raise JobConfigError("the resume checkpoint is not an ssl-train checkpoint (no 'model'/'epoch')")


def _check_finite(loss: float, lr: float) -> None:
    if not math.isfinite(loss):
        raise FloatingPointError(f"the loss became {loss} at lr={lr:g}; lower lr (or disable amp) and resubmit")


def _fmt(values: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in values.items())

