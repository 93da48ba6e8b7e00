"""Guards every resumable job needs: the "was this checkpoint written under the same config" check (with the
fix in the message), a finite-loss guard, and a compact metric formatter for log lines."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from workers.runtime.context import JobConfigError


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
