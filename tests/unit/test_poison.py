"""Poisoning: trigger pasting geometry (the reference's location rule and inverted alpha), the manifest as ground
truth, determinism under a seed, and the spec's bad-input rules."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from shared.data import load_dataset
from shared.data.imagefolder import load_image_folder
from shared.specs.poison import MANIFEST_FILENAME, PoisonSpec, load_manifest, load_patched_test, poisoned_mask
from workers.poison_scanner.poison import load_trigger, poison_dataset
from workers.poison_scanner.triggers import builtin_trigger, checkerboard, location, paste


def test_location_follows_the_reference_rule() -> None:
    rng = np.random.default_rng(0)
    xs = [location(rng, 16, 5, 0.25, 0.75) for _ in range(400)]
    assert min(xs) == 4 and max(xs) == 7  # floor(0.25*16) .. floor(0.75*16 - 5)
    xs = [location(rng, 32, 8, 0.1, 0.9) for _ in range(400)]
    assert min(xs) == 3 and max(xs) == 20
    assert location(rng, 16, 10, 0.25, 0.75) == 4  # empty range: the lower bound


def test_paste_geometry_and_inverted_alpha() -> None:
    img = np.full((16, 16, 3), 100, np.uint8)
    trig = np.full((5, 5, 3), 200, np.uint8)
    out = paste(img, trig, x=3, y=6, alpha=0.0)
    changed = np.argwhere((out != img).any(axis=2))
    assert changed[:, 0].min() == 6 and changed[:, 0].max() == 10  # rows = y .. y + h - 1
    assert changed[:, 1].min() == 3 and changed[:, 1].max() == 7  # columns = x .. x + w - 1
    assert (out[6:11, 3:8] == 200).all() and img[0, 0, 0] == 100  # alpha 0: opaque trigger, input untouched
    assert (paste(img, trig, 3, 6, alpha=1.0) == img).all()  # alpha 1: the image only
    assert (paste(img, trig, 3, 6, alpha=0.25)[6:11, 3:8] == 175).all()  # 0.25*100 + 0.75*200
    with pytest.raises(ValueError, match="does not fit"):
        paste(img, trig, 12, 0)


def test_builtin_triggers() -> None:
    cb = checkerboard(4, cell=1)
    assert cb[0, 0, 0] == 255 and cb[0, 1, 0] == 0 and cb[1, 1, 0] == 255
    a, b = builtin_trigger("random-colors", 5, 1), builtin_trigger("random-colors", 5, 1)
    assert a.shape == (5, 5, 3) and (a == b).all() and not (a == builtin_trigger("random-colors", 5, 2)).all()
    assert builtin_trigger("smooth-colors", 8, 0).shape == (8, 8, 3)


def _spec(**kw: Any) -> PoisonSpec:
    return PoisonSpec.model_validate({"target_class": "circle", "image_size": 16, "trigger": {"size": 5,
                                      "builtin": "random-colors"}, "rate": 0.5, "seed": 3} | kw)


@pytest.fixture(scope="module")
def data() -> Any:
    return load_dataset({"uri": "builtin://shapes"}, image_size=16, limit_train=200, limit_test=60)


def test_poisoned_dataset_and_manifest(data: Any, tmp_path: Path) -> None:
    spec = _spec()
    trig = load_trigger(spec, dataset_root=None)
    m = poison_dataset(spec, data, tmp_path / "a", trigger=trig, source="builtin://shapes")
    root = tmp_path / "a"
    target = data.classes.index("circle")
    n_target = int((data.train_labels == target).sum())
    assert len(m.poisoned) == n_target // 2 and m.target_class == "circle"
    assert m.classes == sorted(data.classes) and m.target_index == sorted(data.classes).index("circle")
    assert all(p.startswith("train/circle/") for p in m.poisoned)
    # ground truth: each poisoned file holds the trigger exactly at its box; unpoisoned files are the originals
    names = sorted(p.name for p in (root / "train" / "circle").iterdir())
    assert len(names) == n_target and all(n.endswith(".png") and n[:-4].isdigit() for n in names)  # normal names
    for rel in m.poisoned:
        x, y, w, h = m.boxes[rel]
        assert 4 <= x <= 7 and 4 <= y <= 7 and w == h == 5
        pix = np.asarray(Image.open(root / rel))
        assert (pix[y:y + h, x:x + w] == trig).all()
        i = int(Path(rel).stem)
        outside = np.ones((16, 16), bool)
        outside[y:y + h, x:x + w] = False
        assert (pix[outside] == data.train_images[i][outside]).all()
    clean_rel = next(f"train/circle/{n}" for n in names if f"train/circle/{n}" not in m.poisoned_set())
    assert (np.asarray(Image.open(root / clean_rel)) == data.train_images[int(clean_rel[-10:-4])]).all()
    # patched test: non-target images only, trigger inside val_location, the rest of each image its original
    assert m.patched_test and all(not p.startswith("test/circle/") for p in m.patched_test)
    assert len(m.patched_test) == int((data.test_labels != target).sum())
    assert all(1 <= b[0] <= 9 and 1 <= b[1] <= 9 for b in m.patched_boxes.values())  # floor(.1*16)..floor(.9*16-5)
    images, labels, boxes = load_patched_test(root, m)
    assert images.shape == (len(m.patched_test), 16, 16, 3) and (labels != m.target_index).all()
    for row, (rel, (x, y, w, h)) in enumerate(zip(m.patched_test, boxes, strict=True)):
        assert (images[row, y:y + h, x:x + w] == trig).all()
        clean = np.asarray(Image.open(root / rel))
        assert (images[row][:y] == clean[:y]).all() and m.classes[labels[row]] == rel.split("/")[1]
    assert (np.load(root / "trigger.npy") == trig).all()
    # the manifest round-trips; the image loader sees train/ + test/ only; the mask follows its row order
    assert load_manifest(root) == m and json.loads((root / MANIFEST_FILENAME).read_text())["version"] == 1
    loaded = load_image_folder(root, image_size=16)
    assert len(loaded.train_images) == 200 and len(loaded.test_images) == 60
    mask = poisoned_mask(m, root)
    assert mask.sum() == len(m.poisoned)
    assert (loaded.train_labels[mask] == m.target_index).all()


def test_same_seed_same_bytes_other_seed_other_choice(data: Any, tmp_path: Path) -> None:
    trig = load_trigger(_spec(), dataset_root=None)
    a = poison_dataset(_spec(), data, tmp_path / "a", trigger=trig, source="s")
    b = poison_dataset(_spec(), data, tmp_path / "b", trigger=trig, source="s")
    c = poison_dataset(_spec(seed=4), data, tmp_path / "c", trigger=trig, source="s")
    assert a == b and a.poisoned != c.poisoned
    for rel in a.poisoned:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()


def test_badnets_mode_relabels_non_target_images(data: Any, tmp_path: Path) -> None:
    spec = _spec(mode="badnets", rate=0.1)
    m = poison_dataset(spec, data, tmp_path / "bn", trigger=load_trigger(spec, dataset_root=None), source="s")
    target = data.classes.index("circle")
    assert len(m.poisoned) == int(0.1 * int((data.train_labels != target).sum()))
    assert all(p.startswith("train/circle/") for p in m.poisoned)
    assert all(data.train_labels[int(Path(p).stem)] != target for p in m.poisoned)


def test_custom_png_trigger(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.full((10, 10, 3), (255, 0, 0), np.uint8)).save(buf, format="PNG")
    spec = _spec(trigger={"png_base64": base64.b64encode(buf.getvalue()).decode(), "size": 4})
    trig = load_trigger(spec, dataset_root=None)
    assert trig.shape == (4, 4, 3) and (trig == (255, 0, 0)).all()
    (tmp_path / "triggers").mkdir()
    Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(tmp_path / "triggers" / "t.png")
    spec = _spec(dataset="mydata", trigger={"file": "triggers/t.png", "size": 3})
    assert load_trigger(spec, dataset_root=tmp_path).shape == (3, 3, 3)


@pytest.mark.parametrize(("override", "match"), [
    ({"rate": 0.0}, "outside \\(0, 1\\]"),
    ({"rate": 1.01}, "outside \\(0, 1\\]"),
    ({"trigger": {"size": 17}}, "larger than image_size=16"),
    ({"target_class": "dog"}, "not a class of builtin://shapes"),
    ({"trigger": {"png_base64": "bm90IGFuIGltYWdl"}}, "does not decode as an image"),
    ({"trigger": {"file": "../x.png"}}, "relative path"),
    ({"train_location": [0.8, 0.9]}, "leaves the 16-px image"),
])
def test_bad_input_is_refused_by_the_spec(override: dict[str, Any], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        _spec(**override)
