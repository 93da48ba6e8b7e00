"""Run state around the training loop: seeding, RNG snapshots, resume checks, the checkpoint's export part."""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import torch

from workers.runtime.context import JobConfigError
from workers.ssl_trainer.base import BankMethod
from workers.vision.backbones import backbone_state_dict


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
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


def check_resumable(state: dict[str, Any], spec: Any) -> None:
    """Refuse a checkpoint written under another critical config, or by another kind of job."""
    saved = (state.get("crucible") or {}).get("critical")
    if saved is not None and saved != spec.critical_config():
        diff = sorted(k for k in set(saved) | set(spec.critical_config())
                      if saved.get(k) != spec.critical_config().get(k))
        raise JobConfigError(f"the checkpoint was written under a different config ({', '.join(diff)} changed); "
                             "submit a new job to train from scratch")
    if "model" not in state or "epoch" not in state:
        raise JobConfigError("the resume checkpoint is not an ssl-train checkpoint (no 'model'/'epoch')")


def check_finite(loss: float, lr: float) -> None:
    if not math.isfinite(loss):
        raise FloatingPointError(f"the loss became {loss} at lr={lr:g}; lower lr (or disable amp) and resubmit")


def export_part(model: BankMethod, spec: Any, *, image_size: int, mean: Any, std: Any,
                classes: list[str]) -> dict[str, Any]:
    """What OTHER jobs read from an ssl-train checkpoint (distill teachers, eval, cross-modal CMSF).

    ``backbone``: torchvision-keyed weights of the ONLINE backbone; ``projector``: the online projection
    MLP (None when the method has none, e.g. ISD-r18) with its sizes in ``meta["projector"]``.
    """
    proj_state, proj_dims = model.projector_export()
    return {
        "backbone": backbone_state_dict(model.online.backbone),
        "projector": proj_state,
        "meta": {"method": spec.method, "backbone": spec.backbone, "stem": spec.stem,
                 "out_dim": int(model.online.backbone.out_dim), "image_size": image_size,
                 "normalization": {"mean": list(mean), "std": list(std)}, "classes": classes,
                 "projector": proj_dims},
    }


def fmt(values: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in values.items())
