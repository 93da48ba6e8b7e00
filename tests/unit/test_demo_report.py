"""`crucible demo`'s verdict line: it must say plainly whether MSF beat the random-init baseline."""

from __future__ import annotations

from services.embedded import knn_report


def test_ahead_on_every_metric_is_said_once() -> None:
    lines = knn_report({"knn_top1_k1": 0.55, "baseline_knn_top1_k1": 0.43,
                        "knn_top1_k20": 0.50, "baseline_knn_top1_k20": 0.38}, epochs=8)
    assert "MSF 0.550   random init 0.430  (1.28x random init)" in lines[1]
    assert lines[-1] == "MSF is above the random-init baseline on every k-NN metric after 8 epochs"


def test_a_tie_or_a_loss_is_reported_as_not_above() -> None:
    lines = knn_report({"knn_top1_k1": 0.431, "baseline_knn_top1_k1": 0.432,
                        "knn_top1_k20": 0.377, "baseline_knn_top1_k20": 0.377,
                        "knn_weighted_top1_k200": 0.30, "baseline_knn_weighted_top1_k200": 0.25}, epochs=6)
    assert lines[-1].startswith("note: MSF is NOT above random init on knn_top1_k1, knn_top1_k20 after 6 epochs")
    assert not any(line.startswith("MSF is above") for line in lines)


def test_a_metric_without_baseline_is_never_called_ahead() -> None:
    lines = knn_report({"knn_top1_k1": 0.9}, epochs=1)
    assert "random init n/a" in lines[1]
    assert lines[-1].startswith("note: MSF is NOT above random init on knn_top1_k1")
