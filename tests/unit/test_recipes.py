"""Dataset-aware augmentation recipes: the preset follows the dataset, the spec's fields win, views obey them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared.data import load_dataset
from shared.data.base import ImageDataset
from shared.specs import SslTrainSpec, parse_spec
from shared.specs.recipes import AUGMENT_PRESETS, dataset_family
from shared.tracking import flatten
from workers.vision.augment import build_view_transforms

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def spec(**fields: object) -> SslTrainSpec:
    out = parse_spec({"kind": "ssl-train", "method": "msf", **fields})
    assert isinstance(out, SslTrainSpec)
    return out


@pytest.mark.parametrize("dataset", ["builtin://mnist", "builtin://digits"])
def test_digit_datasets_get_no_flips_and_grey_jitter(dataset: str) -> None:
    aug = spec(dataset=dataset).augment
    assert aug.preset == "digits" and aug.hflip is False
    bri, con, sat, hue = aug.color_jitter or []
    assert bri > 0 and con > 0 and sat == 0 and hue == 0  # brightness/contrast only
    assert aug.grayscale_p == 0  # no grayscale op on grey images


def test_colour_and_upload_families() -> None:
    shapes = spec(dataset="builtin://shapes").augment
    assert shapes.preset == "shapes" and shapes.hflip and shapes.color_jitter == [0.4, 0.4, 0.4, 0.5]
    upload = spec(dataset="my-photos@2").augment
    assert upload.preset == "natural" and upload.color_jitter == [0.4, 0.4, 0.4, 0.1]
    assert upload.grayscale_p == 0.2 and upload.blur_p == 0  # MoCo-v2; no blur at 32 px
    assert spec(dataset="my-photos", image_size=96).augment.blur_p == 0.5
    grey = spec(dataset="xrays", augment={"preset": "grey"}).augment
    assert grey.hflip and grey.color_jitter == [0.4, 0.4, 0.0, 0.0] and grey.grayscale_p == 0


def test_spec_override_wins_over_the_preset_field_by_field() -> None:
    aug = spec(dataset="builtin://mnist", augment={"crop_scale": [0.8, 1.0], "hflip": True}).augment
    assert aug.crop_scale == [0.8, 1.0] and aug.hflip is True
    assert aug.color_jitter == AUGMENT_PRESETS["digits"]["color_jitter"]  # the rest still from the preset
    # an explicit preset beats the dataset's family
    assert spec(dataset="builtin://shapes", augment={"preset": "natural"}).augment.color_jitter[3] == 0.1
    # the legacy top-level color_jitter still works and lands in the recipe
    assert spec(dataset="builtin://shapes", color_jitter=[0.2, 0.2, 0.2, 0.1]).color_jitter == [0.2, 0.2, 0.2, 0.1]


def test_bad_recipes_are_refused_with_the_field() -> None:
    with pytest.raises(ValueError, match="saturation, hue and grayscale change nothing"):
        spec(dataset="builtin://mnist", augment={"color_jitter": [0.4, 0.4, 0.4, 0.1]})
    with pytest.raises(ValueError, match="crop_scale"):
        spec(augment={"crop_scale": [0.9, 0.5]})
    with pytest.raises(ValueError, match="hue"):
        spec(augment={"color_jitter": [0.4, 0.4, 0.4, 0.6]})
    with pytest.raises(ValueError, match="augment"):
        spec(augment={"flip": True})  # a typo fails loudly
    with pytest.raises(ValueError, match="warm-up"):
        spec(epochs=3, warmup_epochs=3)


def test_resolved_recipe_round_trips_and_is_logged_as_params() -> None:
    s = spec(dataset="builtin://mnist", augment={"crop_scale": [0.6, 1.0]})
    dumped = s.model_dump(mode="json")
    assert parse_spec(dumped).model_dump(mode="json") == dumped  # the stored spec re-validates to itself
    params = flatten(dumped)  # what the supervisor logs to MLflow at create_run
    assert params["augment.preset"] == "digits" and params["augment.hflip"] == "False"
    assert params["augment.crop_scale"] == "[0.6, 1.0]" and "warmup_epochs" in params
    assert s.critical_config()["augment"]["crop_scale"] == [0.6, 1.0]  # a resume must not change the views
    assert "augment" in SslTrainSpec.model_json_schema()["properties"]  # `crucible schema ssl-train` shows it


def test_builtin_metadata_names_the_family() -> None:
    assert dataset_family("builtin://mnist") == "digits" and dataset_family("builtin://shapes") == "shapes"
    digits = load_dataset({"uri": "builtin://digits"}, image_size=8, limit_train=20, limit_test=5)
    assert digits.family == "digits" and digits.grey


def test_views_follow_the_recipe() -> None:
    # An image whose left half is bright: a flip would move the brightness to the right half.
    x = torch.zeros(64, 3, 16, 16, dtype=torch.uint8)
    x[..., :8] = 200
    recipe = spec(dataset="builtin://mnist", augment={"crop_scale": [1.0, 1.0]}).augment
    weak, strong = build_view_transforms("weak/strong", 16, MEAN, STD, recipe=recipe)
    g = torch.Generator().manual_seed(0)
    for view in (weak(x, g), strong(x, g)):
        assert (view[..., :8].mean(dim=(1, 2, 3)) > view[..., 8:].mean(dim=(1, 2, 3))).all()  # never mirrored
    flipping, _ = build_view_transforms("weak/strong", 16, MEAN, STD,
                                        recipe=spec(dataset="builtin://mnist",
                                                    augment={"crop_scale": [1.0, 1.0], "hflip": True}).augment)
    out = flipping(x, torch.Generator().manual_seed(0))
    assert (out[..., :8].mean(dim=(1, 2, 3)) < out[..., 8:].mean(dim=(1, 2, 3))).any()


def test_grey_recipe_keeps_grey_images_grey() -> None:
    rng = np.random.default_rng(0)
    grey = torch.from_numpy(np.repeat(rng.integers(0, 255, (32, 1, 16, 16), dtype=np.uint8), 3, axis=1))
    _, strong = build_view_transforms("weak/strong", 16, MEAN, STD, recipe=spec(dataset="builtin://mnist").augment)
    out = strong(grey, torch.Generator().manual_seed(1))
    assert torch.allclose(out[:, 0], out[:, 1]) and torch.allclose(out[:, 1], out[:, 2])
    assert not torch.allclose(out, strong(grey, torch.Generator().manual_seed(2)))  # it still jitters


def test_grey_uploads_are_detected(tmp_path: object) -> None:
    x = np.zeros((4, 8, 8, 3), dtype=np.uint8)
    y = np.zeros(4, dtype=np.int64)
    ds = ImageDataset(x, y, x, y, classes=["a"], name="t")
    assert ds.family == "natural" and not ds.grey  # the default for data without metadata
    from shared.data.base import is_grey

    assert is_grey(x) and not is_grey(np.concatenate([x, x + np.array([0, 0, 1], dtype=np.uint8)]))


def test_demo_runs_on_every_builtin_dataset_with_its_recipe() -> None:
    from services.embedded import demo_spec, knn_report

    mnist = spec(**{k: v for k, v in demo_spec("builtin://mnist").items() if k != "kind"})
    assert mnist.dataset == "builtin://mnist" and mnist.augment.preset == "digits" and not mnist.augment.hflip
    assert demo_spec("mnist", epochs=3)["epochs"] == 3 and demo_spec("shapes")["dataset"] == "builtin://shapes"
    for bad, match in (("builtin://cifar10", "built-in dataset"), ("my-upload", "built-in dataset")):
        with pytest.raises(ValueError, match=match):
            demo_spec(bad)
    with pytest.raises(ValueError, match="--epochs"):
        demo_spec("mnist", epochs=0)
    lines = knn_report({"knn_top1_k20": 0.73, "baseline_knn_top1_k20": 0.84}, epochs=8, dataset="builtin://mnist")
    assert lines[0].startswith("k-NN top-1 accuracy on builtin://mnist")
    assert lines[-1].startswith("note: MSF is NOT above random init on knn_top1_k20") and "MNIST" in lines[-1]


def test_the_mnist_example_is_the_mnist_demo_and_spells_out_the_preset() -> None:
    from pathlib import Path

    import yaml

    from services.embedded import demo_spec

    path = Path(__file__).resolve().parents[2] / "shared" / "specs" / "examples" / "msf-mnist.yaml"
    example = parse_spec(yaml.safe_load(path.read_text())).model_dump(mode="json")
    demo = parse_spec(demo_spec("builtin://mnist")).model_dump(mode="json")
    skip = {"experiment", "name"}
    assert {k: v for k, v in example.items() if k not in skip} == {k: v for k, v in demo.items() if k not in skip}
    assert yaml.safe_load(path.read_text())["augment"] == example["augment"]  # written out = what resolves


def test_warmup_ramps_then_runs_the_schedule_over_the_rest() -> None:
    from workers.common.schedule import lr_at_epoch

    lrs = [lr_at_epoch(e, base_lr=0.3, epochs=10, warmup_epochs=2) for e in range(1, 11)]
    assert lrs[:3] == pytest.approx([0.1, 0.2, 0.3])  # ramp, then cosine from the full LR
    assert lrs[3:] == pytest.approx([lr_at_epoch(e, base_lr=0.3, epochs=8) for e in range(2, 9)])
    assert [lr_at_epoch(e, base_lr=0.3, epochs=10) for e in range(1, 11)] == \
        [lr_at_epoch(e, base_lr=0.3, epochs=10, warmup_epochs=0) for e in range(1, 11)]
