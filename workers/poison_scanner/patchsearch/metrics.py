"""Detection metrics against the poison manifest (§2.3, §2.8): how well the scores rank the poisons and how well
the removal separates them.

* ``top{k}_precision``: share of true poisons among the k best-scored images, k in 5, 10, 20, 50, 100, 200, 500
  (those not above the number of images); the reference's "accuracy in top-k";
* ``removal_precision`` = poisons removed / images removed; ``removal_recall`` = poisons removed / poisons (the
  share of poisons eliminated); ``removal_f1``; ``clean_removed_fraction`` = clean images removed / clean images
  (what the defence sacrifices); ``images_removed``, ``poisons_removed``;
* ``score_auroc``: ROC AUC of the poison score (unscored images at 0, the reference's file) against the manifest;
  ``classifier_auroc``: of the ensemble's P(poison); ``scored_poison_fraction``: poisons among scored images.
"""

from __future__ import annotations

import numpy as np

TOPK = (5, 10, 20, 50, 100, 200, 500)


def auroc(scores: np.ndarray, truth: np.ndarray) -> float:
    """ROC AUC (scikit-learn; ties count half); NaN when one class is absent."""
    truth = np.asarray(truth, dtype=bool)
    pos, neg = int(truth.sum()), int((~truth).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(truth, np.asarray(scores, dtype=np.float64)))


def detection_metrics(order: np.ndarray, scores: np.ndarray, scored: np.ndarray, removed: np.ndarray,
                      poisoned: np.ndarray, prob: np.ndarray | None = None) -> dict[str, float]:
    """Every metric of the module docstring; ``order`` = rows by score, best first."""
    poisoned = np.asarray(poisoned, dtype=bool)
    removed = np.asarray(removed, dtype=bool)
    n = len(poisoned)
    out: dict[str, float] = {}
    for k in TOPK:
        if k <= n:
            out[f"top{k}_precision"] = float(poisoned[order[:k]].mean())
    tp = int((removed & poisoned).sum())
    n_removed, n_poison, n_clean = int(removed.sum()), int(poisoned.sum()), int((~poisoned).sum())
    precision = tp / n_removed if n_removed else 0.0
    recall = tp / n_poison if n_poison else float("nan")
    out |= {
        "poisons": float(n_poison),
        "images_removed": float(n_removed),
        "poisons_removed": float(tp),
        "removal_precision": precision,
        "removal_recall": recall,
        "removal_f1": 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0,
        "clean_removed_fraction": (n_removed - tp) / n_clean if n_clean else 0.0,
        "score_auroc": auroc(scores, poisoned),
        "scored_poison_fraction": float(poisoned[scored].mean()) if scored.any() else 0.0,
        "poison_base_rate": n_poison / n if n else 0.0,
    }
    if prob is not None:
        out["classifier_auroc"] = auroc(prob, poisoned)
    return out
