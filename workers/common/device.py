"""Device selection and the CUDA-only speed knobs (AMP, channels-last), chosen at run time.

On CPU everything runs in fp32 and NCHW: autocast-to-bf16 on CPU is slower for these convs and
channels-last brings nothing there. Threads: ``CRUCIBLE_WORKER_TORCH_THREADS`` (0/unset = torch's
default) - two busy torch processes on 2 cores slow each other 10-20x (env.md).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

THREADS_ENV = "CRUCIBLE_WORKER_TORCH_THREADS"


def select_device(prefer: str | None = None) -> torch.device:
    """``cuda`` when available (or ``prefer``, e.g. ``"cpu"`` to force it), else ``cpu``."""
    if prefer:
        return torch.device(prefer)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def configure_threads() -> int:
    """Apply ``CRUCIBLE_WORKER_TORCH_THREADS`` if set to a positive number; returns the thread count.

    The budget is per job: under torchrun each of the ``LOCAL_WORLD_SIZE`` processes on this machine takes
    an equal share (two 2-thread ranks on 2 cores would slow each other down many times over).
    """
    raw = os.environ.get(THREADS_ENV, "").strip()
    try:
        n = int(raw) if raw else 0
        local_procs = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    except ValueError:
        raise ValueError(f"{THREADS_ENV} must be an integer (0 = torch default), got {raw!r}") from None
    if n > 0:
        torch.set_num_threads(max(1, n // local_procs))
    return torch.get_num_threads()


def configure_backend(device: torch.device) -> None:
    """CUDA: let cuDNN pick the fastest conv algorithms and TF32 matmuls (training, not bit-exactness)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """bf16 where the GPU supports it (no loss scaling needed), else fp16; None = no autocast."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """Mixed precision on CUDA when ``dtype`` is set; a no-op otherwise."""
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """A loss scaler that is active only for fp16 (bf16 and fp32 do not need one)."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def memory_format(device: torch.device, channels_last: bool) -> torch.memory_format:
    """channels-last only on CUDA (tensor cores like NHWC convs); contiguous NCHW elsewhere."""
    return torch.channels_last if channels_last and device.type == "cuda" else torch.contiguous_format
