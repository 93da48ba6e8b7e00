"""``expert-set``: assemble the servable expert set (MoIN §5.2: base + centroid index + adapters + embedder) from
the cluster job's checkpoint and the K train-expert jobs' checkpoints, in the format of ``workers.text.expert_set``.

Checks before anything is written: one expert per cluster and every cluster covered (an empty or missing cluster is
an error naming it), every expert trained on the same base (reference and weight fingerprint) and on this
clustering's corpus. The directory is packed into one tar, stored as an artifact of kind ``expert-set`` whose meta
asks the supervisor to version it and register it in the MLflow model registry (``register_model``); the job's
final checkpoint carries the same tar, so a ``moin-eval`` job reads it as an ordinary checkpoint input.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.specs.experts import ExpertSetSpec
from workers.common.context import MethodContext
from workers.expert_trainer.lm import write_adapter
from workers.runtime.context import JobConfigError
from workers.text import expert_set as es
from workers.text.embedders import write_embedder


def assemble(directory: Path, *, name: str, clustering: dict[str, Any], experts: list[dict[str, Any]],
             fallback_margin: float) -> es.ExpertSet:
    """Write the expert set into ``directory`` (see the module docstring); returns it loaded and validated."""
    k = len(clustering["sizes"])
    by_cluster: dict[int, dict[str, Any]] = {}
    for i, state in enumerate(experts):
        info = state.get("expert")
        if info is None or "adapter_files" not in state:
            raise JobConfigError(f"experts[{i}] is not a train-expert checkpoint (no adapter in it)")
        c = info["cluster"]
        if c == "all":
            raise JobConfigError(f"experts[{i}] was trained on all documents (the single-LoRA baseline), not on "
                                 "one cluster")
        if c in by_cluster:
            raise JobConfigError(f"experts[{i}] is a second expert for cluster {c}")
        if not 0 <= int(c) < k:
            raise JobConfigError(f"experts[{i}] is for cluster {c}, but the clustering has clusters 0..{k - 1}")
        by_cluster[int(c)] = state
    missing = sorted(set(range(k)) - set(by_cluster))
    if missing:
        raise JobConfigError(f"no expert for cluster(s) {missing}; train one per cluster (the cluster job's "
                             "`clusters` output lists them)")
    bases = {(s["expert"]["base_model"], s["expert"]["base_fingerprint"]) for s in by_cluster.values()}
    if len(bases) != 1:
        raise JobConfigError(f"the experts were trained on different base models: {sorted(b[0] for b in bases)}")
    (base_ref, base_fp), = bases
    sizes = clustering["sizes"]
    empty = [c for c in range(k) if sizes[c] == 0]
    if empty:
        raise JobConfigError(f"cluster(s) {empty} are empty; re-run the clustering (min_cluster_size merges them)")
    majority = {int(c): t for c, t in (clustering.get("majority_topic") or {}).items()}
    purity = {int(c): float(p) for c, p in (clustering.get("cluster_purity") or {}).items()}
    entries, sources = [], {}
    for c in range(k):
        eid = f"e{c}"
        src = write_adapter(by_cluster[c]["adapter_files"], directory / "_src" / eid)
        sources[eid] = src
        entries.append({"id": eid, "cluster": c, "adapter": f"adapters/{eid}", "size": int(sizes[c]),
                        **({"topic": majority[c]} if c in majority else {}),
                        **({"topic_purity": purity[c]} if c in purity else {})})
    write_embedder(clustering["embedder"], directory)
    centroids = clustering["centroids"].float().numpy() if hasattr(clustering["centroids"], "numpy") else \
        np.asarray(clustering["centroids"], dtype=np.float32)
    embedder = dict(clustering["embedder"]["config"])
    embedder.setdefault("dim", int(centroids.shape[1]))
    out = es.save(directory, name=name, base_model={"ref": base_ref, "sha256": base_fp}, embedder=embedder,
                  centroids=centroids, experts=entries, fallback_margin=fallback_margin, adapter_sources=sources)
    shutil.rmtree(directory / "_src", ignore_errors=True)
    return out


def run(ctx: MethodContext[ExpertSetSpec]) -> None:
    spec = ctx.spec
    ckpts = ctx.inputs.get("checkpoints") or {}

    def read(name: str) -> dict[str, Any]:
        entry = ckpts.get(name)
        if not entry or not entry.get("path"):
            raise JobConfigError(f"the job has no {name!r} input")
        state: dict[str, Any] = torch.load(entry["path"], map_location="cpu", weights_only=False)
        return state

    clustering = read("clustering")
    if "centroids" not in clustering:
        raise JobConfigError(f"{spec.clustering} is not a cluster job's checkpoint")
    experts = [read(f"experts.{i}") for i in range(len(spec.experts))]
    workdir = Path(ctx.workdir or tempfile.mkdtemp(prefix="crucible-expert-set-"))
    directory = workdir / "expert-set"
    try:
        loaded = assemble(directory, name=spec.set_name, clustering=clustering, experts=experts,
                          fallback_margin=spec.fallback_margin)
    except es.ExpertSetError as e:
        raise JobConfigError(str(e)) from None
    tar = es.pack(directory, workdir / f"{spec.set_name}.expert-set.tar")
    m = loaded.manifest
    sizes = [e.size for e in m.experts]
    ctx.log(f"expert set {spec.set_name!r}: {len(m.experts)} experts on {m.base_model.ref}, embedder "
            f"{m.embedder.kind}, sizes {sizes}, {tar.stat().st_size / 1e6:.1f} MB")
    meta = {"register_model": spec.set_name, "experts": len(m.experts), "base_model": m.base_model.ref,
            "embedder": m.embedder.kind, "fallback_margin": m.fallback_margin, "format_version": es.FORMAT_VERSION}
    ctx.save_artifact(tar, name=spec.set_name, artifact_kind=es.ARTIFACT_KIND, meta=meta)
    # oracle routing of the evaluation: ground-truth topic -> the cluster holding most of its training documents
    ctx.save_checkpoint({"expert_set_tar": tar.read_bytes(), "manifest": m.model_dump(mode="json"),
                         "oracle": dict(clustering.get("oracle") or {})},
                        epoch=1, step=len(m.experts), final=True)
    ctx.set_result({"experts": float(len(m.experts)), "documents": float(sum(sizes)),
                    "size_mb": tar.stat().st_size / 1e6})


def load_from_checkpoint(state: dict[str, Any], directory: Path) -> es.ExpertSet:
    """The expert set an ``expert-set`` job's checkpoint carries, unpacked into ``directory``."""
    if "expert_set_tar" not in state:
        raise JobConfigError("not an expert-set job's checkpoint (no expert_set_tar in it)")
    directory.mkdir(parents=True, exist_ok=True)
    tar = directory.parent / f"{directory.name}.tar"
    tar.write_bytes(state["expert_set_tar"])
    try:
        return es.unpack(tar, directory)
    finally:
        tar.unlink(missing_ok=True)
