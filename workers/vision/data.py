"""Datasets and loaders over ``ImageDataset`` arrays for representation learning.

* ``TwoViewDataset`` - ``(index, (view_target, view_online), label)``, the reference's two-view contract
  ("target/online" order); the dataset index is what per-sample caches (CMSF) and cached teacher
  features (CompRess/SimReg) key on.
* ``OneViewDataset`` - ``(index, view, label)``: one augmented view per image (SimReg/CompRess feed the
  SAME view to teacher and student; the linear probe trains on it).
* ``EvalDataset`` - ``(index, image, label)`` with the evaluation transform only.

Both implement ``__getitems__``: the DataLoader hands over a whole batch of indices and the views are
built with one batched tensor op per augmentation (see ``augment``), instead of per image. Their batches
are therefore already collated - use the loaders below (or ``collate_fn=collated``).

Randomness is a pure function of ``(seed, epoch)``: the sampler's shuffle, the main-process
augmentation generator and every worker's seed. Re-running an epoch (e.g. after resuming from a
checkpoint) replays exactly the same batches and views.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, get_worker_info

from shared.data import DatasetError, ImageDataset, load_dataset
from workers.common.context import MethodContext
from workers.common.loop import LoopEnv
from workers.runtime.context import JobConfigError
from workers.vision.augment import EvalTransform, ViewTransform


def to_chw_tensor(images: np.ndarray) -> Tensor:
    """uint8 ``N x H x W x 3`` array -> contiguous uint8 ``N x 3 x H x W`` tensor (a private copy)."""
    return torch.from_numpy(np.array(images, dtype=np.uint8, copy=True)).permute(0, 3, 1, 2).contiguous()


def epoch_seed(seed: int, epoch: int) -> int:
    """A distinct, reproducible 63-bit seed per (run seed, epoch)."""
    return (seed * 1_000_003 + epoch * 7_919 + 17) % (2**63 - 1)


class TwoViewDataset(Dataset[Any]):
    """Two augmented views of every image: ``(index, (view_target, view_online), label)``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, target_transform: ViewTransform,
                 online_transform: ViewTransform, *, seed: int = 0) -> None:
        self.images = to_chw_tensor(images)
        self.labels = torch.tensor(np.asarray(labels), dtype=torch.long)
        self.target_transform, self.online_transform = target_transform, online_transform
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.labels)

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def __getitems__(self, indices: Sequence[int]) -> tuple[Tensor, tuple[Tensor, Tensor], Tensor]:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        x = self.images.index_select(0, idx)
        view_target = self.target_transform(x, self.generator)
        view_online = self.online_transform(x, self.generator)
        return idx, (view_target, view_online), self.labels.index_select(0, idx)

    def __getitem__(self, index: int) -> tuple[int, tuple[Tensor, Tensor], int]:
        idx, (vt, vo), y = self.__getitems__([index])
        return int(idx[0]), (vt[0], vo[0]), int(y[0])


class OneViewDataset(Dataset[Any]):
    """One augmented view of every image: ``(index, view, label)``; randomness as in ``TwoViewDataset``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: ViewTransform, *, seed: int = 0) -> None:
        self.images = to_chw_tensor(images)
        self.labels = torch.tensor(np.asarray(labels), dtype=torch.long)
        self.transform = transform
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.labels)

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def __getitems__(self, indices: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return idx, self.transform(self.images.index_select(0, idx), self.generator), self.labels.index_select(0, idx)

    def __getitem__(self, index: int) -> tuple[int, Tensor, int]:
        idx, x, y = self.__getitems__([index])
        return int(idx[0]), x[0], int(y[0])


class EvalDataset(Dataset[Any]):
    """``(index, image, label)`` with the evaluation transform (normalisation only)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: EvalTransform) -> None:
        self.images = to_chw_tensor(images)
        self.labels = torch.tensor(np.asarray(labels), dtype=torch.long)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitems__(self, indices: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return idx, self.transform(self.images.index_select(0, idx)), self.labels.index_select(0, idx)

    def __getitem__(self, index: int) -> tuple[int, Tensor, int]:
        idx, x, y = self.__getitems__([index])
        return int(idx[0]), x[0], int(y[0])


def collated(batch: Any) -> Any:
    """``collate_fn`` for datasets whose ``__getitems__`` already returns a batch."""
    return batch


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker with base_seed + worker_id, base_seed drawn from the loader's generator,
    # so this is reproducible per (seed, epoch) and different for every worker.
    info = get_worker_info()
    if info is not None and hasattr(info.dataset, "reseed"):
        info.dataset.reseed(info.seed % (2**63 - 1))


def train_loader(dataset: TwoViewDataset | OneViewDataset, batch_size: int, *, seed: int, epoch: int,
                 num_workers: int = 0, pin_memory: bool = False, rank: int = 0,
                 world_size: int = 1) -> DataLoader[Any]:
    """Shuffled, ``drop_last=True`` loader for one epoch (banks need full batches: K % B == 0).

    With ``world_size > 1`` (DDP) ``batch_size`` is this process's share of the global batch and a
    ``DistributedSampler`` (shuffle seeded by ``seed``, re-drawn per epoch with ``set_epoch``, no padding)
    gives every rank a disjoint slice of the same epoch permutation, so each dataset index appears at most
    once per global batch (per-sample caches such as CMSF's rely on it). The augmentation generator is
    offset by the rank: ranks see different images and must not share random draws either.
    """
    if len(dataset) < batch_size * world_size:
        raise ValueError(f"{len(dataset)} training images cannot fill one batch of {batch_size * world_size}")
    s = epoch_seed(seed, epoch)
    dataset.reseed((s + rank) % (2**63 - 1))  # used when num_workers == 0 (augmentation in the main process)
    sampler: DistributedSampler[Any] | None = None
    if world_size > 1:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                     drop_last=True)
        sampler.set_epoch(epoch)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=sampler is None, sampler=sampler, drop_last=True,
        num_workers=num_workers, generator=torch.Generator().manual_seed((s + rank) % (2**63 - 1)),
        worker_init_fn=_seed_worker, collate_fn=collated, pin_memory=pin_memory, persistent_workers=False,
    )


def epoch_loader(dataset: TwoViewDataset | OneViewDataset, env: LoopEnv[Any], *, batch_size: int, seed: int,
                 epoch: int, num_workers: int = 0) -> DataLoader[Any]:
    """``train_loader`` for this process of a training loop (its rank, world size and device)."""
    return train_loader(dataset, batch_size, seed=seed, epoch=epoch, num_workers=num_workers,
                        pin_memory=env.device.type == "cuda", rank=env.comm.rank, world_size=env.comm.world_size)


def eval_loader(dataset: EvalDataset, batch_size: int = 512, *, num_workers: int = 0,
                pin_memory: bool = False) -> DataLoader[Any]:
    """In-order loader over every image (no drop_last: features for all of them)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False, num_workers=num_workers,
                      collate_fn=collated, pin_memory=pin_memory)


def load_job_dataset(ctx: MethodContext[Any], *, image_size: int) -> ImageDataset:
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


def check_dataset_fits(spec: Any, dataset: ImageDataset, *, evaluation: str = "the k-NN evaluation") -> None:
    """Refuse a spec the loaded dataset cannot serve, with the fix in the message (``JobConfigError``).

    The rules (batch or bank larger than the training set, too many clusters, ...) live in one place, the
    spec's ``dataset_problems`` - the API applies them at submit when the dataset's size is known; this applies
    them to the dataset the worker actually loaded (a builtin, a limit, a dataset whose size was unknown) -
    plus the test images every job here evaluates on.
    """
    problems = spec.dataset_problems(len(dataset.train_images)) if hasattr(spec, "dataset_problems") else []
    if problems:
        raise JobConfigError("; ".join(_problem_text(spec, loc, msg) for loc, msg in problems))
    if len(dataset.test_images) == 0:
        raise JobConfigError(f"the dataset has no test images for {evaluation}; use a dataset with a test split")


def _problem_text(spec: Any, loc: str, msg: str) -> str:
    """``bank_size=128 exceeds ...`` when the message starts with the field's value, else ``field: message``."""
    value: Any = spec
    for part in loc.split("."):
        value = getattr(value, part, None)
    return f"{loc}={msg}" if value is not None and msg.startswith(str(value)) else f"{loc}: {msg}"
