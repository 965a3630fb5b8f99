"""The demo dataset (data_pipeline/demo.py): a real JPEG tree in ImageNet's layout, deterministic, with
ImageNet's file oddities, and learnable from shape and colour together but not from colour alone."""

from __future__ import annotations

import json
import re
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.io import ImageReadMode, decode_image, read_file

from data_pipeline.demo import (
    MAX_CLASSES,
    DemoTreeError,
    check_params,
    class_specs,
    make_demo_dataset,
)
from tests.conftest import run_cli

DEFAULT = {
    "classes": 10,
    "train_per_class": 100,
    "val_per_class": 20,
    "seed": 0,
    "min_size": 64,
    "max_size": 160,
}
SMALL = {"classes": 3, "train_per_class": 12, "val_per_class": 4}  # 36 train (3 oddities), 12 val (1 oddity)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The default demo tree, as `make demo` generates it (default arguments; DEFAULT spells them out)."""
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "data")


def images(root: Path, split: str) -> list[Path]:
    return sorted((root / split).glob("*/*"))


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def run_demo_cli(*args: str) -> subprocess.CompletedProcess:
    return run_cli("-m", "data_pipeline", *args, timeout=120)


# ---------------------------------------------------------------------------------------------- layout


def test_layout_and_file_names(demo):
    root = demo.root
    assert sorted(p.name for p in root.iterdir()) == [
        "class_index.json",
        "demo_manifest.json",
        "train",
        "val",
    ]
    wnids = sorted(p.name for p in (root / "train").iterdir())
    assert wnids == sorted(p.name for p in (root / "val").iterdir())
    assert len(wnids) == 10
    assert all(re.fullmatch(r"n99\d{6}", w) for w in wnids)
    for w in wnids:
        train = sorted(p.name for p in (root / "train" / w).iterdir())
        assert train == sorted(f"{w}_{i}.JPEG" for i in range(1, 101))
        val = [p.name for p in (root / "val" / w).iterdir()]
        assert len(val) == 20 and all(re.fullmatch(r"ILSVRC2012_val_\d{8}\.JPEG", n) for n in val)
    # Like the official val names: numbered 1..N over the whole split, each number once, not grouped by class.
    numbers = {int(p.name[15:23]): p.parent.name for p in images(root, "val")}
    assert sorted(numbers) == list(range(1, 201))
    assert len({numbers[i] for i in range(1, 21)}) > 2  # the first 20 numbers are not one class
    assert demo.counts == {"train": 1000, "val": 200}
    assert len(images(root, "train")) == 1000 and len(images(root, "val")) == 200


def test_class_index_matches_imagefolder(demo):
    text = demo.class_index.read_text()
    index = json.loads(text)
    assert list(index) == [str(i) for i in range(10)]
    assert all(
        isinstance(v, list) and len(v) == 2 and all(isinstance(x, str) for x in v) for v in index.values()
    )
    assert index["0"] == ["n99000000", "red_circle"]
    assert len({name for _, name in index.values()}) == 10
    expected = {wnid: int(k) for k, (wnid, _) in index.items()}
    for split in ("train", "val"):
        folder = ImageFolder(str(demo.root / split))
        assert folder.class_to_idx == expected
        assert len(folder) == demo.counts[split]


def test_manifest_records_parameters_counts_and_oddities(demo):
    manifest = json.loads(demo.manifest.read_text())
    assert manifest["params"] == DEFAULT
    assert manifest["counts"] == demo.counts
    listed = [(o["split"], o["kind"], demo.root / o["path"]) for o in manifest["oddities"]]
    assert listed == [(o.split, o.kind, o.path) for o in demo.oddities]


def test_supports_100_classes(tmp_path):
    specs = class_specs(MAX_CLASSES)
    assert len({(s.shape, s.colour) for s in specs}) == MAX_CLASSES
    assert len({s.name for s in specs}) == MAX_CLASSES
    # Neither colour nor shape alone identifies a class among the first ten.
    first = specs[:10]
    assert Counter(s.colour for s in first).most_common(1)[0][1] == 5
    assert Counter(s.shape for s in first).most_common(1)[0][1] == 2
    summary = make_demo_dataset(tmp_path / "d", classes=MAX_CLASSES, train_per_class=1, val_per_class=1)
    index = json.loads(summary.class_index.read_text())
    assert ImageFolder(str(tmp_path / "d" / "val")).class_to_idx == {w: int(k) for k, (w, _) in index.items()}
    with pytest.raises(ValueError, match="between 2 and 100"):
        check_params(MAX_CLASSES + 1, 1, 1, 0, 64, 160)


# ---------------------------------------------------------------------------------------------- files


def test_sizes_aspect_ratios_and_quality_vary(demo):
    sizes, qtables = [], set()
    for p in images(demo.root, "train"):
        with Image.open(p) as im:
            sizes.append(im.size)
            if im.format == "JPEG" and im.mode == "RGB":
                qtables.add(tuple(im.quantization[0]))
    w, h = np.array(sizes).T
    assert np.minimum(w, h).min() >= 64 and np.maximum(w, h).max() <= 160
    aspect = w / h
    assert len(set(sizes)) > 300
    assert (aspect >= 2).sum() >= 10 and (aspect <= 0.5).sum() >= 10  # a few quite wide and quite tall
    assert 0.4 < (aspect > 1.1).mean() < 0.8  # mostly landscape, like ImageNet
    assert np.ptp(np.minimum(w, h)) > 50
    assert len(qtables) >= 10  # JPEG quality 75..95 gives one luma table per quality setting


def test_oddities_are_what_they_claim(demo):
    kinds = {(o.split, o.kind) for o in demo.oddities}
    assert kinds == {(s, k) for s in ("train", "val") for k in ("grayscale", "cmyk", "png")}
    expected = {"grayscale": ("JPEG", "L"), "cmyk": ("JPEG", "CMYK"), "png": ("PNG", "RGB")}
    odd = {o.path: o.kind for o in demo.oddities}
    for split in ("train", "val"):
        for p in images(demo.root, split):
            assert p.suffix == ".JPEG"
            with Image.open(p) as im:
                assert (im.format, im.mode) == expected.get(odd.get(p), ("JPEG", "RGB")), p


# torchvision 0.29 deprecates its image decoders in favour of TorchCodec; they still work and are what we test.
@pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")
def test_every_file_decodes_with_pil_and_torchvision(demo):
    for split in ("train", "val"):
        for p in images(demo.root, split):
            with Image.open(p) as im:
                ref = np.asarray(im.convert("RGB"), dtype=np.int16)
            # Compare in numpy: tiny torch ops are slow when other processes compete for the 2 cores.
            t = decode_image(read_file(str(p)), mode=ImageReadMode.RGB).permute(1, 2, 0).numpy()
            assert t.shape == ref.shape, p
            # Both use libjpeg-turbo; a CMYK file decoded without honouring the Adobe marker would be inverted.
            assert np.abs(t.astype(np.int16) - ref).mean() < 1.0, p


# ---------------------------------------------------------------------------------------------- determinism


def test_same_arguments_give_byte_identical_trees(tmp_path):
    a = make_demo_dataset(tmp_path / "a", **SMALL, seed=7)
    b = make_demo_dataset(tmp_path / "b", **SMALL, seed=7)
    assert a.created and b.created
    files_a = tree_bytes(tmp_path / "a")
    assert len(files_a) == 36 + 12 + 2
    assert files_a == tree_bytes(tmp_path / "b")
    make_demo_dataset(tmp_path / "c", **SMALL, seed=8)
    files_c = tree_bytes(tmp_path / "c")
    images_a = {k: v for k, v in files_a.items() if k.endswith(".JPEG")}
    differ = sum(files_c.get(k) != v for k, v in images_a.items())
    assert differ == len(images_a)


def test_image_bytes_do_not_depend_on_what_else_is_generated(tmp_path):
    # Fewer than 10 images per split: no oddities, so every shared train file must be identical.
    make_demo_dataset(tmp_path / "a", classes=2, train_per_class=4, val_per_class=1)
    make_demo_dataset(tmp_path / "b", classes=3, train_per_class=3, val_per_class=1)
    a, b = tree_bytes(tmp_path / "a"), tree_bytes(tmp_path / "b")
    shared = [k for k in a if k.startswith("train/") and k in b]
    assert len(shared) == 2 * 3
    assert all(a[k] == b[k] for k in shared)


# ---------------------------------------------------------------------------------------------- reruns


def test_rerun_with_same_arguments_is_a_no_op(demo):
    before = {p: p.stat().st_mtime_ns for p in demo.root.rglob("*")}
    again = make_demo_dataset(demo.root, **DEFAULT)
    assert not again.created
    assert again.counts == demo.counts and again.oddities == demo.oddities
    assert {p: p.stat().st_mtime_ns for p in demo.root.rglob("*")} == before


def test_other_parameters_are_refused(tmp_path):
    make_demo_dataset(tmp_path / "d", **SMALL)
    before = tree_bytes(tmp_path / "d")
    with pytest.raises(DemoTreeError, match=r"seed=0 \(asked for 1\)"):
        make_demo_dataset(tmp_path / "d", **SMALL, seed=1)
    with pytest.raises(DemoTreeError, match=r"train_per_class=12 \(asked for 13\)"):
        make_demo_dataset(tmp_path / "d", **{**SMALL, "train_per_class": 13})
    assert tree_bytes(tmp_path / "d") == before


def test_refuses_non_empty_directory_that_is_not_a_demo_tree(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("mine")
    with pytest.raises(DemoTreeError, match="not empty"):
        make_demo_dataset(tmp_path / "d", **SMALL)
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["notes.txt"]


def test_incomplete_tree_is_refused_and_interrupted_run_is_redone(tmp_path):
    make_demo_dataset(tmp_path / "d", **SMALL)
    reference = tree_bytes(tmp_path / "d")
    victim = next((tmp_path / "d" / "train").glob("*/*.JPEG"))
    victim.unlink()
    with pytest.raises(DemoTreeError, match="incomplete"):
        make_demo_dataset(tmp_path / "d", **SMALL)
    # An interrupted run leaves the partial manifest (written before any image) and no final manifest.
    (tmp_path / "d" / "demo_manifest.json").rename(tmp_path / "d" / "demo_manifest.partial.json")
    assert make_demo_dataset(tmp_path / "d", **SMALL).created
    assert tree_bytes(tmp_path / "d") == reference


def test_truncated_or_extra_files_are_refused(tmp_path):
    root = make_demo_dataset(tmp_path / "d", **SMALL).root
    victim = sorted((root / "val").glob("*/*.JPEG"))[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        DemoTreeError, match=r"/val is not what the demo generator wrote .* truncated or replaced"
    ):
        make_demo_dataset(root, **SMALL)
    victim.write_bytes(data)
    assert not make_demo_dataset(root, **SMALL).created  # restored: nothing to do
    (victim.parent / "stray.JPEG").write_bytes(data)
    with pytest.raises(
        DemoTreeError, match=r"holds 1 file\(s\) the demo generator did not write \(first: val/"
    ):
        make_demo_dataset(root, **SMALL)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"classes": 1}, "--classes must be between 2 and 100"),
        ({"train_per_class": 0}, "--train-per-class must be at least 1"),
        ({"val_per_class": 0}, "--val-per-class must be at least 1"),
        ({"seed": -1}, "--seed must be in"),
        ({"min_size": 8}, "--min-size must be at least 16"),
        ({"min_size": 100, "max_size": 90}, r"--max-size \(90\) must be >= --min-size \(100\)"),
        ({"max_size": 2000}, "--max-size must be at most 1024"),
        ({"classes": 10.0}, "--classes must be an integer"),
        ({"train_per_class": True}, "--train-per-class must be an integer"),
    ],
)
def test_bad_parameters(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_demo_dataset(tmp_path / "d", **{**SMALL, **kwargs})
    assert not (tmp_path / "d").exists()


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_writes_then_does_nothing_then_refuses_other_parameters(tmp_path):
    out = tmp_path / "demo"
    args = ["demo", str(out), "--classes", "3", "--train-per-class", "12", "--val-per-class", "4"]
    first = run_demo_cli(*args)
    assert first.returncode == 0, first.stderr
    assert "wrote 36 train, 12 val images of 3 classes" in first.stdout
    assert re.search(r"in \d+\.\d s", first.stdout)
    assert "oddities:" in first.stdout and "png" in first.stdout
    assert tree_bytes(out) == tree_bytes(make_demo_dataset(tmp_path / "lib", **SMALL).root)
    second = run_demo_cli(*args)
    assert second.returncode == 0 and "nothing to do" in second.stdout
    third = run_demo_cli(*args, "--seed", "5")
    assert third.returncode == 1
    assert third.stderr.startswith("error: ") and "seed=0 (asked for 5)" in third.stderr


@pytest.mark.parametrize(
    "bad",
    [
        ["--classes", "1"],
        ["--classes", str(MAX_CLASSES + 1)],
        ["--train-per-class", "0"],
        ["--val-per-class", "0"],
    ],
)
def test_cli_bad_arguments_exit_2_with_one_error_line(tmp_path, bad):
    result = run_demo_cli("demo", str(tmp_path / "demo"), *bad)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --"), result.stderr
    assert not (tmp_path / "demo").exists()


# ---------------------------------------------------------------------------------------------- learnability


def _load(root: Path, split: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    index = {wnid: int(k) for k, (wnid, _) in json.loads((root / "class_index.json").read_text()).items()}
    xs, ys = [], []
    for p in images(root, split):
        with Image.open(p) as im:
            small = im.convert("RGB").resize((size, size), Image.Resampling.BOX)
        xs.append(np.asarray(small, dtype=np.float64) / 255)
        ys.append(index[p.parent.name])
    return np.stack(xs), np.array(ys)


def _saturation(x: np.ndarray) -> np.ndarray:
    return (x.max(-1) - x.min(-1)) / (x.max(-1) + 1e-3)


def _hue_histogram(x: np.ndarray, bins: int = 8) -> np.ndarray:
    """Saturation-weighted hue histogram: what colour an image has, and how much of it."""
    r, g, b = np.moveaxis(x, -1, 0)
    hue = np.arctan2(np.sqrt(3) * (g - b), 2 * r - g - b)
    k = np.clip(((hue + np.pi) / (2 * np.pi) * bins).astype(int), 0, bins - 1)
    s = _saturation(x)
    return np.stack([((k == i) * s).mean((1, 2)) for i in range(bins)], axis=1)


def _shape_features(x: np.ndarray) -> np.ndarray:
    """Translation/rotation/scale-invariant descriptors of the saturated (object) pixels: 4 Hu moments,
    boundary length / sqrt(area), and the fill fraction in 8 rings around the centroid."""
    m = (_saturation(x) > 0.45).astype(np.float64)
    h, w = m.shape[1:]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    area = m.sum((1, 2)) + 1e-6
    dx = xx - ((m * xx).sum((1, 2)) / area)[:, None, None]
    dy = yy - ((m * yy).sum((1, 2)) / area)[:, None, None]

    def eta(p: int, q: int) -> np.ndarray:
        return (m * dx**p * dy**q).sum((1, 2)) / area ** (1 + (p + q) / 2)

    n20, n02, n11, n30, n03, n21, n12 = (
        eta(2, 0),
        eta(0, 2),
        eta(1, 1),
        eta(3, 0),
        eta(0, 3),
        eta(2, 1),
        eta(1, 2),
    )
    hu = [
        n20 + n02,
        (n20 - n02) ** 2 + 4 * n11**2,
        (n30 - 3 * n12) ** 2 + (3 * n21 - n03) ** 2,
        (n30 + n12) ** 2 + (n21 + n03) ** 2,
    ]
    boundary = np.abs(np.diff(m, axis=1)).sum((1, 2)) + np.abs(np.diff(m, axis=2)).sum((1, 2))
    radius = (
        np.sqrt(dx**2 + dy**2) / np.sqrt(area * hu[0] + 1e-6)[:, None, None]
    )  # in units of the rms radius
    rings = []
    for lo in np.arange(0, 2, 0.25):
        ring = (radius >= lo) & (radius < lo + 0.25)
        rings.append((m * ring).sum((1, 2)) / (ring.sum((1, 2)) + 1e-6))
    return np.column_stack([np.log(np.array(hu).T + 1e-12), boundary / np.sqrt(area), *rings])


def _softmax_regression_accuracy(train, y_train, val, y_val, steps=600, lr=0.5, wd=1e-3) -> float:
    mu, sd = train.mean(0), train.std(0) + 1e-6
    train, val = (train - mu) / sd, (val - mu) / sd
    classes = y_train.max() + 1
    w, b = np.zeros((train.shape[1], classes)), np.zeros(classes)
    onehot = np.eye(classes)[y_train]
    for _ in range(steps):  # full-batch gradient descent on the convex cross-entropy
        z = train @ w + b
        p = np.exp(z - z.max(1, keepdims=True))
        g = (p / p.sum(1, keepdims=True) - onehot) / len(train)
        w -= lr * (train.T @ g + wd * w)
        b -= lr * g.sum(0)
    return float(((val @ w + b).argmax(1) == y_val).mean())


def test_learnable_from_shape_and_colour_together_not_from_either_alone(demo):
    """Softmax regression (numpy) on 32x32 thumbnails, val accuracy, chance 0.1. Measured on the default tree,
    seed 0 [seeds 0-4]: mean RGB 0.245 [0.205-0.270] and hue histogram 0.205 [0.185-0.265] stay near 0.2,
    the ceiling for colour alone (it tells apart 2 groups of 5 classes; object area leaks a little);
    shape descriptors 0.420 [0.380-0.470] stay below 0.5, the ceiling for shape alone (5 groups of 2);
    both together reach 0.765 [0.725-0.820]. The bounds leave ~2-3 sd of room (1 sd ~ 0.03 on 200 images)."""
    x_train, y_train = _load(demo.root, "train", 32)
    x_val, y_val = _load(demo.root, "val", 32)
    hue_train, hue_val = _hue_histogram(x_train), _hue_histogram(x_val)
    shape_train, shape_val = _shape_features(x_train), _shape_features(x_val)
    acc = {
        "mean RGB": _softmax_regression_accuracy(x_train.mean((1, 2)), y_train, x_val.mean((1, 2)), y_val),
        "hue histogram": _softmax_regression_accuracy(hue_train, y_train, hue_val, y_val),
        "shape": _softmax_regression_accuracy(shape_train, y_train, shape_val, y_val),
        "shape + hue": _softmax_regression_accuracy(
            np.hstack([hue_train, shape_train]), y_train, np.hstack([hue_val, shape_val]), y_val
        ),
    }
    print("val accuracy:", ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    assert acc["mean RGB"] < 0.35 and acc["hue histogram"] < 0.35
    assert 0.25 < acc["shape"] < 0.56
    assert acc["shape + hue"] > 0.6
