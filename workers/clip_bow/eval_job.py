"""``clip-eval``: zero-shot classification and image<->text retrieval of a clip-train checkpoint
(``evaluate.py``), with a confusion-matrix image per zero-shot attribute (an artifact, shown in MLflow)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from shared.data import DatasetError
from shared.specs.clip import ClipEvalSpec
from workers.clip_bow.data import load_captioned
from workers.clip_bow.evaluate import evaluate
from workers.clip_bow.train import load_model
from workers.common.context import MethodContext
from workers.common.device import select_device
from workers.runtime.context import JobConfigError


def run(ctx: MethodContext[ClipEvalSpec]) -> None:
    spec = ctx.spec
    ckpt = (ctx.inputs.get("checkpoints") or {}).get("checkpoint") or {}
    if not ckpt.get("path"):
        raise JobConfigError("no checkpoint input: pass checkpoint: job:<id> of a clip-train job")
    state = torch.load(ckpt["path"], map_location="cpu", weights_only=False)
    model, vocab, transform, meta = load_model(state)
    device = select_device()
    model.to(device)
    ref = ctx.inputs.get("dataset") or {"uri": spec.dataset}
    try:
        data = load_captioned(ref, image_size=int(meta["image_size"]), limit_train=1, limit_test=spec.limit_test)
    except DatasetError as e:
        raise JobConfigError(str(e)) from e
    z = spec.zero_shot
    with tempfile.TemporaryDirectory(dir=ctx.workdir) as tmp:
        metrics, images = evaluate(model, vocab, transform, data.test, data.label_names, mean=meta["mean"],
                                   std=meta["std"], attributes=z.attributes, templates=z.templates,
                                   protocols=spec.protocols, transform_prompts=z.transform_prompts, device=device,
                                   confusion_dir=Path(tmp))
        for path in images:
            ctx.save_artifact(path, name=path.name, artifact_kind="image", meta={"kind": "confusion-matrix"})
    ctx.log("clip-eval: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    ctx.set_result(metrics)
