"""shared.data: builtin datasets, the procedural shapes set, archive inspection/extraction, ImageFolder."""

from __future__ import annotations

import gzip
import io
import os
import stat
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shared.data import (
    ArchiveError,
    DatasetError,
    builtin_info,
    extract_archive,
    inspect_archive,
    load_dataset,
)
from shared.data import shapes as shapes_mod
from shared.data.layout import plan_layout, safe_relpath

# --- shapes ----------------------------------------------------------------------------------------


def test_shapes_is_deterministic_and_seed_dependent() -> None:
    a_x, a_y = shapes_mod.generate(300, seed=7)
    b_x, b_y = shapes_mod.generate(300, seed=7)
    c_x, _ = shapes_mod.generate(300, seed=8)
    np.testing.assert_array_equal(a_x, b_x)
    np.testing.assert_array_equal(a_y, b_y)
    assert not np.array_equal(a_x, c_x)


def test_shapes_shapes_dtypes_and_balance() -> None:
    ds = load_dataset({"uri": "builtin://shapes"}, image_size=32)
    assert ds.train_images.shape == (5000, 32, 32, 3) and ds.train_images.dtype == np.uint8
    assert ds.test_images.shape == (1000, 32, 32, 3)
    assert ds.train_labels.dtype == np.int64 and ds.test_labels.dtype == np.int64
    assert ds.classes == shapes_mod.CLASS_NAMES and len(ds.classes) == 10
    assert np.bincount(ds.train_labels).tolist() == [500] * 10
    assert np.bincount(ds.test_labels).tolist() == [100] * 10
    # The first N images are class-mixed (limit_train keeps a usable subset).
    assert len(np.unique(ds.train_labels[:50])) == 10
    # Cached in-process and identical on reload; train and test differ.
    again = load_dataset({"uri": "builtin://shapes"}, image_size=32)
    np.testing.assert_array_equal(ds.train_images, again.train_images)
    assert not np.array_equal(ds.train_images[:1000], ds.test_images)


def test_shapes_colour_is_not_the_class_cue_but_shape_is_learnable() -> None:
    from sklearn.linear_model import LogisticRegression

    ds = load_dataset({"uri": "builtin://shapes"}, image_size=32)
    mean_rgb = ds.train_images.reshape(len(ds.train_images), -1, 3).mean(axis=1)
    test_rgb = ds.test_images.reshape(len(ds.test_images), -1, 3).mean(axis=1)
    colour_acc = LogisticRegression(max_iter=500).fit(mean_rgb, ds.train_labels).score(test_rgb, ds.test_labels)
    assert colour_acc < 0.2, f"mean colour predicts the class ({colour_acc:.2f}); colours must be class-free"
    # Raw-pixel 1-NN: well above chance (10%) but far from solved.
    xtr = ds.train_images[:2000].reshape(2000, -1).astype(np.float32)
    xte = ds.test_images[:500].reshape(500, -1).astype(np.float32)
    d = (xte**2).sum(1)[:, None] - 2 * xte @ xtr.T + (xtr**2).sum(1)[None, :]
    acc = float((ds.train_labels[:2000][d.argmin(1)] == ds.test_labels[:500]).mean())
    assert 0.13 < acc < 0.6, acc


def test_shapes_colours_are_one_random_tint_per_image() -> None:
    """Shape and background are the light and dark tone of ONE hue, so a hue rotation (colour jitter with
    hue 0.5) can map any image's colours onto any other's; hues cover the whole wheel, polarity is random."""
    import colorsys

    fg, bg = shapes_mod._colours(np.random.default_rng(0), 2000)
    assert fg.shape == bg.shape == (2000, 3) and fg.dtype == np.float32
    hsv_fg = np.array([colorsys.rgb_to_hsv(*c) for c in fg / 255.0])
    hsv_bg = np.array([colorsys.rgb_to_hsv(*c) for c in bg / 255.0])
    hue_gap = np.abs(hsv_fg[:, 0] - hsv_bg[:, 0])
    assert np.minimum(hue_gap, 1 - hue_gap).max() < 1e-3
    assert np.histogram(hsv_fg[:, 0], bins=6, range=(0, 1))[0].min() > 250  # the whole colour wheel
    light_shape = hsv_fg[:, 2] > hsv_bg[:, 2]
    assert 0.45 < light_shape.mean() < 0.55
    assert (np.abs(hsv_fg[:, 2] - hsv_bg[:, 2]) >= 0.3 - 1e-6).all()  # light vs dark: the shape stays visible


def test_shapes_resizes_to_other_sizes() -> None:
    ds = load_dataset({"uri": "builtin://shapes"}, image_size=48, limit_train=20, limit_test=10)
    assert ds.train_images.shape == (20, 48, 48, 3) and ds.test_images.shape == (10, 48, 48, 3)


# --- mnist / digits / info -------------------------------------------------------------------------


def test_mnist_full_sizes_and_grey_to_rgb() -> None:
    ds = load_dataset({"uri": "builtin://mnist"}, image_size=28)  # native size: no resize cost
    assert ds.train_images.shape == (60000, 28, 28, 3) and ds.test_images.shape == (10000, 28, 28, 3)
    assert int((ds.train_labels == 0).sum()) == 5923  # canonical MNIST count
    np.testing.assert_array_equal(ds.train_images[..., 0], ds.train_images[..., 2])
    small = load_dataset({"uri": "builtin://mnist"}, image_size=32, limit_train=64, limit_test=16)
    assert small.train_images.shape == (64, 32, 32, 3) and small.test_labels.shape == (16,)


def test_digits_split_is_stratified_and_fixed() -> None:
    ds = load_dataset({"uri": "builtin://digits"}, image_size=32)
    assert len(ds.train_images) == 1437 and len(ds.test_images) == 360
    assert ds.train_images.shape[1:] == (32, 32, 3)
    counts = np.bincount(ds.test_labels)
    assert len(counts) == 10 and counts.min() >= 35
    again = load_dataset({"uri": "builtin://digits"}, image_size=32)
    np.testing.assert_array_equal(ds.test_labels, again.test_labels)


def test_builtin_info_is_cheap_and_validates() -> None:
    assert builtin_info("shapes") == {"train": 5000, "test": 1000, "num_classes": 10}
    assert builtin_info("builtin://mnist")["train"] == 60000
    assert builtin_info("digits") == {"train": 1437, "test": 360, "num_classes": 10}
    with pytest.raises(DatasetError, match="unknown builtin"):
        builtin_info("cifar10")
    with pytest.raises(DatasetError, match="neither"):
        load_dataset({"uri": "dataset://123"}, image_size=32)


# --- archives --------------------------------------------------------------------------------------


def _png(colour: tuple[int, int, int], size: tuple[int, int] = (12, 9)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


RED, BLUE = (220, 20, 20), (20, 20, 220)


def _tree(test_split: str | None = "test", prefix: str = "", n_train: int = 5, n_test: int = 2) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for cls, colour in (("cat", RED), ("dog", BLUE)):
        for i in range(n_train):
            path = f"train/{cls}/{i}.png" if test_split else f"{cls}/{i}.png"
            files[prefix + path] = _png(colour)
        for i in range(n_test if test_split else 0):
            files[f"{prefix}{test_split}/{cls}/{i}.png"] = _png(colour)
    return files


def _zip(path: Path, files: dict[str, bytes], *, symlink: str | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
    return path


def _tar(path: Path, files: dict[str, bytes], *, mode: str = "w", extra: list[tarfile.TarInfo] = ()) -> Path:
    with tarfile.open(path, mode) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for info in extra:
            tf.addfile(info)
    return path


def test_zip_with_splits_and_junk_is_accepted(tmp_path: Path) -> None:
    files = _tree() | {"__MACOSX/train/cat/._0.png": b"junk", "train/.DS_Store": b"x", "README.md": b"hi"}
    report = inspect_archive(_zip(tmp_path / "d.zip", files))
    assert report.format == "zip" and report.classes == ["cat", "dog"]
    assert report.splits == {"train": 10, "test": 4} and report.has_test_split
    assert report.class_counts["train"] == {"cat": 5, "dog": 5}
    assert (report.num_train, report.num_test, report.num_images) == (10, 4, 14)
    assert "README.md" in report.ignored and report.num_ignored == 3


def test_tgz_with_wrapper_dir_and_no_test_split(tmp_path: Path) -> None:
    report = inspect_archive(_tar(tmp_path / "d.tgz", _tree(None, prefix="mydata/"), mode="w:gz"))
    assert report.format == "tar.gz" and report.classes == ["cat", "dog"]
    assert report.splits == {"train": 10} and not report.has_test_split
    assert (report.num_train, report.num_test) == (8, 2)  # ~20% of every class held out


def test_plain_tar_with_val_split(tmp_path: Path) -> None:
    report = inspect_archive(_tar(tmp_path / "d.tar", _tree("val", prefix="./")))
    assert report.format == "tar" and report.splits == {"train": 10, "test": 4}


def _raw(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _device(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.CHRTYPE
    return info


def _link(name: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, "/etc/passwd"
    return info


@pytest.mark.parametrize(
    ("build", "limits", "reason"),
    [
        (lambda p: _tar(p, _tree() | {"../evil.png": _png(RED)}), {}, "'..'"),
        (lambda p: _tar(p, _tree() | {"train/cat/../../../evil.png": _png(RED)}), {}, "'..'"),
        (lambda p: _tar(p, _tree() | {"/etc/evil.png": _png(RED)}), {}, "absolute"),
        (lambda p: _zip(p, _tree() | {"C:\\evil.png": _png(RED)}), {}, "absolute"),
        (lambda p: _zip(p, _tree() | {"..\\evil.png": _png(RED)}), {}, "'..'"),
        (lambda p: _tar(p, _tree(), extra=[_link("train/cat/x.png", tarfile.SYMTYPE)]), {}, "symbolic link"),
        (lambda p: _tar(p, _tree(), extra=[_link("train/cat/x.png", tarfile.LNKTYPE)]), {}, "hard link"),
        (lambda p: _zip(p, _tree(), symlink="train/cat/x.png"), {}, "symbolic link"),
        (lambda p: _tar(p, _tree(), extra=[_device("train/cat/tty")]), {}, "device"),
        (lambda p: _zip(p, _tree() | {"train/cat/notes.txt": b"hello"}), {}, "not an image"),
        (lambda p: _zip(p, _tree() | {"train/cat/bad.png": b"\x89PNG\r\n\x1a\nnot really"}), {}, "not a readable"),
        (lambda p: _zip(p, _tree() | {"train/cat/fake.jpg": _png(RED)[:40]}), {}, "not a readable"),
        (lambda p: _zip(p, _tree()), {"max_files": 5}, "more than 5 entries"),
        (lambda p: _zip(p, _tree()), {"max_unpacked_bytes": 500}, "unpacks to more than"),
        (lambda p: _zip(p, {"a.png": _png(RED), "b.png": _png(BLUE)}), {}, "not inside a class folder"),
        (lambda p: _zip(p, {"train/x.png": _png(RED), "train/cat/1.png": _png(RED)}), {}, "not inside a class"),
        (lambda p: _zip(p, {"README.md": b"no images here"}), {}, "no class folders"),
        (lambda p: _zip(p, {"cat/1.png": _png(RED), "cat/2.png": _png(RED)}), {}, "single class"),
        (lambda p: _zip(p, _tree() | {"test/cow/1.png": _png(RED)}), {}, "no training images"),
        (lambda p: _raw(p, b"just some text, not an archive"), {}, "unsupported archive"),
        (lambda p: _raw(p, gzip.compress(b"a gzip file, but no tar inside")), {}, "does not contain a tar"),
    ],
)
def test_bad_archives_are_rejected_with_a_reason(tmp_path: Path, build, limits, reason: str) -> None:
    path = build(tmp_path / "upload.bin")
    with pytest.raises(ArchiveError) as exc_info:
        inspect_archive(path, **limits)
    assert reason in exc_info.value.reason


def test_safe_relpath_normalises() -> None:
    assert safe_relpath("./a//b/./c.png") == "a/b/c.png"
    assert safe_relpath("a\\b.png") == "a/b.png"
    assert safe_relpath("./") == ""


def test_broken_image_outside_the_dataset_is_ignored() -> None:
    layout = plan_layout([*_tree(), "extra/junk.png"])
    assert "extra/junk.png" in layout.ignored and len(layout.train) == 10


def test_extract_then_load_roundtrip(tmp_path: Path) -> None:
    files = _tree(prefix="wrap/") | {"wrap/__MACOSX/x": b"junk"}
    archive = _tar(tmp_path / "d.tar.gz", files, mode="w:gz")
    dest = tmp_path / "out"
    report = extract_archive(archive, dest)
    written = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert written == sorted(f"{s}/{c}/{i}.png" for s, n in (("train", 5), ("test", 2)) for c in ("cat", "dog")
                             for i in range(n))
    assert report.num_images == 14
    assert not any(p.is_symlink() for p in dest.rglob("*"))
    ds = load_dataset({"uri": "dataset://x", "path": str(dest)}, image_size=8)
    assert ds.classes == ["cat", "dog"] and ds.train_images.shape == (10, 8, 8, 3)
    red = ds.train_images[ds.train_labels == 0].reshape(-1, 3).mean(0)
    assert red[0] > 150 and red[2] < 80  # "cat" images are red: labels follow sorted class folders
    with pytest.raises(ArchiveError, match="not empty"):
        extract_archive(archive, dest)


def test_only_the_documented_formats_are_accepted(tmp_path: Path) -> None:
    import bz2
    import lzma

    tar = _tar(tmp_path / "d.tar", _tree()).read_bytes()
    for compress, what in ((bz2.compress, "bzip2"), (lzma.compress, "xz")):
        path = _raw(tmp_path / "d.tar", compress(tar))  # named .tar, sniffed by content
        with pytest.raises(ArchiveError, match=f"{what}-compressed files are not supported"):
            inspect_archive(path)
    assert inspect_archive(_raw(tmp_path / "d.bin", gzip.compress(tar))).format == "tar.gz"


def test_compression_ratio_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from shared.data import archives

    bomb = _tar(tmp_path / "b.tgz", _tree() | {"README": b"\0" * 2_000_000}, mode="w:gz")
    assert bomb.stat().st_size < 20_000
    inspect_archive(bomb)  # below the 64 MiB floor the ratio is not checked
    monkeypatch.setattr(archives, "RATIO_FLOOR_BYTES", 0)
    with pytest.raises(ArchiveError, match="compression bomb"):
        inspect_archive(bomb)
    assert inspect_archive(bomb, max_ratio=1e6).num_images == 14


def test_inspection_stops_at_the_first_bad_member(tmp_path: Path) -> None:
    noise = np.random.default_rng(0).bytes(300_000)  # incompressible: the corruption lands far from the start
    files = {"train/cat/broken.png": b"\x89PNG\r\n\x1a\nbroken", **_tree(), "README": noise}
    raw = bytearray(_tar(tmp_path / "d.tgz", files, mode="w:gz").read_bytes())
    raw[-200:-100] = b"\xff" * 100  # the stream is corrupt near its end, long after the broken image
    path = _raw(tmp_path / "d2.tgz", bytes(raw))
    with pytest.raises(ArchiveError, match="train/cat/broken.png"):
        inspect_archive(path)
    # a huge member behind the broken one is never read (the declared size is checked first, and nothing after
    # the first bad image is decompressed)
    with pytest.raises(ArchiveError, match="not a readable image"):
        inspect_archive(_zip(tmp_path / "z.zip", {"train/cat/broken.png": b"\x89PNG broken", **_tree(),
                                                  "zzz.bin": b"\0" * 5_000_000}), max_unpacked_bytes=10**9)


def test_corrupt_compressed_data_is_an_archive_error(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in _tree().items():
            zf.writestr(name, data + b"\0" * 1000)
    raw = bytearray(buf.getvalue())
    at = raw.index(b"train/cat/0.png") + len("train/cat/0.png")
    raw[at + 8:at + 48] = b"\xff" * 40
    with pytest.raises(ArchiveError, match="corrupt"):
        inspect_archive(_raw(tmp_path / "c.zip", bytes(raw)))
    tgz = bytearray(_tar(tmp_path / "t.tgz", _tree(n_train=30), mode="w:gz").read_bytes())
    tgz[len(tgz) // 2:len(tgz) // 2 + 64] = b"\0" * 64
    with pytest.raises(ArchiveError, match="corrupt"):
        inspect_archive(_raw(tmp_path / "t2.tgz", bytes(tgz)))
    with pytest.raises(ArchiveError):
        inspect_archive(_raw(tmp_path / "g.tgz", gzip.compress(b"not a tar" * 100)))


# --- ImageFolder directories -----------------------------------------------------------------------


def _write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def test_image_folder_with_test_split(tmp_path: Path) -> None:
    root = _write_tree(tmp_path / "d", _tree("test") | {".complete": b""})
    ds = load_dataset({"path": str(root)}, image_size=16)
    assert ds.train_images.shape == (10, 16, 16, 3) and ds.test_images.shape == (4, 16, 16, 3)
    assert np.bincount(ds.test_labels).tolist() == [2, 2]
    blue = ds.test_images[ds.test_labels == 1].reshape(-1, 3).mean(0)
    assert blue[2] > 150 and blue[0] < 80
    assert ds.name == "d"


def test_image_folder_without_test_split_holds_out_20_percent(tmp_path: Path) -> None:
    root = _write_tree(tmp_path / "d", _tree(None, n_train=10))
    if hasattr(os, "symlink"):  # links are skipped, never followed
        os.symlink("/etc/passwd", root / "cat" / "link.png")
    a = load_dataset({"path": str(root)}, image_size=8)
    b = load_dataset({"path": str(root)}, image_size=8)
    assert len(a.train_images) == 16 and np.bincount(a.test_labels).tolist() == [2, 2]
    np.testing.assert_array_equal(a.train_labels, b.train_labels)
    limited = load_dataset({"path": str(root)}, image_size=8, limit_train=6, limit_test=1)
    assert len(limited.train_images) == 6 and len(limited.test_images) == 1
    np.testing.assert_array_equal(limited.train_labels, a.train_labels[:6])


def test_image_folder_errors_are_dataset_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset({"path": str(tmp_path / "missing")}, image_size=8)
    root = _write_tree(tmp_path / "bad", _tree("test") | {"train/cat/broken.png": b"nope"})
    with pytest.raises(DatasetError, match="broken.png"):
        load_dataset({"path": str(root)}, image_size=8)
