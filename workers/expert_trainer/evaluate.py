"""``moin-eval``: the routing evaluation of MoIN §5.5 on held-out ("test") documents of the corpus.

A dedicated kind on the expert-trainer worker rather than a ``routing`` protocol of ``eval``: ``eval`` runs on the
ssl-trainer worker with the vision stack and its spec is another helper's; this one needs the LM stack.

Every test document is scored once per model - the frozen base (adapters disabled), each expert, and the optional
single LoRA - as summed next-token NLL over its first ``seq_len`` tokens; the policies are then selections of
those numbers (perplexity = exp(sum NLL / sum tokens), token-weighted):

* ``routed``   - the expert of the nearest centroid of the document's embedding (``workers.text.expert_set.route``);
* ``fallback`` - routed, but the base model where the cosine margin is below ``fallback_margin`` (the router's
  behaviour); reported with the share sent to the base and the perplexity of those documents;
* ``oracle``   - the expert of the cluster holding most of the document's true topic's training documents;
* ``random``   - a uniformly random expert (seeded);
* ``base`` and ``single_lora`` (one LoRA on all data with the same total token budget, a ``train-expert`` job with
  ``cluster: all``).

Routing accuracy: the routed cluster's majority topic equals the document's topic; ``oracle_agreement``: the
routed cluster is the oracle's. The parameter count of the set and of the single LoRA are reported (§5.6: the
reviewers' main objection).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.data.corpus import Corpus
from shared.specs.experts import MoinEvalSpec
from workers.common.context import MethodContext
from workers.expert_trainer.expert_set import load_from_checkpoint
from workers.expert_trainer.lm import doc_nll, encode, load_adapters, perplexity, write_adapter
from workers.runtime.context import JobConfigError
from workers.text import expert_set as es
from workers.text.base_model import fingerprint, load_base
from workers.text.embedders import load_embedder


def policy_ppl(nll: np.ndarray, cnt: np.ndarray, choice: np.ndarray) -> float:
    """Perplexity when document i is scored by model ``choice[i]`` (``nll``/``cnt``: [models, docs])."""
    rows = np.arange(nll.shape[1])
    return perplexity(nll[choice, rows], cnt[choice, rows])


def evaluate(spec: MoinEvalSpec, corpus: Corpus, expert_set: es.ExpertSet, oracle: dict[str, int],
             ctx: MethodContext[MoinEvalSpec], *, single_lora: dict[str, bytes] | None = None,
             base: Any | None = None) -> dict[str, float]:
    m = expert_set.manifest
    if base is None:
        from workers.common import device as dev

        dev.configure_threads()
        base = load_base(m.base_model.ref, device=dev.select_device())
    if m.base_model.sha256 and m.base_model.sha256 != fingerprint(base.model):
        raise JobConfigError(f"the base model {m.base_model.ref!r} loaded here is not the one the experts were "
                             "trained on (weight fingerprint differs)")
    try:
        es.check_against_base(expert_set, base.model)
    except es.ExpertSetError as e:
        raise JobConfigError(str(e)) from None
    if spec.seq_len > base.max_positions:
        raise JobConfigError(f"seq_len={spec.seq_len} exceeds the base model's context of {base.max_positions}")
    test = corpus.indices("test")
    if not test:
        raise JobConfigError("the corpus has no held-out (test) documents")
    rng = np.random.default_rng(spec.seed)
    if spec.max_docs and spec.max_docs < len(test):
        test = sorted(rng.permutation(test)[:spec.max_docs].tolist())
    texts = [corpus.texts[i] for i in test]
    topics = [corpus.topics[i] for i in test]

    embedder = load_embedder(m.embedder.model_dump(exclude_none=True), expert_set.root)
    routed_ids, margins = expert_set.route(embedder.embed(texts))
    ids = expert_set.expert_ids
    routed = np.array([ids.index(r) for r in routed_ids])
    k = len(ids)

    adapters = {eid: expert_set.adapter_dir(eid) for eid in ids}
    tmp = Path(tempfile.mkdtemp(prefix="crucible-moin-eval-"))
    if single_lora is not None:
        adapters["single"] = write_adapter(single_lora, tmp / "single")
    model = load_adapters(base.model, adapters)
    docs = encode(base.tokenizer, texts, max_len=spec.seq_len)
    pad = int(base.tokenizer.pad_token_id)
    names = [*ids, *(["single"] if single_lora is not None else []), "base"]
    nll = np.zeros((len(names), len(docs)))
    cnt = np.zeros((len(names), len(docs)))
    for row, name in enumerate(names):
        if name == "base":
            with model.disable_adapter():
                nll[row], cnt[row] = doc_nll(model, docs, batch_size=spec.batch_size, pad_id=pad)
        else:
            model.set_adapter(name)
            nll[row], cnt[row] = doc_nll(model, docs, batch_size=spec.batch_size, pad_id=pad)
        ctx.progress(row + 1, len(names))
    base_row = names.index("base")

    margin_cut = m.fallback_margin if spec.fallback_margin is None else spec.fallback_margin
    fallback = margins < margin_cut
    with_fallback = np.where(fallback, base_row, routed)
    random_choice = rng.integers(0, k, size=len(docs))
    out: dict[str, float] = {
        "documents": float(len(docs)), "experts": float(k),
        "ppl_base": perplexity(nll[base_row], cnt[base_row]),
        "ppl_routed": policy_ppl(nll, cnt, routed),
        "ppl_random": policy_ppl(nll, cnt, random_choice),
        "ppl_routed_fallback": policy_ppl(nll, cnt, with_fallback),
        "fallback_share": float(fallback.mean()), "fallback_margin": float(margin_cut),
        "mean_margin": float(np.mean(margins)),
    }
    if fallback.any():
        out["ppl_fallback_docs_base"] = perplexity(nll[base_row][fallback], cnt[base_row][fallback])
        rows = np.flatnonzero(fallback)
        out["ppl_fallback_docs_routed"] = perplexity(nll[routed[rows], rows], cnt[routed[rows], rows])
    if single_lora is not None:
        s = names.index("single")
        out["ppl_single_lora"] = perplexity(nll[s], cnt[s])
    if all(t is not None for t in topics):
        majority = {e.cluster: e.topic for e in m.experts}
        cluster_of = [m.experts[i].cluster for i in range(k)]
        out["routing_accuracy"] = float(np.mean([majority.get(cluster_of[r]) == t for r, t in zip(routed, topics,
                                                                                                   strict=True)]))
        by_cluster = {e.cluster: i for i, e in enumerate(m.experts)}
        if oracle and all(t in oracle for t in topics):
            oracle_choice = np.array([by_cluster[oracle[str(t)]] for t in topics])
            out["ppl_oracle"] = policy_ppl(nll, cnt, oracle_choice)
            out["oracle_agreement"] = float(np.mean(oracle_choice == routed))
    for i, eid in enumerate(ids):
        mine = routed == i
        ctx.log(f"  {eid} (topic {m.experts[i].topic}, {m.experts[i].size} train docs): {int(mine.sum())} test "
                f"docs routed here" + (f", ppl {perplexity(nll[i][mine], cnt[i][mine]):.2f} vs base "
                                       f"{perplexity(nll[base_row][mine], cnt[base_row][mine]):.2f}" if mine.any()
                                       else ""))
    params = sum(int(np.prod(s)) for eid in ids for s in es.adapter_shapes(expert_set.adapter_dir(eid)).values())
    out["expert_params_total"] = float(params)
    if single_lora is not None:
        out["single_lora_params"] = float(sum(int(np.prod(s)) for s in
                                              es.adapter_shapes(adapters["single"]).values()))
    ctx.log("held-out perplexity: " + ", ".join(f"{k_[4:]} {v:.2f}" for k_, v in out.items()
                                                  if k_.startswith("ppl_")))
    if "routing_accuracy" in out:
        ctx.log(f"routing accuracy {out['routing_accuracy']:.3f}; fallback share {out['fallback_share']:.3f}")
    ctx.set_result(out)
    return out


def run(ctx: MethodContext[MoinEvalSpec]) -> None:
    from workers.text.corpora import load_corpus

    spec = ctx.spec
    ckpts = ctx.inputs.get("checkpoints") or {}
    entry = ckpts.get("expert_set")
    if not entry or not entry.get("path"):
        raise JobConfigError("the job has no 'expert_set' input (the expert-set job's checkpoint)")
    state = torch.load(entry["path"], map_location="cpu", weights_only=False)
    workdir = Path(ctx.workdir or tempfile.mkdtemp(prefix="crucible-moin-eval-"))
    try:
        expert_set = load_from_checkpoint(state, workdir / "expert-set")
    except es.ExpertSetError as e:
        raise JobConfigError(str(e)) from None
    single = None
    if spec.single_lora:
        s_entry = ckpts.get("single_lora") or {}
        s_state = torch.load(s_entry["path"], map_location="cpu", weights_only=False)
        if "adapter_files" not in s_state:
            raise JobConfigError(f"{spec.single_lora} is not a train-expert checkpoint")
        if s_state["expert"]["cluster"] != "all":
            ctx.log(f"note: the single LoRA was trained on cluster {s_state['expert']['cluster']}, not on all data")
        single = s_state["adapter_files"]
    corpus = load_corpus(ctx.inputs.get("dataset") or {"uri": spec.dataset})
    evaluate(spec, corpus, expert_set, dict(state.get("oracle") or {}), ctx, single_lora=single)
