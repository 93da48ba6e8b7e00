"""Small-scale MoIN reproduction (issue 13; security-clip-experts.md §5.5), one command, 2 CPU cores.

The built-in multi-domain corpus (``builtin://multidomain``: news, Wikipedia, Python docstrings, license texts;
160 train / 40 held-out passages per topic) and the real pretrained SmolLM2-135M (frozen):

1. embed every document with all-MiniLM-L6-v2 (``embed``), spherical k-means into K topics (``cluster``);
2. one LoRA expert per cluster, its token budget proportional to the cluster's size (``train-expert``);
3. the single-LoRA baseline: one LoRA of the same rank on ALL training documents with the same total tokens;
4. the expert set (``expert-set``) and its routing evaluation (``moin-eval``) on the held-out documents:
   perplexity of the frozen base / single LoRA / routed (nearest centroid) / oracle (true topic's cluster) /
   random routing, routing accuracy, fallback share.

It calls the job kinds' own functions in-process (the same code the workers run). Every stage is cached in
``--workdir``: a rerun continues where the last one stopped, and ``--stop-after-minutes`` ends a run between
stages (so it fits a bounded lock window); the table is printed when every stage is done.

Expected from the design (§5.5): routed ≈ oracle < single LoRA < base; random routing worse than routed.

    python -m bench.moin_repro                      # K=4, 51k training tokens (~20 min on 2 idle cores)
    python -m bench.moin_repro --total-tokens 20000 --max-docs 80 --workdir /tmp/moin-quick
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import machine

NIL = "job:00000000-0000-0000-0000-000000000000"  # specs need a ref; the benchmark passes checkpoints directly


def _save(ctx: Any, path: Path) -> dict[str, str]:
    path.write_bytes(ctx.checkpoints[-1]["data"])
    return {"path": str(path)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-model", default="smollm2-135m")
    ap.add_argument("--embedder", default="minilm", choices=["minilm", "base-mean", "tfidf-svd"])
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--min-cluster-size", type=int, default=40)
    ap.add_argument("--total-tokens", type=int, default=51_200, help="tokens of ALL experts together (= single LoRA)")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--max-docs", type=int, default=None, help="held-out documents scored (default: all 160)")
    ap.add_argument("--fallback-margin", type=float, default=0.02)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/crucible-moin-repro"))
    ap.add_argument("--stop-after-minutes", type=float, default=None,
                    help="end between stages after this long (rerun to continue from the cache)")
    args = ap.parse_args(argv)

    import torch

    from shared.specs.experts import ClusterSpec, EmbedSpec, ExpertSetSpec, MoinEvalSpec, TrainExpertSpec
    from workers.expert_trainer import cluster, embed, evaluate, expert_set, train_expert
    from workers.runtime.local import LocalContext

    wd = args.workdir
    wd.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
              if k not in ("workdir", "stop_after_minutes", "max_docs", "fallback_margin")}
    cfg_file = wd / "config.json"
    if cfg_file.exists() and json.loads(cfg_file.read_text()) != config:
        print(f"{wd} holds a run with another configuration; use another --workdir", file=sys.stderr)
        return 2
    cfg_file.write_text(json.dumps(config))
    t_start = time.perf_counter()
    ds = {"uri": "builtin://multidomain"}
    timings: dict[str, float] = json.loads((wd / "timings.json").read_text()) if (wd / "timings.json").exists() else {}

    def stage(name: str, fn: Any) -> dict[str, str]:
        out = wd / f"{name}.pt"
        if out.exists():
            return {"path": str(out)}
        if args.stop_after_minutes and time.perf_counter() - t_start > 60 * args.stop_after_minutes:
            print(f"stopping before stage {name} (--stop-after-minutes); rerun the same command to continue")
            raise SystemExit(3)
        t0 = time.perf_counter()
        ctx = fn()
        timings[name] = round(time.perf_counter() - t0, 1)
        (wd / "timings.json").write_text(json.dumps(timings))
        print(f"  {name}: {timings[name]:.0f}s  {ctx.result}", flush=True)
        return _save(ctx, out)

    def run_embed() -> Any:
        ctx = LocalContext(EmbedSpec(embedder={"kind": args.embedder, "base_model": args.base_model}),
                           inputs={"dataset": ds})
        embed.run(ctx)
        return ctx

    emb = stage("embed", run_embed)

    def run_cluster() -> Any:
        ctx = LocalContext(ClusterSpec(embeddings=NIL, k=args.k, min_cluster_size=args.min_cluster_size),
                           inputs={"checkpoints": {"embeddings": emb}})
        cluster.run(ctx)
        return ctx

    clu = stage("cluster", run_cluster)
    k_final = len(torch.load(clu["path"], weights_only=False)["sizes"])
    training = {"base_model": args.base_model, "total_tokens": args.total_tokens, "seq_len": args.seq_len,
                "batch_size": args.batch_size, "lr": args.lr, "eval_docs": 40,
                "lora": {"rank": args.rank, "alpha": 2 * args.rank}}

    def run_expert(cluster_id: int | str) -> Any:
        spec = TrainExpertSpec(clustering=None if cluster_id == "all" else NIL, cluster=cluster_id,
                               training=training)
        ctx = LocalContext(spec, inputs={"dataset": ds, "checkpoints": {} if cluster_id == "all" else
                                         {"clustering": clu}})
        train_expert.run(ctx)
        return ctx

    experts = [stage(f"expert{k}", lambda k=k: run_expert(k)) for k in range(k_final)]
    single = stage("single", lambda: run_expert("all"))

    def run_set() -> Any:
        ids = [f"job:00000000-0000-0000-0000-{i:012d}" for i in range(len(experts))]
        ctx = LocalContext(ExpertSetSpec(clustering=NIL, experts=ids, fallback_margin=args.fallback_margin),
                           inputs={"checkpoints": {"clustering": clu, **{f"experts.{i}": e for i, e in
                                                                         enumerate(experts)}}},
                           workdir=wd)
        expert_set.run(ctx)
        return ctx

    es_ckpt = stage("expert_set", run_set)
    t0 = time.perf_counter()
    ctx = LocalContext(MoinEvalSpec(expert_set=NIL, single_lora=NIL, max_docs=args.max_docs, seq_len=args.seq_len,
                                    batch_size=args.batch_size),
                       inputs={"dataset": ds, "checkpoints": {"expert_set": es_ckpt, "single_lora": single}},
                       workdir=wd)
    evaluate.run(ctx)
    timings["eval"] = round(time.perf_counter() - t0, 1)
    r = ctx.result or {}
    for line in ctx.messages:
        print("  " + line)
    clu_state = torch.load(clu["path"], weights_only=False)
    rows = [
        ("frozen base", "-", r["ppl_base"], 0),
        ("single LoRA (all data, same tokens)", "-", r["ppl_single_lora"], int(r["single_lora_params"])),
        ("routed (nearest centroid)", f"{r['routing_accuracy']:.3f}", r["ppl_routed"], int(r["expert_params_total"])),
        (f"routed + fallback (margin < {r['fallback_margin']:g}: {r['fallback_share']:.1%} to base)", "-",
         r["ppl_routed_fallback"], int(r["expert_params_total"])),
        ("oracle (true topic -> its cluster)", f"{r.get('oracle_agreement', float('nan')):.3f} agree w/ routed",
         r["ppl_oracle"], int(r["expert_params_total"])),
        ("random routing", f"{1 / max(1, k_final):.3f} (chance)", r["ppl_random"], int(r["expert_params_total"])),
    ]
    print(f"\nMoIN small-scale reproduction - {machine()}")
    print(f"base {args.base_model}, embedder {args.embedder}, K={args.k} -> {k_final} clusters (sizes "
          f"{clu_state['sizes']}, purity {_purity(clu_state):.3f}), "
          f"LoRA r={args.rank} on q_proj/v_proj, {args.total_tokens} training tokens in all, seq_len {args.seq_len}, "
          f"{int(r['documents'])} held-out documents")
    print("\n| policy | routing accuracy | held-out perplexity | adapter params |\n|---|---|---|---|")
    for name, acc, ppl, params in rows:
        print(f"| {name} | {acc} | {ppl:.2f} | {params:,} |")
    order = ("routed ≈ oracle" if abs(r["ppl_routed"] - r["ppl_oracle"]) / r["ppl_oracle"] < 0.02 else
             "routed ≠ oracle")
    claims = [(f"{order}", abs(r["ppl_routed"] - r["ppl_oracle"]) / r["ppl_oracle"] < 0.02),
              ("routed < single LoRA", r["ppl_routed"] < r["ppl_single_lora"]),
              ("single LoRA < base", r["ppl_single_lora"] < r["ppl_base"]),
              ("random worse than routed", r["ppl_random"] > r["ppl_routed"])]
    print("\n" + "; ".join(f"{c}: {'holds' if ok else 'does NOT hold'}" for c, ok in claims))
    print(f"stage times (s): {json.dumps(timings)}; total {sum(timings.values()) / 60:.1f} min")
    (wd / "result.json").write_text(json.dumps({"result": r, "timings": timings, "config": config}, indent=1))
    return 0


def _purity(state: dict[str, Any]) -> float:
    value = state.get("purity")
    return float("nan") if value is None else float(value)


if __name__ == "__main__":
    raise SystemExit(main())
