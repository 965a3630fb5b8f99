"""ImageNet preparation (`python -m data_pipeline prepare-val`) and the dataset check (`... check`), on the demo
JPEG tree flattened into an official-style val folder, with a fake devkit written in the real formats: meta.mat
(struct array `synsets` with the devkit's fields, leaf IDs not in wnid order, ancestors with IDs > 1000), the
ground-truth txt, and Kaggle's LOC_val_solution.csv."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.__main__ import main as data_pipeline_main
from data_pipeline.check import IMG_EXTENSIONS, check_root
from data_pipeline.demo import make_demo_dataset
from data_pipeline.prepare import PrepareError, Progress, UsageError, prepare_val, read_labels, read_meta
from tests.conftest import run_cli


def savemat(*args, **kwargs):
    """scipy.io.savemat, imported when a test writes a .mat: the module collects without scipy (the GPU kit)."""
    from scipy.io import savemat

    return savemat(*args, **kwargs)


def loadmat(*args, **kwargs):
    """scipy.io.loadmat, imported when a test reads a .mat."""
    from scipy.io import loadmat

    return loadmat(*args, **kwargs)


# The devkit's meta.mat: synsets is a 1860 x 1 struct array with these fields, in this order.
SYNSET_FIELDS = (
    "ILSVRC2012_ID",
    "WNID",
    "words",
    "gloss",
    "num_children",
    "children",
    "wordnet_height",
    "num_train_images",
)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """4 classes, 48 train (1 CMYK, 2 greyscale, 1 PNG) and 20 val images (1 greyscale, 1 PNG)."""
    return make_demo_dataset(
        tmp_path_factory.mktemp("demo") / "data", classes=4, train_per_class=12, val_per_class=5
    )


@pytest.fixture(scope="module")
def truth(demo) -> dict[str, str]:
    """The demo's val ground truth: file name -> wnid."""
    return {p.name: p.parent.name for p in (demo.root / "val").glob("*/*.JPEG")}


@pytest.fixture(scope="module")
def devkit(demo, truth, tmp_path_factory) -> dict[str, Path]:
    """Fake devkit files in the real formats, plus the wnid -> ILSVRC2012_ID map they use."""
    d = tmp_path_factory.mktemp("devkit")
    wnids = sorted(set(truth.values()))
    ids = write_meta(d / "meta.mat", wnids)
    gt = d / "ILSVRC2012_validation_ground_truth.txt"
    gt.write_text(
        "".join(f"{ids[truth[f'ILSVRC2012_val_{n:08d}.JPEG']]}\n" for n in range(1, len(truth) + 1))
    )
    csv = d / "LOC_val_solution.csv"
    write_loc_csv(csv, truth)
    return {"meta": d / "meta.mat", "gt": gt, "csv": csv, "ids": ids}


def write_meta(path: Path, wnids: list[str], numbers: str = "compact") -> dict[str, int]:
    """Write a devkit-style meta.mat: one leaf synset per wnid with IDs 1..n in a shuffled order (the real IDs
    are not in wnid order either: ID 1 is n02119789), then three WordNet ancestors with IDs 1001.. as the real
    file has 860 of them. ``numbers``: "compact" stores integers as uint8/uint16, as MATLAB saved the real file
    (loadmat returns those types); "double" as MATLAB doubles."""
    rng = np.random.default_rng(7)
    leaf_ids = [int(i) + 1 for i in rng.permutation(len(wnids))]
    ids = dict(zip(wnids, leaf_ids, strict=True))

    def num(x: int):
        if numbers == "double":
            return np.float64(x)
        return np.uint8(x) if x < 256 else np.uint16(x)

    def arr(xs: list[int]):
        dtype = np.float64 if numbers == "double" else (np.uint16 if max(xs, default=0) >= 256 else np.uint8)
        return np.array([xs], dtype=dtype).reshape(1, -1)

    rows = [
        (num(i), w, f"demo class {w}", f"a made-up leaf synset {w}", num(0), arr([]), num(0), num(1300))
        for w, i in sorted(ids.items(), key=lambda kv: kv[1])
    ]
    half = len(leaf_ids) // 2
    ancestors = [
        (1001, "n00001740", "entity", [1002, 1003], 3),
        (1002, "n00002684", "object", sorted(leaf_ids[:half]), 1),
        (1003, "n00003553", "whole", sorted(leaf_ids[half:]), 1),
    ]
    rows += [
        (num(i), w, words, f"the {words} synset", num(len(ch)), arr(ch), num(h), num(0))
        for i, w, words, ch, h in ancestors
    ]
    synsets = np.empty((len(rows), 1), dtype=[(f, object) for f in SYNSET_FIELDS])
    for k, row in enumerate(rows):
        synsets[k, 0] = row
    savemat(path, {"synsets": synsets})
    return ids


def write_loc_csv(path: Path, truth: dict[str, str]) -> None:
    """Kaggle's LOC_val_solution.csv: rows in no particular order, 1-2 boxes each, trailing space."""
    rng = np.random.default_rng(3)
    rows = []
    for name in rng.permutation(sorted(truth)):
        wnid = truth[name]
        boxes = " ".join(
            f"{wnid} {' '.join(str(int(v)) for v in rng.integers(0, 300, 4))}"
            for _ in range(1 + len(rows) % 2)
        )
        rows.append(f"{Path(name).stem},{boxes} \n")
    path.write_text("ImageId,PredictionString\n" + "".join(rows))


def flat_val(demo, dest: Path) -> Path:
    """The demo's val images, flat, as ILSVRC2012_img_val.tar extracts them."""
    dest.mkdir(parents=True)
    for p in (demo.root / "val").glob("*/*.JPEG"):
        shutil.copy2(p, dest / p.name)
    return dest


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def prepare_cli(*args: str) -> subprocess.CompletedProcess:
    return run_cli("-m", "data_pipeline", "prepare-val", *map(str, args), timeout=120)


def check_cli(*args: str) -> subprocess.CompletedProcess:
    return run_cli("-m", "data_pipeline", "check", *map(str, args), timeout=120)


@pytest.fixture
def cli(capsys):
    """``python -m data_pipeline ARGS`` in this process (each subprocess pays seconds of imports): the same
    argument parsing, output and exit status; a few tests run the real subprocess."""

    def run(*args: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        try:
            status = data_pipeline_main(list(map(str, args)))
        except SystemExit as e:  # argparse errors
            status = e.code
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, status, out, err)

    return run


def lines(text: str, prefix: str = "") -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip() and ln.startswith(prefix)]


# ------------------------------------------------------------------------------------------- the devkit


def test_fake_meta_has_the_devkit_layout(devkit):
    synsets = loadmat(devkit["meta"], squeeze_me=True)["synsets"]
    assert synsets.dtype.names == SYNSET_FIELDS and synsets.shape == (7,)
    assert sorted(int(s["ILSVRC2012_ID"]) for s in synsets) == [1, 2, 3, 4, 1001, 1002, 1003]
    assert [devkit["ids"][w] for w in sorted(devkit["ids"])] != [1, 2, 3, 4]  # IDs not in wnid order


@pytest.mark.parametrize("numbers", ["compact", "double"])
def test_read_meta_keeps_leaf_synsets_by_id(tmp_path, numbers):
    wnids = [f"n0{k}000000" for k in range(1, 6)]
    ids = write_meta(tmp_path / "meta.mat", wnids, numbers=numbers)
    assert read_meta(tmp_path / "meta.mat") == {i: w for w, i in ids.items()}  # ancestors 1001.. left out
    assert list(ids.values()) != [1, 2, 3, 4, 5]  # IDs are not the sorted-wnid order: a mix-up would show


def test_both_label_forms_give_the_demo_ground_truth(devkit, truth):
    from_devkit = read_labels(devkit["gt"], devkit["meta"])
    from_csv = read_labels(devkit["csv"])
    assert from_devkit.form == "devkit" and from_csv.form == "loc_csv"
    assert from_devkit.labels == truth and from_csv.labels == truth
    assert read_labels(devkit["csv"], devkit["meta"]).labels == truth  # --meta also checks the CSV's wnids


# ---------------------------------------------------------------------------------------------- prepare


def test_devkit_form_restores_the_demo_layout_and_rerun_is_a_no_op(demo, devkit, tmp_path, cli):
    val = flat_val(demo, tmp_path / "val")
    out = prepare_cli(val, "--labels", devkit["gt"], "--meta", devkit["meta"])
    assert out.returncode == 0, out.stderr
    assert f"moved 20 images into 4 class folders of {val}" in out.stdout
    assert tree_bytes(val) == tree_bytes(demo.root / "val")  # same files, same classes, same bytes
    mtimes = {p: p.stat().st_mtime_ns for p in val.rglob("*")}

    again = cli("prepare-val", val, "--labels", devkit["gt"], "--meta", devkit["meta"])
    assert again.returncode == 0, again.stderr
    assert f"{val} is already prepared: 20 images in 4 class folders; nothing to do" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in val.rglob("*")} == mtimes


def test_loc_csv_form_restores_the_demo_layout(demo, devkit, tmp_path):
    val = flat_val(demo, tmp_path / "val")
    _, summary = prepare_val(val, devkit["csv"])
    assert (summary.form, summary.moved, summary.already) == ("loc_csv", 20, 0)
    assert tree_bytes(val) == tree_bytes(demo.root / "val")


def test_resumes_after_an_interrupted_run(demo, devkit, truth, tmp_path):
    val = flat_val(demo, tmp_path / "val")
    for name in sorted(truth)[::2]:  # the state a killed run leaves: some images moved, the rest still flat
        (val / truth[name]).mkdir(exist_ok=True)
        os.rename(val / name, val / truth[name] / name)
    _, summary = prepare_val(val, devkit["csv"])
    assert (summary.moved, summary.already) == (10, 10)
    assert tree_bytes(val) == tree_bytes(demo.root / "val")


def test_dry_run_prints_the_plan_and_changes_nothing(demo, devkit, tmp_path, cli):
    val = flat_val(demo, tmp_path / "val")
    before = tree_bytes(val)
    out = cli("prepare-val", val, "--labels", devkit["csv"], "--dry-run")
    assert out.returncode == 0, out.stderr
    planned = lines(out.stdout, "would move ")
    assert len(planned) == 20 and "would move ILSVRC2012_val_00000001.JPEG -> n99" in out.stdout
    assert "nothing was changed" in out.stdout
    assert tree_bytes(val) == before and not any(p.is_dir() for p in val.iterdir())


def test_link_keeps_the_flat_files_and_a_later_move_finishes(demo, devkit, tmp_path, cli):
    val = flat_val(demo, tmp_path / "val")
    flat = tree_bytes(val)
    out = cli("prepare-val", val, "--labels", devkit["gt"], "--meta", devkit["meta"], "--link")
    assert out.returncode == 0, out.stderr
    assert "hard-linked 20 images into 4 class folders" in out.stdout and "flat files are kept" in out.stdout
    for name, data in flat.items():
        linked = next(val.glob(f"*/{name}"))
        assert (val / name).read_bytes() == data and os.path.samefile(val / name, linked)
        assert linked.stat().st_nlink == 2 and not linked.is_symlink()
    assert prepare_val(val, devkit["csv"], link=True)[1].already == 20  # rerun with --link: nothing to do

    plan, summary = prepare_val(
        val, devkit["csv"]
    )  # now move: the flat names go, the class folders keep the data
    assert (summary.moved, len(plan.finish)) == (20, 20)
    assert tree_bytes(val) == tree_bytes(demo.root / "val")


def test_link_falls_back_to_symlinks_across_filesystems(demo, devkit, truth, tmp_path):
    if not Path("/dev/shm").is_dir() or os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the test's tmp_path to make hard links fail")
    val = flat_val(demo, tmp_path / "val")
    wnid = sorted(set(truth.values()))[0]
    with tempfile.TemporaryDirectory(dir="/dev/shm") as elsewhere:
        (val / wnid).symlink_to(elsewhere, target_is_directory=True)  # a class folder on another filesystem
        _, summary = prepare_val(val, devkit["csv"], link=True)
        assert summary.symlinked >= 1 and summary.linked + summary.symlinked == 20
        assert "EXDEV" in summary.symlink_reason
        for name, w in truth.items():
            assert (val / w / name).read_bytes() == (val / name).read_bytes()
        assert prepare_val(val, devkit["csv"], link=True)[1].already == 20


def test_image_in_the_wrong_class_folder_is_named(demo, devkit, truth, tmp_path, cli):
    val = flat_val(demo, tmp_path / "val")
    prepare_val(val, devkit["csv"])
    name = sorted(truth)[0]
    wrong = next(w for w in sorted(set(truth.values())) if w != truth[name])
    os.rename(val / truth[name] / name, val / wrong / name)
    out = cli("prepare-val", val, "--labels", devkit["csv"])
    assert out.returncode == 1
    assert lines(out.stderr) == [
        f"error: {val / wrong / name} is in the wrong class folder: LOC_val_solution.csv says {truth[name]}"
    ]


def _edit_gt(devkit, d: Path, change) -> list[str]:
    ids = devkit["gt"].read_text().split()
    path = d / "ILSVRC2012_validation_ground_truth.txt"
    path.write_text("".join(f"{i}\n" for i in change(ids)))
    return ["--labels", path, "--meta", devkit["meta"]]


def _edit_csv(devkit, d: Path, old: str, new: str) -> list[str]:
    text = devkit["csv"].read_text()
    path = d / "LOC_val_solution.csv"
    path.write_text(text.replace(old, new, 1))
    return ["--labels", path]


BAD_LABELS = {
    "one label fewer": (
        lambda dk, d: _edit_gt(dk, d, lambda ids: ids[:-1]),
        1,
        "1 image(s) in {val} have no label in {d}/ILSVRC2012_validation_ground_truth.txt (19 labels for 20 "
        "images): ILSVRC2012_val_00000020.JPEG",
    ),
    "one label more": (
        lambda dk, d: _edit_gt(dk, d, lambda ids: [*ids, ids[0]]),
        1,
        "1 labelled image(s) are not in {val}, neither flat nor in their class folder (21 labels for 20 images): "
        "ILSVRC2012_val_00000021.JPEG",
    ),
    "non-leaf ILSVRC2012_ID": (
        lambda dk, d: _edit_gt(dk, d, lambda ids: ["1002", *ids[1:]]),
        1,
        "line 1: ILSVRC2012_ID 1002 is not one of the 4 leaf synsets",
    ),
    "unknown wnid": (
        lambda dk, d: [*_edit_csv(dk, d, ",n99", ",n12345678 n99"), "--meta", dk["meta"]],
        1,
        "n12345678 is not one of the 4 leaf synsets of",
    ),
    "not a wnid": (lambda dk, d: _edit_csv(dk, d, ",n99", ",cat n99"), 1, "'cat' is not a WordNet ID"),
    "missing --meta": (
        lambda dk, d: ["--labels", dk["gt"]],
        2,
        "is a devkit ground-truth file (ILSVRC2012_IDs): give --meta",
    ),
    "meta file absent": (
        lambda dk, d: ["--labels", dk["gt"], "--meta", d / "nope.mat"],
        2,
        "--meta {d}/nope.mat does not exist",
    ),
    "meta not the devkit's": (
        lambda dk, d: (
            savemat(d / "other.mat", {"x": np.eye(2)}),
            ["--labels", dk["gt"], "--meta", d / "other.mat"],
        )[1],
        1,
        "is not the ILSVRC2012 devkit's meta.mat: it needs a struct array 'synsets'",
    ),
    "meta not a mat file": (
        lambda dk, d: ["--labels", dk["gt"], "--meta", dk["csv"]],
        1,
        "is not a MATLAB .mat file",
    ),
    "labels of another kind": (
        lambda dk, d: ((d / "labels.txt").write_text("hello\n"), ["--labels", d / "labels.txt"])[1],
        1,
        "is neither ILSVRC2012_validation_ground_truth.txt",
    ),
    "labels file absent": (
        lambda dk, d: ["--labels", d / "nope.csv"],
        2,
        "--labels {d}/nope.csv does not exist",
    ),
    "labels a folder": (
        lambda dk, d: ["--labels", d],
        2,
        "--labels {d} is a folder, not a file (ILSVRC2012_validation",
    ),
}


@pytest.mark.parametrize("case", BAD_LABELS, ids=str)
def test_bad_labels_give_one_error_line_and_change_nothing(demo, devkit, tmp_path, case, cli):
    make_args, status, message = BAD_LABELS[case]
    val = flat_val(demo, tmp_path / "val")
    d = tmp_path / "labels"
    d.mkdir()
    out = cli("prepare-val", val, *make_args(devkit, d))
    assert out.returncode == status, out.stderr
    assert out.stdout == ""
    [line] = lines(out.stderr)
    assert line.startswith("error: ") and message.format(val=val, d=d) in line, line
    assert not any(p.is_dir() for p in val.iterdir())


def test_progress_line_counts_rate_and_eta():
    stream = io.StringIO()
    progress = Progress("prepare-val", 50_000, stream=stream, interval=0.0)
    progress.update(12_500)
    progress.close()
    first, last = stream.getvalue().splitlines()
    assert re.fullmatch(r"prepare-val: 12,500/50,000 \(25%\), [\d,]+/s, ETA \d+ (s|min \d\d s)", first), first
    assert last.startswith("prepare-val: 12,500/50,000 (25%)")
    quiet = io.StringIO()
    Progress("check", 10, stream=quiet, interval=60.0).close()  # short jobs write nothing
    assert quiet.getvalue() == ""


def test_missing_val_dir_is_a_usage_error(devkit, tmp_path):
    with pytest.raises(UsageError, match="is not a directory"):
        prepare_val(tmp_path / "nope", devkit["csv"])
    out = prepare_cli(tmp_path / "nope", "--labels", devkit["csv"])
    assert out.returncode == 2 and lines(out.stderr) == [
        f"error: VAL_DIR {tmp_path / 'nope'} is not a directory"
    ]


def test_foreign_folder_and_file_twice_are_errors(demo, devkit, truth, tmp_path):
    val = flat_val(demo, tmp_path / "val")
    (val / "misc").mkdir()
    name = sorted(truth)[3]
    (val / truth[name]).mkdir()
    shutil.copy(val / sorted(truth)[4], val / truth[name] / name)  # same name, other bytes
    with pytest.raises(PrepareError) as e:
        prepare_val(val, devkit["csv"])
    assert e.value.problems == [
        f"{val / 'misc'}/ is not a class folder: no label names misc (move it out of {val})",
        f"{val / name} and {val / truth[name] / name} both exist and are different files",
    ]


# ------------------------------------------------------------------------------------------------ check


def test_extensions_are_torchvisions():
    from torchvision.datasets.folder import IMG_EXTENSIONS as TORCHVISION

    assert tuple(TORCHVISION) == IMG_EXTENSIONS


def test_check_passes_the_demo_tree_and_notes_its_oddities(demo):
    out = check_cli(demo.root, "--workers", "2")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "train: 48 images in 4 class folders\nval: 20 images in 4 class folders\n" in out.stdout
    assert (
        "size: not the full ILSVRC2012 set (1,000 classes, 1,281,167 train / 50,000 val images)" in out.stdout
    )
    assert "decoded 68 images with DALI's CPU decoder" in out.stdout
    kinds = {"grayscale": "a greyscale JPEG", "cmyk": "a CMYK JPEG", "png": "a PNG image named .JPEG"}
    expected = sorted(f"note: {o.path.relative_to(demo.root)}: {kinds[o.kind]}" for o in demo.oddities)
    assert sorted(ln.split(" (")[0] for ln in lines(out.stdout, "note: ")) == expected
    assert not lines(out.stdout, "problem:") and out.stdout.rstrip().endswith(f"OK: {demo.root} is sound")


def test_check_lists_every_problem_on_its_own_line(demo, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(demo.root, root)
    train0, train1 = sorted((root / "train" / "n99000000").iterdir())[:2]
    train0.write_bytes(train0.read_bytes()[: train0.stat().st_size // 2])  # truncated JPEG
    train1.write_bytes(b"")  # zero bytes
    text = sorted((root / "val" / "n99000002").iterdir())[0]
    text.write_text("<html>this download failed</html>\n")  # a text file named .JPEG
    broken = root / "val" / "n99000002" / "ILSVRC2012_val_99999999.JPEG"
    broken.symlink_to(root / "gone.JPEG")
    for split in ("train", "val"):
        (root / split / "n99000009").mkdir()  # an empty class folder in both splits
    shutil.move(root / "val" / "n99000003", tmp_path / "n99000003")  # a class missing from val/
    (root / "train" / ".ipynb_checkpoints").mkdir()
    (root / "train" / ".ipynb_checkpoints" / "x.JPEG").write_bytes(
        (root / "train" / "n99000001" / "n99000001_2.JPEG").read_bytes()
    )
    (root / "train" / "n99000001" / "README.txt").write_text("not an image")

    rel = lambda p: str(p.relative_to(root))  # noqa: E731
    expected = [
        "train/.ipynb_checkpoints/ is a hidden folder: the loaders would take it as a class",
        "train/n99000009/ has no images (ImageFolder refuses empty class folders)",
        "val/n99000009/ has no images (ImageFolder refuses empty class folders)",
        ".ipynb_checkpoints: class folder in train/ but not in val/",
        "n99000003: class folder in train/ but not in val/",
        f"{rel(train1)}: empty file (0 bytes)",
        f"{rel(text)}: not an image: no known image header (starts with b'<html>this d')",
        f"{rel(broken)}: cannot be read: broken symbolic link",
        f"{rel(train0)}: JPEG data that does not decode (truncated or corrupt): ",
    ]
    report = check_root(root, workers=2)
    assert not report.sound and report.decoded == (48 + 1 - 2) + (15 + 1 - 2)
    assert len(report.problems) == len(expected)
    for want in expected:
        assert any(p.startswith(want) for p in report.problems), (want, report.problems)
    assert "Premature end of JPEG" in next(p for p in report.problems if p.startswith(rel(train0)))
    assert {n.kind for n in report.notes} >= {"grayscale", "cmyk", "png", "skipped"}

    out = check_cli(root)
    assert out.returncode == 1
    assert sorted(lines(out.stdout, "problem: ")) == sorted(f"problem: {p}" for p in report.problems)
    assert f"FAILED: {len(expected)} problem(s) in {root}" in out.stdout
    assert "note: train/n99000001/README.txt: not an image file name: the loaders skip it" in out.stdout
    assert (
        "[ERROR]" not in out.stdout + out.stderr
    )  # the decoder's own log lines are captured, not interleaved


def test_check_missing_root_split_and_flat_val(demo, devkit, tmp_path, cli):
    out = cli("check", tmp_path / "nope")
    assert out.returncode == 1
    assert lines(out.stdout, "problem:") == [
        f"problem: data root {tmp_path / 'nope'} does not exist or is not a directory"
    ]

    root = tmp_path / "data"
    shutil.copytree(demo.root / "train", root / "train")
    report = check_root(root, workers=1)
    assert report.problems == [
        f"val/ is missing: {root / 'val'} must hold one folder per class (<wnid>/*.JPEG)"
    ]

    flat_val(demo, root / "val")  # extracted but not prepared
    report = check_root(root, workers=1)
    assert report.problems == [
        "val/ has no class folders (20 files directly in it): the images are flat; run python -m data_pipeline "
        "prepare-val first"
    ]
    prepare_val(root / "val", devkit["gt"], devkit["meta"], link=True)  # links: the flat files stay, as notes
    report = check_root(root, workers=1)
    assert report.sound and report.counts == {"train": 48, "val": 20}
    assert [n.path for n in report.notes if n.kind == "skipped"] == ["val/"]


def test_check_full_flags_a_subset(demo):
    report = check_root(demo.root, workers=1, full=True)
    assert not report.full
    assert report.problems[:4] == [
        "--full: train/ has 4 classes, ILSVRC2012 has 1,000",
        "--full: train/ has 48 images, ILSVRC2012 train has 1,281,167",
        "--full: val/ has 4 classes, ILSVRC2012 has 1,000",
        "--full: val/ has 20 images, ILSVRC2012 val has 50,000",
    ]
    assert "--full: val/n99000000/ has 5 images, ILSVRC2012 has 50 per class" in report.problems
    assert check_root(demo.root, workers=1).sound  # a subset is fine without --full


def test_check_bad_workers_is_a_usage_error(demo, cli):
    out = cli("check", demo.root, "--workers", "0")
    assert out.returncode == 2 and lines(out.stderr) == ["error: --workers must be at least 1, got 0"]


def test_check_names_a_gif_and_does_not_hand_it_to_dali(demo, tmp_path, cli):
    """DALI cannot decode GIF (2.4's CPU decoder crashed the process on one in 5 of 8 tries): check says what the
    file is, that PIL (the torchvision backend) reads it, and counts it as a problem for the default backend."""
    from PIL import Image

    root = tmp_path / "data"
    shutil.copytree(demo.root, root)
    gif = root / "train" / "n99000001" / "n99000001_gif.JPEG"
    Image.new("RGB", (50, 40)).save(gif, format="GIF")
    cut = root / "val" / "n99000002" / "ILSVRC2012_val_gif.JPEG"
    cut.write_bytes(gif.read_bytes()[:56])  # a truncated GIF: PIL fails too
    with Image.open(gif) as img:
        assert img.format == "GIF" and img.convert("RGB").size == (50, 40)

    out = cli("check", root, "--workers", "2")
    assert out.returncode == 1
    assert sorted(lines(out.stdout, "problem: ")) == [
        "problem: train/n99000001/n99000001_gif.JPEG: GIF data (PIL reads it, DALI cannot decode GIF: convert it "
        "to JPEG or use data.backend=torchvision)",
        "problem: val/n99000002/ILSVRC2012_val_gif.JPEG: GIF data that does not decode (truncated or corrupt): "
        "PIL says image file is truncated (20 bytes not processed)",
    ]
    assert "decoded 68 images with DALI's CPU decoder" in out.stdout  # neither GIF went to DALI
    assert not [ln for ln in lines(out.stdout, "note: ") if "_gif" in ln]  # and neither is a note


def _leaving_links(root: Path) -> list[tuple[Path, str]]:
    """Directory links inside class folders that leave their class: (link, expected target), made in root."""
    train = root / "train"
    made = [
        (train / "n99000001" / "loop", ".."),  # the split folder: every class labelled n99000001
        (train / "n99000002" / "self", "."),  # the class folder itself
        (train / "n99000003" / "sub" / "other", "../../n99000000"),  # another class, one real folder down
    ]
    (train / "n99000003" / "sub").mkdir()
    shutil.copy(next((train / "n99000003").glob("*.JPEG")), train / "n99000003" / "sub" / "x.JPEG")
    for link, target in made:
        link.symlink_to(target, target_is_directory=True)
    return [(link, os.path.realpath(link)) for link, _ in made]


def test_index_split_refuses_a_directory_that_leaves_its_class(demo, tmp_path):
    """make_dataset walks with followlinks=True: `ln -s .. loop` in a class folder gave that class every image of
    the split ~40 times over. index_split names the first such directory and where it leads."""
    from data_pipeline.layout import DataError, index_split

    root = tmp_path / "data"
    shutil.copytree(demo.root, root)
    (loop, split), (self_link, cls), (other, elsewhere) = _leaving_links(root)
    with pytest.raises(DataError) as e:
        index_split(root, "train")
    assert str(e.value) == (
        f"{loop} leads to {split}, which holds the whole split folder: the loaders would walk it again and again "
        "(a link loop) and label every class's images as n99000001"
    )
    loop.unlink()
    with pytest.raises(
        DataError, match=re.escape(f"{self_link} leads back to {cls}, the same directory as class")
    ):
        index_split(root, "train")
    self_link.unlink()
    with pytest.raises(DataError) as e:
        index_split(root, "train")
    assert str(e.value) == (
        f"{other} leads to {elsewhere}, inside the split folder but outside class folder n99000003/ (in "
        "n99000000/): the loaders would label the images there as n99000003"
    )
    other.unlink()
    index = index_split(root, "train")  # the real sub-folder is fine
    assert len(index) == 49 and (str(root / "train" / "n99000003" / "sub" / "x.JPEG"), 3) in index.samples


def test_index_split_takes_linked_class_folders_and_links_out_of_the_split(demo, tmp_path):
    """Class folders that are links to other storage, and nested links to places outside the split folder, keep
    working; a nested link into another class's storage does not."""
    from data_pipeline.layout import DataError, index_split

    root, storage, extra = tmp_path / "data", tmp_path / "storage", tmp_path / "extra"
    shutil.copytree(demo.root, root)
    for cls in ("n99000000", "n99000001"):
        shutil.move(root / "train" / cls, storage / cls)
        (root / "train" / cls).symlink_to(storage / cls, target_is_directory=True)
    extra.mkdir()
    shutil.copy(next((storage / "n99000001").glob("*.JPEG")), extra / "more.JPEG")
    (storage / "n99000001" / "more").symlink_to(extra, target_is_directory=True)
    index = index_split(root, "train")
    assert len(index) == 49
    assert (str(root / "train" / "n99000001" / "more" / "more.JPEG"), 1) in index.samples
    assert check_root(root, workers=1).sound

    stolen = storage / "n99000001" / "stolen"
    stolen.symlink_to(storage / "n99000000", target_is_directory=True)
    with pytest.raises(DataError) as e:
        index_split(root, "train")
    assert str(e.value) == (
        f"{root / 'train' / 'n99000001' / 'stolen'} leads to {storage / 'n99000000'}, inside class folder "
        f"n99000000/ ({storage / 'n99000000'}): the loaders would label its images as n99000001"
    )


def test_check_reports_a_directory_that_leaves_its_class_and_does_not_walk_it(demo, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(demo.root, root)
    (_, split), (_, cls), (_, elsewhere) = _leaving_links(root)
    report = check_root(root, workers=2)
    assert report.problems == [
        f"train/n99000001/loop: leads to {split}, which holds the whole split folder: the loaders would walk it "
        "again and again (a link loop) and label every class's images as n99000001",
        f"train/n99000002/self: leads back to {cls}, the same directory as class folder n99000002/: a link loop, "
        "the loaders would read the same images again and again",
        f"train/n99000003/sub/other: leads to {elsewhere}, inside the split folder but outside class folder "
        "n99000003/ (in n99000000/): the loaders would label the images there as n99000003",
    ]
    assert report.counts["train"] == 49 and report.decoded == 49 + 20  # nothing behind the links was read
