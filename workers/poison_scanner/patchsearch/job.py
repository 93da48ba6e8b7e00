"""``patchsearch`` jobs: ``run(ctx)`` (the platform entry point) and ``patchsearch(...)`` (direct calls, the bench).

Stages and their wall-clock (reported as ``seconds_<stage>``): embed + k-means, search (Grad-CAM windows and
flip scores, round by round), poison classifier, removal + outputs. Outputs:

* result: the detection metrics (when the dataset has a poison manifest), the cost (seconds per stage,
  ``scored_fraction`` = share of the images the search scored, rounds), ``images_removed``, and the "no poison
  found" rule's inputs and outcome (``classifier_val_f1``, ``no_poison_found``, ``images_flagged`` = what the
  ensemble flagged before the rule and the cap, ``best_score_z``);
* ``poison-scores`` (CSV, one row per training image), ``top-patches`` (PNG grid of the best windows; an
  ``image`` artifact), ``patchsearch-report`` (JSON: settings, metrics or the reason they were skipped, rounds);
* the filtered dataset, ``ctx.save_dataset(..., output="filtered")`` (lineage: the input dataset and model);
* output ``report``: the report's summary (a pipeline step can read it).
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.specs.patchsearch import PatchSearchSpec, scaled
from workers.common import device as dev
from workers.common.context import MethodContext
from workers.poison_scanner.patchsearch.classifier import poison_classifier
from workers.poison_scanner.patchsearch.clusters import build_clusters
from workers.poison_scanner.patchsearch.inputs import (
    GroundTruth,
    Model,
    TrainingSet,
    load_model,
    load_training_set,
    read_manifest,
)
from workers.poison_scanner.patchsearch.metrics import detection_metrics
from workers.poison_scanner.patchsearch.outputs import patch_grid, write_filtered, write_scores
from workers.poison_scanner.patchsearch.score import Scorer
from workers.poison_scanner.patchsearch.search import SearchResult, iterative_search
from workers.runtime.context import JobConfigError
from workers.vision.checkpoints import job_model_checkpoint


def run(ctx: MethodContext[PatchSearchSpec]) -> None:
    spec = ctx.spec
    state, meta = job_model_checkpoint(ctx.inputs, ref=spec.checkpoint)
    size = spec.image_size or int(meta["image_size"])
    problem = spec.image_size_problem(size)
    if problem:
        raise JobConfigError(problem)
    ref = (ctx.inputs or {}).get("dataset") or {"uri": spec.dataset}
    training = load_training_set(ref, image_size=size)
    ctx.log(f"dataset {training.dataset.name}: {training.n} training images, {size}px")
    problems = spec.dataset_problems(training.n)
    if problems:
        raise JobConfigError("; ".join(f"{loc}: {msg}" for loc, msg in problems))
    dev.configure_threads()
    device = dev.select_device()
    model = load_model(state, source=spec.checkpoint, device=device)
    patchsearch(spec, training, model, ctx=ctx)


@dataclass
class PatchSearchOutcome:
    search: SearchResult
    removed: np.ndarray
    prob: np.ndarray
    metrics: dict[str, float]
    result: dict[str, float]
    report: dict[str, Any] = field(default_factory=dict)
    filtered_dir: Path | None = None


def _timer() -> Any:
    t0 = time.perf_counter()
    return lambda: time.perf_counter() - t0


def patchsearch(spec: PatchSearchSpec, training: TrainingSet, model: Model, *,
                ctx: MethodContext[PatchSearchSpec]) -> PatchSearchOutcome:
    """All four stages, removal and outputs on an already loaded dataset and model."""
    n, side = training.n, training.dataset.image_size
    window = spec.window if spec.window is not None else scaled(60, side)
    images = torch.from_numpy(np.ascontiguousarray(training.dataset.train_images)).permute(0, 3, 1, 2).contiguous()
    truth, why_not = read_manifest(training)
    seconds: dict[str, float] = {}
    torch.manual_seed(spec.seed)

    # (a) embeddings and k-means
    clock = _timer()
    feats = torch.cat([model.embed(images[s:s + spec.batch_size].float().div_(255.0), spec.batch_size)
                       for s in range(0, n, spec.batch_size)])
    ctx.progress(n, n, epoch=1)
    clusters = build_clusters(feats, spec.clusters, iters=spec.kmeans_iters, test_images=spec.test_images,
                              seed=spec.seed)
    used = sum(1 for q in clusters.queues if len(q))
    seconds["embed_cluster"] = clock()
    ctx.log(f"stage 1: {n} embeddings, k-means into {clusters.k} clusters ({used} non-empty), test set "
            f"{len(clusters.test_set)} images, window {window}px ({seconds['embed_cluster']:.1f}s)")

    # (b, c) Grad-CAM windows, flip scores, iterative search with pruning
    clock = _timer()
    scorer = Scorer(model, clusters, images, window=window, patches_per_image=spec.patches_per_image,
                    seed=spec.seed, batch_size=spec.batch_size)

    def on_round(res: SearchResult) -> None:
        last = res.rounds[-1]
        ctx.progress(int(last["scored"]), n, epoch=2)
        ctx.log_metrics({"search_candidates": last["candidates"], "search_scored": last["scored"],
                         "search_best_score": last["best_score"]}, step=len(res.rounds))
        ctx.check_preempt()

    search = iterative_search(clusters.queues, n, scorer, samples_per_iteration=spec.samples_per_iteration,
                              prune_fraction=spec.prune_fraction, on_round=on_round)
    seconds["search"] = clock()
    order = search.order()
    ctx.log(f"stages 2-3: {len(search.rounds)} rounds scored {int(search.scored.sum())} of {n} images "
            f"({search.scored_fraction:.1%}); best score {search.scores.max():g} ({seconds['search']:.1f}s)")

    # (d) poison classifier ensemble and removal
    clock = _timer()
    opts = spec.classifier

    def on_step(done: int, total: int) -> None:
        ctx.progress(done, total, epoch=3)
        if done % 50 == 0:
            ctx.check_preempt()

    removed, prob, creport = poison_classifier(images, order, search.windows, opts, mean=model.mean,
                                               std=model.std, seed=spec.seed, device=model.device,
                                               on_step=on_step)
    flagged = int(removed.sum())
    decision = no_poison_reason(creport.ensemble_val_f1, spec.min_classifier_f1)
    if decision is not None:
        ctx.log(f"stage 4: {decision}; the {flagged} images the ensemble flags are kept")
        removed = np.zeros(n, dtype=bool)
    cap = math.floor(spec.max_removed_fraction * n)
    if removed.sum() > cap:
        ctx.log(f"the classifiers flag {int(removed.sum())} images, above max_removed_fraction="
                f"{spec.max_removed_fraction:g}: removing the {cap} with the highest P(poison)")
        keep_top = np.argsort(-prob, kind="stable")[:cap]
        removed = np.zeros(n, dtype=bool)
        removed[keep_top] = True
    seconds["classifier"] = clock()
    ctx.log(f"stage 4: {opts.models} classifiers ({creport.iterations} iterations, validation F1 "
            f"{[round(f, 3) for f in creport.val_f1]}) remove {int(removed.sum())} of {n} images "
            f"({seconds['classifier']:.1f}s)")

    clock = _timer()
    metrics: dict[str, float] = {}
    if truth is not None:
        metrics = detection_metrics(order, search.scores, search.scored, removed, truth.poisoned, prob)
        ctx.log("detection: " + ", ".join(f"{k} {v:.3g}" for k, v in metrics.items()))
    else:
        ctx.log(f"detection metrics skipped: {why_not}")
    outcome = PatchSearchOutcome(search, removed, prob, metrics, {})
    _write_outputs(spec, training, outcome, truth, window=window, ctx=ctx)
    seconds["outputs"] = clock()

    z = score_outlier_z(search.scores[search.scored])
    result = {**metrics, "images": float(n), "images_removed": float(removed.sum()),
              "no_poison_found": 1.0 if decision is not None else 0.0, "images_flagged": float(flagged),
              "classifier_val_f1": creport.ensemble_val_f1, "best_score_z": z,
              "scored_images": float(search.scored.sum()), "scored_fraction": search.scored_fraction,
              "search_rounds": float(len(search.rounds)), "best_score": float(search.scores.max()),
              "detection_metrics": 1.0 if truth is not None else 0.0,
              **{f"seconds_{k}": v for k, v in seconds.items()}, "seconds_total": sum(seconds.values())}
    outcome.result = {k: v for k, v in result.items() if math.isfinite(v)}
    outcome.report = {"detection": metrics if truth is not None else {"skipped": why_not},
                      "cost": {"seconds": seconds, "scored_fraction": search.scored_fraction,
                               "scored_images": int(search.scored.sum()), "rounds": len(search.rounds)},
                      "decision": decision or (f"removed what the ensemble flags (validation F1 "
                                               f"{creport.ensemble_val_f1:.3f} >= min_classifier_f1 "
                                               f"{spec.min_classifier_f1:g})"),
                      "images": n, "images_removed": int(removed.sum()), "images_flagged": flagged,
                      "best_score_z": z, "window": window,
                      "clusters": clusters.k, "test_images": len(clusters.test_set),
                      "classifier": {"iterations": creport.iterations, "val_f1": creport.val_f1,
                                     "ensemble_val_f1": creport.ensemble_val_f1}}
    save_output = getattr(ctx, "save_output", None)  # JobContext and LocalContext have it
    if save_output is not None:
        save_output("report", outcome.report)
    ctx.set_result(outcome.result)
    return outcome


def no_poison_reason(ensemble_f1: float, min_f1: float) -> str | None:
    """Why nothing should be removed (None: remove what the ensemble flags).

    The ensemble's validation positives are the top-scored images themselves: when they carry a shared trigger
    the classifier trained on their windows recognises them; ordinary top-scored images (a clean dataset) share
    nothing it can learn, so its F1 stays low. A NaN F1 (no validation) counts as not found."""
    if min_f1 <= 0:
        return None
    if not ensemble_f1 >= min_f1:  # also NaN
        return (f"no poison found: the poison classifiers reach validation F1 {ensemble_f1:.3f} < "
                f"min_classifier_f1 {min_f1:g} on the top-scored vs bottom-scored images, so the best windows "
                "share no trigger they can learn")
    return None


def score_outlier_z(scores: np.ndarray) -> float:
    """How far the best score stands out of the scored images' scores: (max - median) / (1.4826 MAD), a robust
    z; a diagnostic reported beside the decision (a lone trigger-bearing cluster stands out, a clean set's best
    windows need not). NaN when the MAD is 0 or fewer than 3 images were scored."""
    if len(scores) < 3:
        return math.nan
    med = float(np.median(scores))
    mad = 1.4826 * float(np.median(np.abs(scores - med)))
    return (float(scores.max()) - med) / mad if mad > 0 else math.nan


def _write_outputs(spec: PatchSearchSpec, training: TrainingSet, outcome: PatchSearchOutcome,
                   truth: GroundTruth | None, *, window: int, ctx: MethodContext[PatchSearchSpec]) -> None:
    out = Path(ctx.workdir or tempfile.mkdtemp(prefix="crucible-patchsearch-"))
    search, removed = outcome.search, outcome.removed
    poisoned = truth.poisoned if truth is not None else None
    scores_path = write_scores(out / "poison-scores.csv", training, search.scores, search.scored, removed,
                               outcome.prob, poisoned)
    ctx.save_artifact(scores_path, name="poison-scores", artifact_kind="file",
                      meta={"rows": training.n, "columns": "row,path,class,score,scored,p_poison,removed"})
    top = [int(i) for i in search.order() if int(i) in search.windows][:spec.save_top_patches]
    grid = patch_grid([search.windows[i] for i in top], out / "top-patches.png",
                      poisoned=[bool(poisoned[i]) for i in top] if poisoned is not None else None)
    ctx.save_artifact(grid, name="top-patches", artifact_kind="image",
                      meta={"patches": len(top), "window": window, "order": "best score first",
                            "frame": "red = poison in the manifest" if poisoned is not None else "none"})
    name = spec.filtered_name or f"{training.dataset.name.split('@')[0].replace('/', '-')}-filtered"
    name = "".join(ch if ch.isalnum() or ch in "._-" else "-" for ch in name).strip("-.")[:128] or "filtered"
    provenance = {"job": "patchsearch", "checkpoint": spec.checkpoint, "removed": int(removed.sum())}
    filtered = out / "filtered"
    counts = write_filtered(filtered, training, removed, provenance=provenance)
    if counts["classes_emptied"]:
        ctx.log(f"{counts['classes_emptied']} class(es) lost every training image; their test folders are left "
                "out of the filtered dataset so it still loads (the poisoned dataset keeps them for evaluation)")
    outcome.filtered_dir = filtered
    save_dataset = getattr(ctx, "save_dataset", None)
    if save_dataset is not None:  # its stats (image and class counts) come from the tree itself
        save_dataset(filtered, name=name, output="filtered",
                     meta={"filtered_by": provenance, "removed": counts["removed"], "kept_train": counts["train"]})
    else:
        ctx.log("this context cannot save datasets (no save_dataset); the filtered tree stays at "
                f"{filtered}")
    report_path = out / "patchsearch-report.json"
    report_path.write_text(json.dumps({"spec": spec.model_dump(mode="json"), "metrics": outcome.metrics,
                                       "rounds": search.rounds, "filtered": counts}, indent=1, default=str))
    ctx.save_artifact(report_path, name="patchsearch-report", artifact_kind="file")
