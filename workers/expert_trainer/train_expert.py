"""``train-expert``: one MoIN expert (§5.4 step 3): a LoRA adapter on the FROZEN base, trained only on its
cluster's training documents, with a token budget proportional to the cluster's size. The K experts of a set are
K independent jobs (a pipeline ``foreach``): no communication, any worker, any order.

* budget: ``total_tokens * n_k / N`` tokens (``N`` = every training document), i.e.
  ``max(min_steps, ceil(budget / (batch_size * seq_len)))`` optimiser steps over packed ``seq_len`` chunks of the
  cluster's documents (reshuffled each pass, a function of the seed). ``cluster: all`` is the single-LoRA
  baseline of §5.5: every training document and the whole budget (the same tokens as all experts together).
* held-out perplexity on its own cluster: up to ``eval_docs`` test documents the router sends to this cluster
  (their nearest centroid), scored with the adapter disabled (the frozen base) before training and with it after.
* runs on the shared ``TrainingLoop`` (one "epoch" of the budgeted steps: per-step cosine LR with warm-up, loss
  windows, checkpoints with resume, SIGTERM → checkpoint → exit 75). The method's checkpoint state is the
  adapter (peft's files) plus what the expert set needs: cluster, size, base reference and fingerprint.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from shared.data.corpus import Corpus
from shared.specs.experts import TrainExpertSpec
from workers.common.context import MethodContext
from workers.common.loop import LoopConfig, LoopEnv, Method, StepOutput, TrainingLoop, TrainParts
from workers.common.schedule import LrSchedule
from workers.expert_trainer.lm import adapter_files, attach_lora, doc_nll, encode, pack, perplexity
from workers.runtime.context import JobConfigError
from workers.text.base_model import BaseLM, fingerprint, load_base
from workers.text.embedders import corpus_digest


def expert_documents(corpus: Corpus, clustering: dict[str, Any] | None,
                     cluster: int | str) -> tuple[list[int], list[int], int]:
    """(training doc indices, held-out doc indices, all training docs) of one cluster (or of ``"all"``)."""
    train_all = corpus.indices("train")
    if cluster == "all":
        return train_all, corpus.indices("test"), len(train_all)
    assert clustering is not None
    if clustering.get("corpus_digest") != corpus_digest(corpus):
        raise JobConfigError("the clustering was made from another corpus than this job's dataset; use the "
                             "dataset the embed job read")
    k = len(clustering["sizes"])
    if not isinstance(cluster, int) or not 0 <= cluster < k:
        raise JobConfigError(f"cluster {cluster} does not exist; the clustering has clusters 0..{k - 1}")
    train = [i for i, a in zip(clustering["train_index"], clustering["assignments"], strict=True) if a == cluster]
    if not train:
        raise JobConfigError(f"cluster {cluster} is empty: no training document was assigned to it")
    test = [i for i, a in zip(clustering["test_index"], clustering["test_assignments"], strict=True) if a == cluster]
    return train, test, len(clustering["train_index"])


class ExpertMethod(Method[TrainExpertSpec]):
    def __init__(self, base: BaseLM, train_docs: list[list[int]], eval_docs: list[list[int]], *, steps: int,
                 info: dict[str, Any]) -> None:
        self.base, self.train_docs, self.eval_docs, self.steps, self.info = base, train_docs, eval_docs, steps, info
        self.base_ppl = float("nan")
        self.losses: list[float] = []

    def build(self, env: LoopEnv[TrainExpertSpec]) -> TrainParts:
        t = env.spec.training
        self.env = env
        self.model = attach_lora(self.base.model, t.lora).to(env.device)
        self.chunks = pack(self.train_docs, t.seq_len, int(self.base.tokenizer.eos_token_id))
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.info["trainable_params"] = sum(p.numel() for p in params)
        opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
        return TrainParts(self.model, opt, self.steps)

    def epoch_batches(self, epoch: int) -> Iterable[torch.Tensor]:
        bs = self.env.spec.training.batch_size
        g = torch.Generator().manual_seed(self.env.spec.seed * 1000 + epoch)
        order = torch.randperm(len(self.chunks), generator=g)
        need = self.steps * bs
        while len(order) < need:  # several passes over a small cluster, each reshuffled
            order = torch.cat([order, torch.randperm(len(self.chunks), generator=g)])
        for s in range(self.steps):
            yield self.chunks[order[s * bs:(s + 1) * bs]].to(self.env.device)

    def train_step(self, module: nn.Module, batch: torch.Tensor) -> StepOutput:
        out = module(input_ids=batch, labels=batch)
        return StepOutput(out.loss, weight=float(batch.shape[0]))

    def after_step(self, *, epoch: int, step_in_epoch: int, steps_per_epoch: int) -> dict[str, float]:
        return {}

    def _ppl(self, *, adapter: bool) -> float:
        if not self.eval_docs:
            return float("nan")
        self.model.eval()
        pad = int(self.base.tokenizer.pad_token_id)
        bs = self.env.spec.training.batch_size
        try:
            if adapter:
                nll, cnt = doc_nll(self.model, self.eval_docs, batch_size=bs, pad_id=pad)
            else:
                with self.model.disable_adapter():
                    nll, cnt = doc_nll(self.model, self.eval_docs, batch_size=bs, pad_id=pad)
        finally:
            self.model.train()
        return perplexity(nll, cnt)

    def on_fit_start(self, *, resumed: bool) -> dict[str, float]:
        self.base_ppl = self._ppl(adapter=False)
        self.env.log(f"frozen base: held-out perplexity {self.base_ppl:.2f} on {len(self.eval_docs)} documents of "
                     f"cluster {self.info['cluster']}")
        return {"base_ppl": self.base_ppl}

    def on_epoch_end(self, *, epoch: int, last: bool, summary: Mapping[str, float]) -> dict[str, float]:
        return {}

    def evaluate(self) -> dict[str, float]:
        ppl = self._ppl(adapter=True)
        return {"expert_ppl": ppl, "base_ppl": self.base_ppl,
                "ppl_ratio": ppl / self.base_ppl if self.base_ppl == self.base_ppl else float("nan")}

    def state_dict(self) -> dict[str, Any]:
        return {"adapter_files": adapter_files(self.model), "expert": dict(self.info)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load

        set_peft_model_state_dict(self.model, load(state["adapter_files"]["adapter_model.safetensors"]))

    def result(self, outcome: Any) -> dict[str, float] | None:
        out = super().result(outcome) or {}
        return {**out, "tokens": float(self.info["tokens"]), "steps": float(self.steps),
                "documents": float(self.info["size"]), "trainable_params": float(self.info["trainable_params"])}


def train(spec: TrainExpertSpec, corpus: Corpus, clustering: dict[str, Any] | None, ctx: MethodContext[TrainExpertSpec],
          *, base: BaseLM | None = None) -> dict[str, float]:
    """Train one expert (see the module docstring); returns the result."""
    t = spec.training
    train_idx, test_idx, n_all = expert_documents(corpus, clustering, spec.cluster)
    base = base or load_base(t.base_model)
    if t.seq_len > base.max_positions:
        raise JobConfigError(f"training.seq_len={t.seq_len} exceeds the base model's context of "
                             f"{base.max_positions} tokens")
    tok = base.tokenizer
    train_docs = encode(tok, [corpus.texts[i] for i in train_idx])
    rng = np.random.default_rng(spec.seed)
    chosen = sorted(rng.permutation(len(test_idx))[:t.eval_docs].tolist()) if test_idx else []
    eval_docs = encode(tok, [corpus.texts[test_idx[i]] for i in chosen], max_len=t.seq_len)
    budget = t.total_tokens * len(train_idx) / max(1, n_all)
    steps = max(t.min_steps, math.ceil(budget / (t.batch_size * t.seq_len)))
    info = {"cluster": spec.cluster, "size": len(train_idx), "tokens": steps * t.batch_size * t.seq_len,
            "budget_tokens": budget, "base_model": t.base_model, "base_fingerprint": fingerprint(base.model),
            "held_out_docs": len(eval_docs), "lora": t.lora.model_dump()}
    ctx.log(f"expert for cluster {spec.cluster}: {len(train_idx)} of {n_all} training documents, "
            f"{steps} steps x {t.batch_size} x {t.seq_len} tokens (budget {budget:.0f}), base {t.base_model} "
            f"(loaded in {base.load_s:.1f}s)")
    method = ExpertMethod(base, train_docs, eval_docs, steps=steps, info=info)
    config = LoopConfig(kind="train-expert", seed=spec.seed, amp=False, channels_last=False,
                        schedule=LrSchedule(base_lr=t.lr, epochs=1, kind="cosine", per_step=True,
                                            warmup_steps=t.warmup_steps),
                        log_every=max(1, min(10, steps // 5)), eval_key="last_eval", summary_keys=(),
                        grad_clip=1.0)
    return TrainingLoop(method, ctx, config).fit()


def run(ctx: MethodContext[TrainExpertSpec]) -> None:
    from workers.text.corpora import load_corpus

    spec = ctx.spec
    corpus = load_corpus(ctx.inputs.get("dataset") or {"uri": spec.dataset})
    clustering = None
    if spec.clustering:
        entry = (ctx.inputs.get("checkpoints") or {}).get("clustering")
        if not entry or not entry.get("path"):
            raise JobConfigError("the job has no 'clustering' input (the cluster job's checkpoint)")
        clustering = torch.load(entry["path"], map_location="cpu", weights_only=False)
        if "centroids" not in clustering:
            raise JobConfigError(f"{spec.clustering} is not a cluster job's checkpoint")
    train(spec, corpus, clustering, ctx)
