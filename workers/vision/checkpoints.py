"""The network a Crucible checkpoint exports, loaded for evaluation or as a frozen teacher.

Contract of every model checkpoint (ssl-train and distill write it; eval and distill read it)::

    {"backbone":  torchvision-keyed ResNet state dict (no ``fc``),
     "projector": MLPHead state dict, or None when the method has no projection head to export,
     "meta": {"method", "backbone", "stem", "out_dim", "image_size",
              "normalization": {"mean", "std"}, "classes",
              "projector": {"in", "hidden", "out"} or None, ...method-specific provenance}}

``load_encoder`` rebuilds the backbone from ``meta`` (and the projector when asked), asserts that EVERY
tensor was loaded - the reference linear-eval script loaded nothing from MSF/ISD checkpoints because of
an unstripped key prefix and trained its probe on a random network (ssl.md 2.6) - and returns it frozen:
eval mode for good (BatchNorm running statistics, ssl.md 8.4), no parameter requires grad.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from workers.runtime.context import JobConfigError
from workers.vision.backbones import BACKBONES, Backbone, backbone_state_dict, create_backbone, load_backbone
from workers.vision.heads import MLPHead

Features = Literal["backbone", "projection"]
REQUIRED_META = ("backbone", "stem", "image_size", "normalization")


class CheckpointError(JobConfigError):
    """A checkpoint input is not a usable model checkpoint; the message says which one and what to use."""


class FrozenEncoder(nn.Module):
    """A loaded network that stays in inference mode: ``train()`` is a no-op and nothing requires grad.

    Wrapping it inside a module that is switched to train mode (a student, a probe) therefore cannot
    flip the teacher's BatchNorm to batch statistics by accident.

    Attributes:
        backbone: the ResNet (``backbone(x)`` = pooled feature, ``backbone.out_dim`` wide).
        projector: the projection MLP, or None when the features are the backbone's.
        out_dim: width of ``forward``'s output.
    """

    def __init__(self, backbone: Backbone, projector: MLPHead | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.out_dim = int(projector.out_dim if projector is not None else backbone.out_dim)
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenEncoder:  # the mode is ignored on purpose
        return super().train(False)

    def forward(self, x: Tensor) -> Tensor:
        f = self.backbone(x)
        return self.projector(f) if self.projector is not None else f


def read_checkpoint(source: str | Path) -> dict[str, Any]:
    """``torch.load`` a checkpoint file onto the CPU (our own files: plain-python metadata next to tensors)."""
    try:
        state = torch.load(Path(source), map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as exc:
        raise CheckpointError(f"cannot read checkpoint {source}: {exc}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{source} holds a {type(state).__name__}, not a checkpoint dict")
    return state


def job_model_checkpoint(inputs: Mapping[str, Any] | None, *, ref: str,
                         name: str = "checkpoint") -> tuple[dict[str, Any], dict[str, Any]]:
    """A job's model checkpoint input ``name`` (the platform resolves the spec's reference ``ref`` into a local
    file), read and checked: ``(state, meta)``."""
    entry = ((inputs or {}).get("checkpoints") or {}).get(name)
    if not entry or not entry.get("path"):
        raise JobConfigError(f"the job has no {name!r} input; the platform resolves the spec's checkpoint "
                             "reference (job:<id> or artifact:<id>) into it")
    state = read_checkpoint(entry["path"])
    return state, model_meta(state, source=ref)


def model_meta(state: Mapping[str, Any], *, source: str = "the checkpoint") -> dict[str, Any]:
    """The ``meta`` of a model checkpoint, after checking it can rebuild the network."""
    if "backbone" not in state or "meta" not in state:
        what = "an evaluation (probe) checkpoint" if "probe" in state else "not a model checkpoint"
        raise CheckpointError(f"{source} has no 'backbone'/'meta' ({what}); pass the checkpoint of an ssl-train "
                              "or distill job (job:<id> or artifact:<id> of its checkpoint)")
    meta = dict(state["meta"])
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise CheckpointError(f"{source}: meta lacks {', '.join(missing)}; it was written by an older worker - "
                              "re-run the training job to get a loadable checkpoint")
    if meta["backbone"] not in BACKBONES:
        raise CheckpointError(f"{source}: unknown backbone {meta['backbone']!r}; known: {', '.join(BACKBONES)}")
    return meta


def load_encoder(source: str | Path | Mapping[str, Any], *, features: Features = "backbone",
                 device: torch.device | str | None = None) -> tuple[FrozenEncoder, dict[str, Any]]:
    """Rebuild a checkpoint's network, fully loaded and frozen.

    Args:
        source: a checkpoint file, or an already loaded checkpoint dict.
        features: ``"backbone"`` - pooled backbone feature (what k-NN / linear evaluation use);
            ``"projection"`` - the projection head's output (SimReg's ``--teacher_fc``).
        device: where to put it (default CPU).

    Returns:
        ``(encoder, meta)``; ``meta`` is the checkpoint's, plus ``features`` and ``feature_dim``.

    Raises:
        CheckpointError: not a model checkpoint, no projector when one is asked for, or some tensor of the
            network is missing or has the wrong shape (never a silent partial load).
    """
    name = str(source) if not isinstance(source, Mapping) else "the checkpoint"
    state = source if isinstance(source, Mapping) else read_checkpoint(source)
    meta = model_meta(state, source=name)
    backbone = create_backbone(meta["backbone"], stem=meta["stem"])
    try:
        load_backbone(backbone, state["backbone"])
    except ValueError as exc:
        raise CheckpointError(f"{name}: {exc}") from exc
    projector = None
    if features == "projection":
        dims, weights = meta.get("projector"), state.get("projector")
        if not dims or weights is None:
            raise CheckpointError(f"{name} (method {meta.get('method')!r}) exports no projection head; use "
                                  "teacher_features: backbone")
        if int(dims["in"]) != int(backbone.out_dim):
            raise CheckpointError(f"{name}: projector input {dims['in']} != backbone width {backbone.out_dim}")
        projector = MLPHead(int(dims["in"]), int(dims["hidden"]), int(dims["out"]))
        try:
            projector.load_state_dict(weights, strict=True)  # strict: every projector tensor, nothing extra
        except RuntimeError as exc:
            raise CheckpointError(f"{name}: projector weights do not match meta['projector']={dims}: {exc}") from exc
    elif features != "backbone":
        raise ValueError(f"features must be 'backbone' or 'projection', got {features!r}")
    encoder = FrozenEncoder(backbone, projector).to(device or "cpu")
    return encoder, meta | {"features": features, "feature_dim": encoder.out_dim}


def model_payload(backbone: Backbone, *, meta: dict[str, Any], projector: MLPHead | None = None) -> dict[str, Any]:
    """The exported part of a checkpoint (``backbone``, ``projector``, ``meta``) in the contract above."""
    meta = dict(meta)
    meta["out_dim"] = int(backbone.out_dim)
    meta["projector"] = None if projector is None else {
        "in": projector.in_dim, "hidden": projector.hidden_dim, "out": projector.out_dim}
    missing = [k for k in ("method", *REQUIRED_META) if k not in meta]
    if missing:
        raise ValueError(f"model meta lacks {', '.join(missing)}")
    return {"backbone": backbone_state_dict(backbone),
            "projector": None if projector is None else backbone_state_dict(projector), "meta": meta}
