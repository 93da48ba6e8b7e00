"""``clip-train``: a dual encoder on (bag-of-words) captions, on the shared training loop.

One step (CLIP, Radford et al. 2021; "A Fistful of Words" section 4.2): a batch of captioned images, each
caption transformed by the operator chain of ``spec.captions`` (resampled per epoch: a pure function of
(seed, epoch, index)), image and text features L2-normalised, symmetric InfoNCE with the learnable logit scale
(starts at log(1/0.07)), AdamW (no weight decay on gains, biases, logit scale), per-step warm-up then cosine,
logit scale clamped to ``max_logit_scale`` after every optimiser step. ``accum_freq > 1`` caches features over
micro-batches so the loss sees the whole batch (``loss.feature_cache_loss``). Under torchrun the features of
all ranks are gathered (open_clip ``ClipLoss``), the loop wraps the model in DDP.

Departures from the paper (section 4.2, [R]): no memory bank (its stale text features need a momentum text
encoder, section 4.7), learnable rather than fixed temperature, AdamW rather than SGD - the issue's choices.
Images are not augmented (a flip would contradict "on the left").
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from shared.data import DatasetError
from shared.specs.clip import CaptionOps, ClipTrainSpec
from workers.clip_bow.captions import CaptionTransform, bow_counts, tokenize
from workers.clip_bow.data import CaptionedData, channel_stats, load_captioned
from workers.clip_bow.evaluate import evaluate, normalise_images
from workers.clip_bow.loss import clip_loss, feature_cache_loss
from workers.clip_bow.model import ClipModel, TowerConfig, Vocab, clamp_logit_scale, param_groups
from workers.common.context import MethodContext
from workers.common.loop import FitOutcome, LoopConfig, LoopEnv, Method, StepOutput, TrainingLoop, TrainParts
from workers.common.schedule import LrSchedule
from workers.runtime.context import JobConfigError
from workers.runtime.local import LocalContext

LOG_EVERY = 10


def run(ctx: MethodContext[ClipTrainSpec]) -> None:
    """Platform entry point: load the captioned dataset and train."""
    spec = ctx.spec
    ref = ctx.inputs.get("dataset") or {"uri": spec.dataset}
    try:
        data = load_captioned(ref, image_size=spec.image_size, limit_train=spec.limit_train,
                              limit_test=spec.limit_test)
    except DatasetError as e:
        raise JobConfigError(str(e)) from e
    ctx.log(f"dataset {data.name}: {len(data.train)} train ({sum(c is not None for c in data.train.captions)} "
            f"captioned) / {len(data.test)} test images")
    train(spec, data, ctx=ctx)


def train(spec: ClipTrainSpec, data: CaptionedData, *, ctx: MethodContext[ClipTrainSpec] | None = None,
          device: torch.device | None = None) -> dict[str, float]:
    return Trainer(spec, data, ctx=ctx, device=device).fit()


class Trainer:
    def __init__(self, spec: ClipTrainSpec, data: CaptionedData, *, ctx: MethodContext[ClipTrainSpec] | None = None,
                 device: torch.device | None = None) -> None:
        self.method = ClipTrainMethod(spec, data)
        self.loop = TrainingLoop(self.method, ctx if ctx is not None else LocalContext(spec), loop_config(spec),
                                 device=device)

    def fit(self) -> dict[str, float]:
        return self.loop.fit()


def loop_config(spec: ClipTrainSpec) -> LoopConfig:
    return LoopConfig(kind="clip-train", seed=spec.seed, amp=spec.amp, channels_last=False,
                      schedule=LrSchedule(spec.lr, spec.epochs, "cosine", per_step=True,
                                          warmup_steps=spec.warmup_steps),
                      checkpoint_every=spec.checkpoint_every, eval_every=spec.eval_every, log_every=LOG_EVERY,
                      eval_key="clip_eval", summary_keys=("logit_scale",), resume_keys=("model", "clip"))


def build_transform(ops: CaptionOps | dict[str, Any], counts: Counter[str], seed: int) -> CaptionTransform:
    return CaptionTransform(ops if isinstance(ops, CaptionOps) else CaptionOps.model_validate(ops), counts, seed)


def load_model(state: dict[str, Any]) -> tuple[ClipModel, Vocab, CaptionTransform, dict[str, Any]]:
    """A clip-train checkpoint -> (model in eval mode, vocabulary, caption transform, meta)."""
    meta = state.get("clip")
    if not isinstance(meta, dict) or "tower" not in meta:
        raise JobConfigError("the checkpoint is not a clip-train checkpoint (no 'clip' section); pass job:<id> of "
                             "a clip-train job")
    model = ClipModel(TowerConfig(**meta["tower"]))
    model.load_state_dict(state["model"])
    model.eval()
    transform = build_transform(meta["caption_ops"], Counter(meta["counts"]), int(meta["seed"]))
    return model, Vocab(meta["vocab"][2:]), transform, meta


class ClipTrainMethod(Method[ClipTrainSpec]):
    def __init__(self, spec: ClipTrainSpec, data: CaptionedData) -> None:
        self.spec = spec
        self.data = data.drop_captions(spec.captioned_fraction, spec.seed)
        self.captioned = np.array([i for i, c in enumerate(self.data.train.captions) if c], dtype=np.int64)
        if len(self.captioned) < spec.batch_size:
            raise JobConfigError(f"batch_size={spec.batch_size} exceeds the {len(self.captioned)} captioned training "
                                 "images; lower batch_size or raise captioned_fraction")

    def build(self, env: LoopEnv[ClipTrainSpec]) -> TrainParts:
        spec, comm = self.spec, env.comm
        self.env = env
        if spec.accum_freq > 1 and comm.distributed:
            raise JobConfigError("accum_freq > 1 is for one process; under several GPUs the gathered features "
                                 "already enlarge the batch: set accum_freq: 1")
        self.local_batch = env.split_batch(spec.batch_size)
        caps = [self.data.train.captions[i] for i in self.captioned]
        self.counts = bow_counts(caps)
        self.transform = build_transform(spec.captions, self.counts, spec.seed)
        tokens: Counter[str] = Counter()
        for c in caps:
            tokens.update(tokenize(c or ""))
        self.vocab = Vocab.from_counts(tokens)
        self.mean, self.std = channel_stats(self.data.train.images)
        self.tower = TowerConfig(spec.image_encoder, spec.text_encoder, len(self.vocab), spec.embed_dim,
                                 spec.text_width, spec.text_layers, spec.text_heads, spec.context_length,
                                 spec.temperature_init)
        self.model = ClipModel(self.tower).to(env.device)
        optimizer = torch.optim.AdamW(param_groups(self.model, spec.weight_decay), lr=spec.lr, betas=(0.9, 0.98),
                                      eps=1e-6)
        env.log(f"clip-train: {len(self.captioned)} captioned images, vocabulary {len(self.vocab)} words, "
                f"{sum(p.numel() for p in self.model.parameters()) / 1e6:.2f}M parameters; captions: "
                f"{spec.captions.model_dump()}")
        steps = len(self.captioned) // comm.world_size // self.local_batch
        return TrainParts(self.model, optimizer, steps)

    def epoch_batches(self, epoch: int) -> Iterator[Any]:
        comm, b = self.env.comm, self.local_batch
        order = self.captioned[np.random.default_rng([self.spec.seed, epoch, 0xE]).permutation(len(self.captioned))]
        per_rank = len(order) // comm.world_size
        mine = order[comm.rank * per_rank:(comm.rank + 1) * per_rank]
        train = self.data.train
        for s in range(len(mine) // b):
            idx = mine[s * b:(s + 1) * b]
            tokens = [self.transform(train.captions[i] or "", epoch=epoch, index=int(i)) for i in idx]
            yield (normalise_images(train.images[idx], self.mean, self.std),
                   self.vocab.encode(tokens, self.spec.context_length))

    def train_step(self, module: nn.Module, batch: Any) -> StepOutput:
        images, ids = (t.to(self.env.device, non_blocking=True) for t in batch)
        comm, model = self.env.comm, self.model
        if self.spec.accum_freq > 1:
            k = self.spec.accum_freq
            loss, true_loss = feature_cache_loss(module, list(images.chunk(k)), list(ids.chunk(k)),
                                                 model.logit_scale)
        else:
            img, txt = module(images, ids)
            loss = true_loss = clip_loss(img, txt, model.logit_scale.exp(), rank=comm.rank,
                                         world_size=comm.world_size)
        return StepOutput(loss=loss, metrics={"logit_scale": model.logit_scale.detach().exp(),
                                              "clip_loss": true_loss.detach()})

    def after_step(self, *, epoch: int, step_in_epoch: int, steps_per_epoch: int) -> dict[str, float]:
        clamp_logit_scale(self.model, self.spec.max_logit_scale)
        return {}

    def evaluate(self) -> dict[str, float]:
        z = self.spec.zero_shot
        out, _ = evaluate(self.model, self.vocab, self.transform, self.data.test, self.data.label_names,
                          mean=self.mean, std=self.std, attributes=z.attributes, templates=z.templates,
                          transform_prompts=z.transform_prompts, device=self.env.device)
        self.model.train()
        return out

    def meta(self) -> dict[str, Any]:
        return {"tower": self.tower.to_dict(), "vocab": self.vocab.words,
                "caption_ops": self.spec.captions.model_dump(),
                "counts": dict(self.counts), "seed": self.spec.seed, "image_size": self.spec.image_size,
                "mean": list(self.mean), "std": list(self.std), "captioned_fraction": self.spec.captioned_fraction,
                "dataset": self.spec.dataset}

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "clip": self.meta()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])

    def result(self, outcome: FitOutcome) -> dict[str, float] | None:
        out = super().result(outcome) or {}
        out["logit_scale"] = float(self.model.logit_scale.detach().exp())
        return out

