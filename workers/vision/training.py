"""Small helpers every resumable vision job needs (distiller, evaluator; usable by ssl-train as well).

* seeding and the RNG snapshot that goes into a checkpoint, so a resumed attempt continues the same streams;
* the "was this checkpoint written under the same config" check, with the fix in the message;
* a finite-loss guard and a compact metric formatter for log lines;
* loading a job's dataset input, with a bad dataset reported as a config error.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from shared.data import DatasetError, ImageDataset, load_dataset
from workers.runtime.context import JobConfigError


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) generator states, for a checkpoint."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_resumable(state: dict[str, Any], spec: Any, *, required: Iterable[str], what: str) -> None:
    """Refuse a resume checkpoint written under another critical config, or by another kind of job.

    Args:
        state: the loaded checkpoint (``ctx.load_checkpoint()``).
        spec: the job spec (``critical_config()`` is compared with the one saved in the checkpoint).
        required: keys the caller reads from ``state``.
        what: the job kind, for the message (e.g. ``"distill"``).
    """
    saved = (state.get("crucible") or {}).get("critical")
    current = spec.critical_config()
    if saved is not None and saved != current:
        diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        raise JobConfigError(f"the checkpoint was written under a different config ({', '.join(diff)} changed); "
                             "submit a new job to start from scratch")
    missing = [k for k in required if k not in state]
    if missing:
        raise JobConfigError(f"the resume checkpoint is not a {what} checkpoint (no {', '.join(map(repr, missing))})")


def check_finite(loss: float, lr: float) -> None:
    if not math.isfinite(loss):
        raise FloatingPointError(f"the loss became {loss} at lr={lr:g}; lower lr (or disable amp) and resubmit")


def fmt_metrics(values: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in values.items())


def load_job_dataset(ctx: Any, *, image_size: int) -> ImageDataset:
    """The job's dataset (the platform-resolved ``ctx.inputs["dataset"]``, else ``spec.dataset``) at
    ``image_size`` with the spec's train/test limits; logs its size. A dataset that does not load is the
    user's config, not a crash: ``JobConfigError``."""
    spec = ctx.spec
    ref = ctx.inputs.get("dataset") or {"uri": spec.dataset}
    try:
        dataset = load_dataset(ref, image_size=image_size, limit_train=spec.limit_train, limit_test=spec.limit_test)
    except DatasetError as exc:
        raise JobConfigError(str(exc)) from exc
    ctx.log(f"dataset {dataset.name}: {len(dataset.train_images)} train / {len(dataset.test_images)} test "
            f"images, {dataset.num_classes} classes, {dataset.image_size}px")
    return dataset
