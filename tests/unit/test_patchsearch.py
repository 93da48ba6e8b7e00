"""PatchSearch (methods §2): the flip-count poison score on a hand-built case, pruning and the stop rule,
Grad-CAM shapes/normalisation (ResNet and ViT) and localisation, detection metrics, the classifier's early
stop, manifests and the filtered dataset, and the whole job on a tiny ImageFolder with and without a manifest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from torch import Tensor, nn

from shared.specs import parse_spec
from shared.specs.patchsearch import PatchSearchSpec
from workers.poison_scanner.patchsearch.classifier import early_stop, f1_of
from workers.poison_scanner.patchsearch.clusters import Clusters
from workers.poison_scanner.patchsearch.inputs import Model, load_training_set, read_manifest
from workers.poison_scanner.patchsearch.metrics import detection_metrics
from workers.poison_scanner.patchsearch.outputs import write_filtered
from workers.poison_scanner.patchsearch.score import Scored, candidate_windows, flip_scores, paste
from workers.poison_scanner.patchsearch.search import iterative_search, n_pruned
from workers.vision.backbones import Backbone, BackboneFeatures, create_backbone
from workers.vision.gradcam import best_window, grad_cam

CKPT = "job:00000000-0000-0000-0000-000000000000"


class RedDetector(Backbone):
    """Hand-built 'SSL model': feature = [10 * max over pixels of relu(R - G - B - 0.5), 1]. A pure-red window
    (R=1, G=B=0) gives [5, 1]; grey images give [0, 1] - the red patch alone decides the cluster."""

    family, name, out_dim = "resnet", "red-detector", 2

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, -1.0, -1.0]).view(1, 3, 1, 1))
            self.conv.bias.fill_(-0.5)
        self.act = nn.ReLU()
        self.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        a = 10 * self.act(self.conv(x)).amax(dim=(2, 3))
        return torch.cat([a, torch.ones_like(a)], dim=1)

    def extract(self, x: Tensor, *, attentions: bool = False) -> BackboneFeatures:
        return BackboneFeatures(pooled=self(x), maps=[self.act(self.conv(x))])

    @property
    def cam_layer(self) -> nn.Module:
        return self.act


def _toy() -> tuple[Model, Clusters, Tensor]:
    model = Model(RedDetector(), {}, torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1), torch.device("cpu"))
    grey = torch.full((11, 3, 8, 8), 0.5)
    grey[10, :, 2:5, 3:6] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)  # the one poisoned test image
    centroids = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # not at the poisons: cos still grows with a
    clusters = Clusters(centroids, np.array([0] * 10 + [1]), np.zeros(11, np.float32), np.arange(11),
                        [np.arange(10), np.array([10])])
    return model, clusters, grey


def test_hand_built_assignments_are_as_designed():
    model, clusters, grey = _toy()
    assert clusters.assign(model.embed(grey)).tolist() == [0] * 10 + [1]


def test_a_pasted_trigger_flips_every_test_image_and_a_plain_patch_flips_none():
    model, clusters, grey = _toy()
    red = torch.zeros(1, 3, 3, 3)
    red[:, 0] = 1.0
    plain = torch.full((1, 3, 3, 3), 0.5)
    gen = torch.Generator().manual_seed(0)
    scores = flip_scores(model, clusters, grey, torch.from_numpy(clusters.assignments), torch.cat([red, plain, plain]),
                         torch.tensor([1, 0, 1]), gen, batch_size=4)
    # red -> all 11 test images in cluster 1, 1 of them was there before: 11 - 1
    assert scores[0] == 10
    # a grey window claimed by cluster 0 can at most "flip" the poisoned test image back by covering its trigger
    assert scores[1] in (0, 1)
    # a grey window claimed by cluster 1 pulls nobody in (and may push the poisoned image out)
    assert scores[2] in (0, -1)


def test_grad_cam_finds_the_trigger_window_on_the_hand_built_model():
    model, clusters, grey = _toy()
    wins, boxes = candidate_windows(model, clusters, grey[10:], window=3)
    assert wins.shape == (1, 1, 3, 3, 3) and boxes[0, 0].tolist() == [2, 3]
    assert torch.allclose(wins[0, 0, 0], torch.ones(3, 3)) and wins[0, 0, 1:].abs().max() == 0
    # a second window is taken after blanking the first: it is no longer the trigger
    _, boxes2 = candidate_windows(model, clusters, grey[10:], window=3, patches_per_image=2)
    assert boxes2[0, 0].tolist() == [2, 3] and boxes2[0, 1].tolist() != [2, 3]


@pytest.mark.parametrize("name", ["resnet18", "vit_micro_p2"])
def test_grad_cam_shape_and_normalisation(name):
    torch.manual_seed(0)
    backbone = create_backbone(name).eval()
    backbone.requires_grad_(False)  # frozen, as a loaded checkpoint
    x = torch.randn(3, 3, 16, 16)
    cam = grad_cam(backbone, x, lambda f: f[:, :8].sum(1))
    assert cam.shape == (3, 16, 16) and cam.dtype == torch.float32
    assert cam.min() >= 0 and cam.max() <= 1
    flat = cam.flatten(1)
    assert torch.all((flat.max(1).values == 1) | (flat.max(1).values == 0))  # min-max scaled per image
    assert torch.allclose(flat.min(1).values, torch.zeros(3))
    with pytest.raises(ValueError, match="one value per image"):
        grad_cam(backbone, x, lambda f: f)


def test_best_window_is_the_largest_box_sum_like_a_literal_loop():
    cam = torch.rand(2, 9, 9, generator=torch.Generator().manual_seed(1))
    rows, cols = best_window(cam, 4)
    for b in range(2):
        sums = {(r, c): float(cam[b, r:r + 4, c:c + 4].sum()) for r in range(6) for c in range(6)}
        assert (int(rows[b]), int(cols[b])) == max(sums, key=sums.get)


def test_paste_puts_each_patch_at_its_own_corner():
    x = torch.zeros(2, 3, 6, 6)
    p = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2) + 1
    out = paste(x, p, torch.tensor([0, 3]), torch.tensor([4, 1]))
    assert torch.equal(out[0, :, 0:2, 4:6], p[0]) and torch.equal(out[1, :, 3:5, 1:3], p[1])
    assert out.count_nonzero() == p.numel() and x.count_nonzero() == 0


@pytest.mark.parametrize("n,expected", [(100, 25), (8, 2), (4, 1), (3, 1), (2, 1), (1, 1)])
def test_pruning_is_geometric_and_never_zero(n, expected):
    assert n_pruned(n, 0.25) == expected  # the reference's floor(0.25 n) is 0 below 4: '[:-0]' emptied the list


def test_search_narrows_to_the_best_cluster_and_stops_cleanly():
    rng = np.random.default_rng(0)
    queues = [rng.permutation(np.arange(j * 10, j * 10 + 10)) for j in range(8)]  # 8 clusters of 10
    seen: list[int] = []

    def score(rows: np.ndarray) -> Scored:
        seen.extend(rows.tolist())
        s = np.where(rows // 10 == 5, 7, rows // 10 - 3)  # cluster 5 holds the "poisons"
        return Scored(s, torch.zeros(len(rows), 3, 2, 2), torch.zeros(len(rows), 2, dtype=torch.long))

    res = iterative_search(queues, 80, score, samples_per_iteration=2, prune_fraction=0.25)
    assert len(seen) == len(set(seen))  # nobody scored twice
    cands = [int(r["candidates"]) for r in res.rounds]
    # 8 -2 -1 -1 ...: the list keeps shrinking below 4 (the reference's '[:-0]' would have emptied it at 3)
    assert cands == [8, 6, 5, 4, 3][:len(cands)] and len(cands) == 5
    assert res.scored[50:60].all()  # the best cluster survived every round and was scored to the end
    assert set(res.order()[:10].tolist()) == set(range(50, 60))  # and is ranked first
    assert 0 < res.scored_fraction < 1


def test_search_stops_when_every_queue_is_exhausted():
    queues = [np.array([0]), np.array([1]), np.array([], dtype=np.int64)]
    res = iterative_search(queues, 2, lambda r: Scored(np.ones(len(r)), torch.zeros(len(r), 3, 1, 1),
                                                       torch.zeros(len(r), 2, dtype=torch.long)),
                           samples_per_iteration=5, prune_fraction=0.1)
    assert res.scored.all() and len(res.rounds) == 1  # the second round found nothing left to score


def test_detection_metrics_against_a_literal_count():
    poisoned = np.array([1, 1, 1, 0, 0, 0, 0, 0, 0, 0], dtype=bool)
    scores = np.array([9, 8, 0, 7, 0, 0, 0, 0, 0, -1], dtype=float)
    order = np.lexsort((np.arange(10), -scores))
    removed = np.array([1, 1, 0, 1, 0, 0, 0, 0, 0, 0], dtype=bool)
    m = detection_metrics(order, scores, scores != 0, removed, poisoned)
    assert m["top5_precision"] == pytest.approx(3 / 5)  # order: 0, 1, 3, 2, 4
    assert m["removal_precision"] == pytest.approx(2 / 3) and m["removal_recall"] == pytest.approx(2 / 3)
    assert m["removal_f1"] == pytest.approx(2 / 3) and m["clean_removed_fraction"] == pytest.approx(1 / 7)
    assert m["images_removed"] == 3 and m["poisons_removed"] == 2
    # AUROC literally: P(score_poison > score_clean) + 0.5 P(=)
    pairs = [(a, b) for a in scores[poisoned] for b in scores[~poisoned]]
    assert m["score_auroc"] == pytest.approx(np.mean([(a > b) + 0.5 * (a == b) for a, b in pairs]))


def test_early_stop_needs_patience_identical_checks():
    assert not early_stop([50] * 10, 10) and early_stop([40] + [50] * 10, 10)
    assert not early_stop([50] * 9 + [51, 50], 10)
    assert f1_of(torch.tensor([1, 1, 0, 0]), torch.tensor([1, 0, 1, 0])) == pytest.approx(0.5)


def test_spec_refuses_windows_that_do_not_fit_and_checkpoints_without_a_model():
    with pytest.raises(ValidationError, match="window=16 must be smaller"):
        parse_spec({"kind": "patchsearch", "checkpoint": CKPT, "dataset": "d", "image_size": 16, "window": 16})
    spec = PatchSearchSpec(checkpoint=CKPT, dataset="d")
    assert "writes no model" in spec.checkpoint_problems("checkpoint", producer_kind="eval", producer_spec={})[0][1]
    assert spec.checkpoint_problems("checkpoint", producer_kind="ssl-train", producer_spec={"image_size": 32}) == []
    small = PatchSearchSpec(checkpoint=CKPT, dataset="d", window=20)
    assert small.checkpoint_problems("checkpoint", producer_kind="ssl-train",
                                     producer_spec={"image_size": 16})[0][0] == "window"
    assert spec.dataset_problems(500)[0][0] == "clusters"


def _image_folder(root: Path, *, poison: bool) -> list[str]:
    rng = np.random.default_rng(0)
    poisoned = []
    for c, cls in enumerate(["a", "b", "c"]):
        for split, n in (("train", 30), ("test", 5)):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                img = np.full((16, 16, 3), 40 + 60 * c, np.uint8) + rng.integers(0, 30, (16, 16, 3), dtype=np.uint8)
                if split == "train" and cls == "a" and i < 10:
                    img[4:9, 6:11] = (255, 0, 0)
                    poisoned.append(f"train/{cls}/{i:03d}.png")
                Image.fromarray(img).save(d / f"{i:03d}.png")
    if poison:
        (root / "poison_manifest.json").write_text(json.dumps({
            "version": 1, "source_dataset": "x", "target_class": "a", "target_index": 0,
            "trigger": {"source": "builtin:red", "size": 5, "alpha": 0.0}, "poisoned": poisoned, "seed": 0}))
    return poisoned


def test_manifest_rows_and_the_filtered_dataset(tmp_path):
    listed = _image_folder(tmp_path / "ds", poison=True)
    training = load_training_set({"uri": "ds", "path": str(tmp_path / "ds")}, image_size=16)
    truth, why = read_manifest(training)
    assert truth is not None and why == "" and truth.poisoned.sum() == 10 and truth.unmatched == 0
    assert {training.paths[i] for i in np.flatnonzero(truth.poisoned)} == set(listed)
    red = training.dataset.train_images[truth.poisoned][:, 5, 7]
    assert (red == (255, 0, 0)).all()  # the rows really are the poisoned files
    removed = truth.poisoned.copy()
    removed[np.flatnonzero(truth.poisoned)[:3]] = False  # three poisons survive the filter
    removed[np.flatnonzero(~truth.poisoned)[0]] = True  # one clean image is sacrificed
    counts = write_filtered(tmp_path / "out", training, removed, provenance={"job": "t"})
    assert counts == {"train": 90 - 8, "test": 15, "removed": 8, "classes_emptied": 0}
    kept = json.loads((tmp_path / "out" / "poison_manifest.json").read_text())
    assert len(kept["poisoned"]) == 3 and kept["filtered_by"] == {"job": "t"}
    assert len(list((tmp_path / "out" / "train").rglob("*.png"))) == 82
    clean = tmp_path / "clean"
    _image_folder(clean, poison=False)
    truth, why = read_manifest(load_training_set({"uri": "c", "path": str(clean)}, image_size=16))
    assert truth is None and "no poison_manifest.json" in why


def test_a_class_filtered_away_loses_its_test_folder_so_the_tree_still_loads(tmp_path):
    """100 % of a class poisoned and all removed: the filtered tree must still load for the re-training."""
    from shared.data.imagefolder import load_image_folder

    _image_folder(tmp_path / "ds", poison=True)
    training = load_training_set({"uri": "ds", "path": str(tmp_path / "ds")}, image_size=16)
    removed = training.dataset.train_labels == training.dataset.classes.index("a")  # every 'a'
    counts = write_filtered(tmp_path / "out", training, removed, provenance={"job": "t"})
    assert counts == {"train": 60, "test": 10, "removed": 30, "classes_emptied": 1}
    assert not (tmp_path / "out" / "test" / "a").exists()
    ds = load_image_folder(tmp_path / "out", image_size=16)
    assert ds.classes == ["b", "c"] and len(ds.train_labels) == 60 and len(ds.test_labels) == 10


def _checkpoint(path: Path) -> Path:
    from workers.vision.checkpoints import model_payload

    torch.manual_seed(0)
    payload = model_payload(create_backbone("resnet10"), meta={
        "method": "simclr", "backbone": "resnet10", "stem": "cifar", "image_size": 16,
        "normalization": {"mean": [0.5] * 3, "std": [0.25] * 3}, "classes": ["a", "b", "c"]})
    torch.save(payload, path)
    return path


TINY_JOB = {"kind": "patchsearch", "checkpoint": CKPT, "dataset": "ds", "max_removed_fraction": 0.5,
            "clusters": 6, "test_images": 12, "window": 6,
            "classifier": {"topk_poisons": 5, "validation_images": 5, "models": 1, "max_iterations": 6,
                           "eval_every": 3, "batch_size": 8}}


@pytest.mark.parametrize("poison", [True, False], ids=["manifest", "no-manifest"])
def test_the_job_end_to_end_on_a_tiny_image_folder(tmp_path, poison):
    from workers.poison_scanner.patchsearch.job import run
    from workers.runtime.local import LocalContext

    _image_folder(tmp_path / "ds", poison=poison)
    spec = parse_spec(TINY_JOB)
    inputs = {"dataset": {"uri": "ds", "name": "ds", "path": str(tmp_path / "ds")},
              "checkpoints": {"checkpoint": {"path": str(_checkpoint(tmp_path / "m.pt"))}}}
    ctx = LocalContext(spec, inputs=inputs, workdir=tmp_path / "work")
    (tmp_path / "work").mkdir()
    run(ctx)
    r = ctx.result
    assert r is not None and r["images"] == 90 and 0 < r["scored_fraction"] <= 1
    assert {"seconds_embed_cluster", "seconds_search", "seconds_classifier"} <= set(r)
    assert {a["name"] for a in ctx.artifacts} == {"poison-scores", "top-patches", "patchsearch-report"}
    rows = (tmp_path / "work" / "poison-scores.csv").read_text().splitlines()
    assert len(rows) == 91 and rows[0].startswith("row,path,class,score")
    report = ctx.outputs["report"]
    if poison:
        assert r["detection_metrics"] == 1 and "top5_precision" in r and "removal_recall" in r
        assert r["poison_base_rate"] == pytest.approx(10 / 90)
    else:
        assert r["detection_metrics"] == 0 and "top5_precision" not in r
        assert "no poison_manifest.json" in report["detection"]["skipped"]
    assert r["images_removed"] <= 45  # max_removed_fraction 0.5
    kept = len(list((tmp_path / "work" / "filtered" / "train").rglob("*.png")))
    assert kept == 90 - r["images_removed"]


def test_a_probe_checkpoint_is_refused_with_the_fix(tmp_path):
    from workers.poison_scanner.patchsearch.job import run
    from workers.runtime.local import LocalContext
    from workers.vision.checkpoints import CheckpointError

    _image_folder(tmp_path / "ds", poison=False)
    torch.save({"probe": {}, "meta": {}}, tmp_path / "probe.pt")
    ckpt = {"checkpoint": {"path": str(tmp_path / "probe.pt")}}
    ctx = LocalContext(parse_spec(TINY_JOB), inputs={"dataset": {"uri": "ds", "path": str(tmp_path / "ds")},
                                                     "checkpoints": ckpt})
    with pytest.raises(CheckpointError, match="probe"):
        run(ctx)
    state = torch.load(_checkpoint(tmp_path / "m.pt"), weights_only=False)
    state["meta"]["backbone"] = "resnet18"  # resnet10 weights under a resnet18 label: the wrong architecture
    torch.save(state, tmp_path / "wrong.pt")
    ckpt = {"checkpoint": {"path": str(tmp_path / "wrong.pt")}}
    ctx = LocalContext(parse_spec(TINY_JOB), inputs={"dataset": {"uri": "ds", "path": str(tmp_path / "ds")},
                                                     "checkpoints": ckpt})
    with pytest.raises(CheckpointError, match="missing from the checkpoint"):
        run(ctx)


def test_the_defense_template_compiles_and_wires_the_four_models():
    from services.pipelines import templates
    from services.pipelines.compile import compile_pipeline

    t = templates.template("patchsearch-defense")
    d = compile_pipeline(t["steps"], templates.bind_params(t, {"epochs": 3, "rate": 0.5}))
    steps, order = d["steps"], d["order"]
    assert steps["patchsearch"]["spec"]["checkpoint"] == "${steps.poisoned_model.checkpoint}"
    assert steps["defended_model"]["spec"]["dataset"] == "${steps.patchsearch.outputs.filtered}"
    assert steps["defended_model"]["spec"]["icutmix"] is True
    assert steps["kd_model"]["spec"]["teachers"] == ["${steps.poisoned_model.checkpoint}"]
    assert order.index("poison") < order.index("poisoned_model") < order.index("patchsearch") \
        < order.index("defended_model") < order.index("eval_defended")
    assert {s for s in steps if s.startswith("eval_")} == {"eval_clean", "eval_poisoned", "eval_defended", "eval_kd"}
    assert steps["poison"]["spec"]["rate"] == 0.5 and steps["clean_model"]["spec"]["epochs"] == 3


def test_the_comparison_table_has_a_row_per_model_and_dashes_for_missing_numbers():
    from workers.poison_scanner.patchsearch.report import comparison_table

    r = {"attack_clean_acc": 0.9, "attack_patched_acc": 0.5, "attack_fp_clean": 4, "attack_fp_patched": 40,
         "attack_asr": 0.4}
    table = comparison_table({"eval_clean": r, "eval_poisoned": r, "eval_kd": {"attack_clean_acc": 0.8}})
    lines = table.splitlines()
    assert len(lines) == 5 and lines[2].startswith("| clean-data model | 0.900 | 0.500 | 4 | 40 | 0.400 |")
    assert lines[4] == "| KD-defended (CompRess) | 0.800 | - | - | - | - |"


def test_no_poison_rule_thresholds_the_ensembles_validation_f1():
    from workers.poison_scanner.patchsearch.job import no_poison_reason, score_outlier_z

    assert no_poison_reason(0.95, 0.8) is None
    assert no_poison_reason(0.8, 0.8) is None  # at the threshold: found
    reason = no_poison_reason(0.57, 0.8)
    assert reason is not None and reason.startswith("no poison found") and "0.570 < min_classifier_f1 0.8" in reason
    assert no_poison_reason(float("nan"), 0.8) is not None  # no validation: not found
    assert no_poison_reason(0.0, 0.0) is None  # 0 disables the rule (the reference)
    # robust z of the best score: median 1, MAD 1 -> (9 - 1) / 1.4826
    assert score_outlier_z(np.array([0.0, 1, 1, 2, 9])) == pytest.approx(8 / 1.4826)
    assert np.isnan(score_outlier_z(np.array([3.0, 3, 3])))


@pytest.mark.parametrize(("f1", "found"), [(0.3, False), (0.95, True)], ids=["no-trigger", "trigger"])
def test_the_job_removes_nothing_when_the_classifiers_find_no_trigger(tmp_path, monkeypatch, f1, found):
    """A hand-built classifier outcome (flags rows 0-9) with a low vs a high validation F1: the job removes
    nothing and says why, or removes the flagged rows."""
    from workers.poison_scanner.patchsearch import job
    from workers.poison_scanner.patchsearch.classifier import ClassifierReport
    from workers.runtime.local import LocalContext

    def fake_classifier(images, order, windows, opts, **_):
        flagged = np.zeros(len(order), dtype=bool)
        flagged[:10] = True
        return flagged, flagged.astype(np.float32), ClassifierReport([6], [f1], f1)

    monkeypatch.setattr(job, "poison_classifier", fake_classifier)
    _image_folder(tmp_path / "ds", poison=True)
    spec = parse_spec(TINY_JOB | {"min_classifier_f1": 0.8})
    inputs = {"dataset": {"uri": "ds", "name": "ds", "path": str(tmp_path / "ds")},
              "checkpoints": {"checkpoint": {"path": str(_checkpoint(tmp_path / "m.pt"))}}}
    (tmp_path / "work").mkdir()
    ctx = LocalContext(spec, inputs=inputs, workdir=tmp_path / "work")
    job.run(ctx)
    r, report = ctx.result, ctx.outputs["report"]
    assert r is not None and r["images_flagged"] == 10 and r["classifier_val_f1"] == pytest.approx(f1)
    kept = len(list((tmp_path / "work" / "filtered" / "train").rglob("*.png")))
    if found:
        assert r["no_poison_found"] == 0 and r["images_removed"] == 10 and kept == 80
        assert report["decision"].startswith("removed what the ensemble flags")
    else:
        assert r["no_poison_found"] == 1 and r["images_removed"] == 0 and kept == 90
        assert report["decision"].startswith("no poison found") and r["removal_recall"] == 0
        assert any("no poison found" in line for line in ctx.messages)
