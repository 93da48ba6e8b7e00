"""What an ssl-train checkpoint exports for OTHER jobs (distill teachers, eval, cross-modal CMSF)."""

from __future__ import annotations

from typing import Any

from workers.ssl_trainer.base import BankMethod
from workers.vision.checkpoints import model_payload


def export_part(model: BankMethod, spec: Any, *, image_size: int, mean: Any, std: Any,
                classes: list[str]) -> dict[str, Any]:
    """``backbone``: torchvision-keyed weights of the ONLINE backbone; ``projector``: the online projection MLP
    (None when the method has none, e.g. ISD-r18) with its sizes in ``meta["projector"]``; ``meta``."""
    meta = {"method": spec.method, "backbone": spec.backbone, "stem": spec.stem, "image_size": image_size,
            "normalization": {"mean": list(mean), "std": list(std)}, "classes": classes}
    return model_payload(model.online.backbone, meta=meta, projector=model.exported_projector())
