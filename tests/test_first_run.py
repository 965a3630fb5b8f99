"""A new user's first run: mistakes answered with the fix (one ``error:`` line naming what to type instead).

    .venv/bin/python -m pytest tests/test_first_run.py -q

In-process calls of the launcher's and the trainer's ``main`` (dry runs and bad input submit nothing).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
import torchvision

import train.__main__ as train_cli
from data_pipeline.shards import pack
from evaluate.__main__ import main as evaluate_main
from evaluate.report import build_row, format_console
from slurm import launch
from slurm.submit import checkpoint_problem, data_problem
from tests.slurm_cluster import SlurmCluster
from train.config import Config, load_config, to_dict
from train.models import build_model_from_config


def run_main(capsys, main, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


# ------------------------------------------------------------------------------- mistakes answered with the fix

BOTH = [
    (("--arch", "vgg16bn"), "--arch 'vgg16bn' is not an architecture (did you mean vgg16_bn?)"),
    (("--arch", "VGG19-BN"), "--arch 'VGG19-BN' is not an architecture (did you mean vgg19_bn?)"),
    (("--epochs", "10"), "--epochs is not an option here: write sched.epochs=10 (config keys are key=value "
                         "arguments)"),
    (("--lr=0.02",), "--lr is not an option here: write optim.lr=0.02 (config keys are key=value arguments)"),
    (("--batch-size", "64"), "--batch-size is not an option here: write data.batch_size=64 (config keys are "
                             "key=value arguments; the global batch, summed over all GPUs; torchvision's "
                             "--batch-size is per GPU)"),
    (("--resume", "/r/x.pth"), "--resume is not an option here: a run resumes from <run_dir>/last.pth by itself; "
                               "to start from another checkpoint write ckpt.resume=/r/x.pth (config keys are "
                               "key=value arguments)"),
    (("--output-dir", "/r"), "--output-dir is not an option here: write --run-dir /r"),
    (("--output_dir", "/r"), "--output_dir is not an option here: write --run-dir /r"),
    (("--model", "vgg11"), "--model is not an option here: write --arch vgg11"),
    (("--data-path", "/d"), "--data-path is not an option here: write --data /d"),
    (("--wd", "5e-4"), "--wd is not an option here: write optim.weight_decay=5e-4 (config keys are key=value "
                       "arguments)"),
    (("--weight-decay", "5e-4"), "--weight-decay is not an option here: write optim.weight_decay=5e-4"),
    (("--momentum", "0.8"), "--momentum is not an option here: write optim.momentum=0.8"),
    (("-j", "4"), "-j is not an option here: write data.workers=4 (config keys are key=value arguments; per "
                  "process)"),
    (("--workers", "4"), "--workers is not an option here: write data.workers=4"),
    (("--amp",), "--amp is not an option here: write train.precision=fp16 (or bf16)"),
    (("--run_dir", "/r"), "unknown option --run_dir (did you mean --run-dir?)"),
]  # fmt: skip


def _one_error_line(capsys, tmp_path, command: str, args: tuple[str, ...], message: str) -> str:
    """``command`` (launch or train) with ``args`` exits 2 with one line starting ``error: message``; that line."""
    main = launch.main if command == "launch" else train_cli.main
    extra = ("--dry-run",) if command == "launch" else ("--print-config",)
    code, out, err = run_main(capsys, main, *args, "--data", str(tmp_path), *extra)
    assert code == 2 and out == ""
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("command", ["launch", "train"])
@pytest.mark.parametrize(("args", "message"), BOTH, ids=[" ".join(a) for a, _ in BOTH])
def test_familiar_flags_and_typos_name_what_to_write(capsys, tmp_path, command, args, message):
    _one_error_line(capsys, tmp_path, command, args, message)


@pytest.mark.parametrize(
    ("command", "args", "message"),
    [
        ("launch", ("--gpu", "4"), "--gpu is not an option here: write --gpus 4 (the total over all nodes)"),
        ("launch", ("--ngpus", "8"), "--ngpus is not an option here: write --gpus-per-node 8 (and --gpus for the "
                                     "total)"),
        ("launch", ("--timeout", "60"), "--timeout is not an option here: write --time 60"),
        ("launch", ("--partiton", "gpu"), "unknown option --partiton (did you mean --partition?)"),
        ("launch", ("--arch", "vgg11,vgg16bn"), "--arch 'vgg16bn' is not an architecture (did you mean vgg16_bn?)"),
        ("train", ("--gpus", "8"), "--gpus is an option of python slurm/launch.py; python -m train runs in this "
                                   "process, or one process per GPU under torchrun: torchrun --nproc_per_node=N"),
        ("train", ("--config", "vgg16bn"), "unknown config 'vgg16bn' (did you mean vgg16_bn?)"),
        ("train", ("--config", "paper/vgg16bn"), "unknown config 'paper/vgg16bn' (did you mean paper/vgg16_bn?)"),
        ("train", ("model.arch=vgg13bn",), "model.arch='vgg13bn' is not one of: vgg11, "),
    ],
    ids=["gpu", "ngpus", "timeout", "partiton", "sweep-arch", "train-gpus", "config", "paper-config", "model.arch"],
)  # fmt: skip
def test_command_specific_mistakes(capsys, tmp_path, command, args, message):
    err = _one_error_line(capsys, tmp_path, command, args, message)
    if "model.arch" in message:
        assert err.rstrip().endswith("(did you mean vgg13_bn?)")


def test_train_takes_the_launchers_flags(capsys, tmp_path):
    code, out, err = run_main(capsys, train_cli.main, "--arch", "vgg13", "--recipe", "paper", "--data",
                              str(tmp_path), "--run-dir", str(tmp_path / "r"), "--print-config")  # fmt: skip
    assert code == 0, err
    assert f"run_dir: {tmp_path / 'r'}\n" in out and "recipe: paper\n" in out and "arch: vgg13," in out
    assert f"  root: {tmp_path}\n" in out
    code, out, err = run_main(capsys, train_cli.main, "--arch", "vgg11", "--recipe", "demo", "--print-config")
    assert code == 0 and "recipe: demo\n" in out and "arch: vgg11," in out
    code, out, err = run_main(capsys, train_cli.main, "--config", "demo", "--arch", "vgg11", "--print-config")
    assert code == 2 and err.startswith(
        "error: --config demo names the recipe file; --arch/--recipe choose one"
    )


def test_batch_split_names_the_flag_typed_and_what_divides(capsys, tmp_path):
    common = ("--run-dir", str(tmp_path / "r"), "--data", str(tmp_path), "--dry-run")
    code, _, err = run_main(capsys, launch.main, "--gpus", "12", *common)
    assert code == 2 and err == (
        "error: --gpus 12 does not divide the global batch, data.batch_size=256 (the recipe's): use --gpus 8 or "
        "--gpus 16, or data.batch_size=252 or 264 (a multiple of 12; the lr stays the recipe's unless "
        "optim.lr_scaling=linear)\n"
    )
    code, _, err = run_main(capsys, launch.main, "launch.gpus=6", "data.batch_size=100", *common)
    assert code == 2 and err.startswith(
        "error: launch.gpus=6 does not divide the global batch, data.batch_size=100: use --gpus 5 or --gpus 10, or "
        "data.batch_size=96 or 102 (a multiple of 6;"
    )


def test_nodes_given_are_not_reported_as_chosen(capsys, tmp_path):
    common = ("--gpus", "12", "data.batch_size=384", "--run-dir", str(tmp_path / "r"), "--data", str(tmp_path),
              "--dry-run")  # fmt: skip
    code, out, _ = run_main(capsys, launch.main, *common)
    assert code == 0 and "# note: 12 GPUs on 8-GPU nodes: using 2 nodes × 6 GPUs each" in out
    code, out, _ = run_main(capsys, launch.main, *common, "--nodes", "2")
    assert code == 0 and "# note:" not in out and "#SBATCH --nodes=2\n" in out
    code, out, err = run_main(capsys, launch.main, *common, "--nodes", "5")
    assert code == 2 and err.startswith(
        "error: --gpus 12 does not split evenly over --nodes 5 of up to 8 GPUs (SLURM starts the same number of "
        "tasks on every node): use --gpus 10 or --gpus 15, or another --nodes"
    )


# ------------------------------------------------------------------------------- nothing submitted that must fail


def _tree(root: Path, train: list[str], val: list[str], empty: bool = False) -> Path:
    """Class folders (no decoding happens before submitting: a file stands for an image)."""
    for split, classes in (("train", train), ("val", val)):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            if not empty:
                (root / split / c / "a.JPEG").touch()
    return root


def _cfg(root: Path, *overrides: str) -> Config:
    return load_config("demo", [f"data.root={json.dumps(str(root))}", *overrides])


def test_data_problems_are_found_before_submitting(tmp_path, small_tree):
    four = ["n01", "n02", "n03", "n04"]
    ok = _tree(tmp_path / "ok", four, four)
    assert data_problem(_cfg(ok, "model.num_classes=4")) is None
    assert data_problem(_cfg(tmp_path / "nope")) == (
        f"data root {tmp_path / 'nope'} does not exist on this host: check --data (on a login node that cannot see "
        "the data, --force submits without the checks)"
    )
    assert data_problem(_cfg(ok)) == (
        f"{ok} has 4 class folders in train/ and val/ but model.num_classes=10: set model.num_classes=4, or check "
        "--data"
    )
    assert data_problem(_cfg(ok / "train", "model.num_classes=4")) == (
        f"{ok}/train/train is missing: expected {ok}/train/train/<class>/<image> (give the folder that holds train/ "
        "and val/)"
    )
    no_val = _tree(tmp_path / "no_val", four, [])
    assert data_problem(_cfg(no_val, "model.num_classes=4")) == (
        f"{no_val}/val is missing: expected {no_val}/val/<class>/<image>"
    )
    differ = _tree(tmp_path / "differ", four, [*four[:3], "n99"])
    assert data_problem(_cfg(differ, "model.num_classes=4")) == (
        f"train/ and val/ class folders differ under {differ}: 1 only in train ['n04'], 1 only in val ['n99']"
    )
    # a hidden folder (a notebook's checkpoints) is a class to ImageFolder, so to the loaders, which refuse it
    # empty when the job starts: found here (it sorts first), and counted once it holds a file
    (ok / "train" / ".ipynb_checkpoints").mkdir()
    (ok / "val" / ".ipynb_checkpoints").mkdir()
    assert (
        data_problem(_cfg(ok, "model.num_classes=4"))
        == f"class folder {ok}/train/.ipynb_checkpoints is empty"
    )
    for split in ("train", "val"):
        (ok / split / ".ipynb_checkpoints" / "a.JPEG").write_bytes(b"")
    assert data_problem(_cfg(ok, "model.num_classes=4")) == (
        f"{ok} has 5 class folders in train/ and val/ but model.num_classes=4: set model.num_classes=5, or check "
        "--data"
    )
    for split in ("train", "val"):
        shutil.rmtree(ok / split / ".ipynb_checkpoints")
    empty = _tree(tmp_path / "empty", four, four, empty=True)
    assert data_problem(_cfg(empty, "model.num_classes=4")) == f"class folder {empty}/train/n01 is empty"
    # a pack (python -m data_pipeline pack): judged by its manifest, not by listing its shards
    pack_dir = tmp_path / "pack"
    pack(small_tree, pack_dir, stream=io.StringIO())
    assert data_problem(_cfg(pack_dir, "data.format=shards", "model.num_classes=4")) is None
    assert data_problem(_cfg(pack_dir, "data.format=shards")) == (
        f"pack {pack_dir} has 4 classes (manifest.json) but model.num_classes=10: set model.num_classes=4, or check "
        "--data"
    )
    assert data_problem(_cfg(pack_dir, "model.num_classes=4")) == (
        f"{pack_dir} is a pack (it holds manifest.json): set data.format=shards to read it"
    )
    assert data_problem(_cfg(ok, "data.format=shards", "model.num_classes=4")).startswith(
        f"data.format=shards but {ok} has no manifest.json"
    )


def test_a_checkpoint_of_another_arch_is_refused_before_submitting(capsys, tmp_path, small_tree):
    """The launcher runs the training's own resume check (train.checkpoint.check_resumable) on last.pth."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    theirs = _cfg(small_tree, "model.num_classes=4", "model.classifier_width=32", "model.arch=vgg11_bn")
    model = build_model_from_config(theirs.model)
    torch.save({"model": model.state_dict(), "config": to_dict(theirs), "epoch": 1}, run_dir / "last.pth")
    args = ("--config", "demo", "--cluster", "local", "--data", str(small_tree), "--run-dir", str(run_dir),
            "model.num_classes=4", "model.classifier_width=32")  # fmt: skip
    code, out, err = run_main(capsys, launch.main, *args, "model.arch=vgg13_bn")
    assert code == 2 and "submitted" not in out
    assert err == (
        f"error: cannot resume from {run_dir}/last.pth: it was trained with model.arch='vgg11_bn', this run has "
        "'vgg13_bn' (start this run in another run_dir)\n"
    )
    assert sorted(p.name for p in run_dir.iterdir()) == ["last.pth"]  # nothing written, no job folder
    # the dry run says so as a warning, and shows the rest
    code, out, err = run_main(capsys, launch.main, *args, "model.arch=vgg13_bn", "--dry-run")
    assert code == 0 and "# plan:" in out
    assert err.startswith("warning: the launch would refuse this: cannot resume from ")
    assert checkpoint_problem(_cfg(small_tree, "model.num_classes=4", "model.classifier_width=32",
                                   "model.arch=vgg11_bn", f"run_dir={run_dir}")) is None  # fmt: skip


@pytest.mark.slurm
def test_slurm_missing_data_root_submits_nothing_and_a_job_that_fails_anyway_is_reported_failed(
    capsys, slurm_env: SlurmCluster, tmp_path
):
    """On the local SLURM cluster: a launch whose data root does not exist exits 2 with one line and no job reaches
    SLURM (squeue and sacct know no job of its name); ``--force`` submits it, the job fails on the data root, and
    ``python evaluate --report`` lists the run as failed with SLURM's state, the error line and the log path."""
    name = f"nodata{os.getpid()}"  # the cluster is shared with other test sessions: look for this job name
    run_dir, missing = tmp_path / name, tmp_path / "no-such-data"
    args = ("--config", "demo", "--cluster", "slurm", "--partition", slurm_env.partition, "--gpus", "1",
            "--data", str(missing), "--run-dir", str(run_dir), "--time", "00:15:00", "log.wandb_mode=disabled",
            "data.workers=0", "launch.cpus_per_gpu=1", "dist.device=cpu")  # fmt: skip
    code, out, err = run_main(capsys, launch.main, *args)
    assert code == 2 and out == ""
    assert err == (
        f"error: data root {missing} does not exist on this host: check --data (on a login node that cannot see the "
        "data, --force submits without the checks)\n"
    )
    job_name = f"vgg-{name}"
    assert slurm_env.run("squeue", "-h", "-n", job_name, "-o", "%i").stdout.strip() == ""
    sacct = ("sacct", "-a", "-n", "-X", "-P", "-S", "2020-01-01", "--name", job_name, "-o", "JobID")
    assert slurm_env.run(*sacct).stdout.strip() == ""
    assert not run_dir.exists()

    code, out, err = run_main(capsys, launch.main, *args, "--force")
    assert code == 0, err
    job_id = re.search(r"^submitted job (\d+) to SLURM", out, re.M)[1]
    slurm_env.wait_for(
        "the job to fail", lambda: slurm_env.sacct_states(job_id)[-1:] == ["FAILED"], timeout=180
    )
    row = build_row(run_dir)
    log_path = run_dir / "slurm" / job_id / f"{job_id}_0_log.err"
    assert row.state == "failed"
    assert row.progress == (
        f"0/? epochs (SLURM job {job_id} FAILED: data_pipeline.layout.DataError: data root {str(missing)!r} does "
        f"not exist (expected {missing}/train/<wnid>/*.JPEG); log: {log_path})"
    )
    assert f"{row.arch}: failed, {row.progress}" in format_console([row])


# ------------------------------------------------------------------------------------- released weights by name

VGG11_FILE = (
    "vgg11-8a719046.pth"  # torchvision's file name for VGG11_Weights.IMAGENET1K_V1 (sha256 prefix in it)
)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """An empty torch.hub cache (TORCH_HOME) and no way out: every https request goes to a closed local port, a
    real connection refusal, so nothing is downloaded here even where the machine has internet."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path / "torch" / "hub" / "checkpoints"


def test_released_weights_by_name_offline_name_the_url_and_the_cache_path(capsys, offline_hub):
    code, out, err = run_main(capsys, evaluate_main, "--weights", "VGG16_BN_Weights.IMAGENET1K_V1")
    url = "https://download.pytorch.org/models/vgg16_bn-6c64b313.pth"
    assert code == 2 and out == ""
    assert re.fullmatch(
        rf"error: cannot download {re.escape(url)} \(.+\); offline, put that file at "
        rf"{re.escape(str(offline_hub / 'vgg16_bn-6c64b313.pth'))} \(torch.hub's cache: \$TORCH_HOME/hub/checkpoints\) "
        r"and run this again\n",
        err,
    ), err
    # the arch's default weights, and the URL itself (--checkpoint URL too: not mangled to https:/...)
    for args in (("--arch", "vgg16_bn", "--weights", "DEFAULT"), ("--weights", url), ("--checkpoint", url)):
        code, _, err = run_main(capsys, evaluate_main, *args)
        assert code == 2 and err.startswith(f"error: cannot download {url} (") and err.count("\n") == 1, err
    assert [p.name for p in offline_hub.iterdir()] == []  # no partial download left behind
    code, _, err = run_main(capsys, evaluate_main, "--weights", "VGG16BN_Weights.IMAGENET1K_V1")
    assert code == 2 and err == (
        "error: --weights VGG16BN_Weights.IMAGENET1K_V1: not one of torchvision's weights (did you mean "
        "VGG16_BN_Weights.IMAGENET1K_V1?)\n"
    )


def test_released_weights_load_from_torch_hubs_cache(capsys, offline_hub, small_tree):
    """A real vgg11 weight file (zeros: the numbers are not the point) under torchvision's file name in the cache:
    loaded from there with no network. torch.hub verifies the sha256 prefix in the name only when it downloads, so
    a cached file is used as it is; ours is not torchvision's release, and a warning says so."""
    with torch.device("meta"):
        shapes = torchvision.models.vgg11().state_dict()
    offline_hub.mkdir(parents=True)
    torch.save({k: torch.zeros(v.shape, dtype=v.dtype) for k, v in shapes.items()}, offline_hub / VGG11_FILE)
    image = next((small_tree / "val").rglob("*.JPEG"))
    code, out, err = run_main(capsys, evaluate_main, "--weights", "VGG11_Weights.IMAGENET1K_V1", "--predict",
                              str(image))  # fmt: skip
    assert code == 0, err
    assert out.startswith(f"{image}:") and "tench" in out  # ImageNet's class names: a 1000-class vgg11 ran
    assert re.fullmatch(
        rf"warning: {re.escape(str(offline_hub / VGG11_FILE))}: sha256 [0-9a-f]{{12}}\.\.\. does not start with "
        r"8a719046 as torchvision's file name says: not the released file \(torch.hub checks the hash only when it "
        r"downloads\), so its numbers are not the release's; delete it to download the released one\n",
        err,
    ), err
    assert sorted(p.name for p in offline_hub.iterdir()) == [VGG11_FILE]


# ------------------------------------------------------------------------------------------------------- plots


def _epoch(n: int, top1: float) -> dict[str, float]:
    return {"epoch": n, "train_loss": 2.0 / n, "val_loss": 2.2 / n, "train_top1_err": top1 - 5,
            "val_top1_err": top1, "train_top5_err": top1 / 4, "val_top5_err": top1 / 3}  # fmt: skip


def _visible(line) -> bool:
    """A line shows something: a marker, or a line style over two or more points."""
    return line.get_marker() not in (None, "None", "", " ") or (
        len(line.get_xdata()) > 1 and line.get_linestyle() not in ("None", "", " ")
    )


def test_curves_one_colour_per_series_best_epoch_marked_single_points_visible():
    import matplotlib.pyplot as plt

    from train.report import curves_figure

    epochs = [_epoch(1, 60.0), _epoch(2, 40.0), _epoch(3, 40.0), _epoch(4, 45.0)]
    steps = [{"epoch_float": 0.5, "loss": 2.5}, {"epoch_float": 1.0, "loss": 2.1}]
    fig, (ax_loss, ax_err) = curves_figure(epochs, steps)
    colours: dict[str, set] = {"train": set(), "val": set()}
    for ax in (ax_loss, ax_err):
        for line in ax.get_lines():
            series = line.get_label().split()[0]
            if series in colours:
                colours[series].add(line.get_color())
    assert len(colours["train"]) == 1 and len(colours["val"]) == 1 and colours["train"] != colours["val"]
    (best,) = [ln for ln in ax_err.get_lines() if ln.get_label().startswith("best")]
    assert (list(best.get_xdata()), list(best.get_ydata())) == ([2], [40.0])  # the earliest of equal errors
    assert best.get_label() == "best: epoch 2, val top-1 40.00 %"
    assert all(any(ln.get_xdata()[0] == 2 for ln in ax.get_lines() if list(ln.get_xdata()) == [2, 2])
               for ax in (ax_loss, ax_err))  # the best epoch ruled on both panels  # fmt: skip
    plt.close(fig)
    # a 1-epoch run (one step logged): every series still shows its point
    fig, axes = curves_figure([_epoch(1, 70.0)], [{"epoch_float": 1.0, "loss": 2.3}])
    lines = [ln for ax in axes for ln in ax.get_lines() if len(ln.get_xdata()) == 1]
    assert len(lines) == 1 + 2 + 4 + 1 and all(_visible(ln) for ln in lines)
    assert axes[0].get_xlim() == (0.0, 2.0)
    plt.close(fig)


def test_report_one_name_per_run_in_the_table_and_the_plot(tmp_path):
    import matplotlib.pyplot as plt

    from evaluate.report import RunRow, format_console, format_markdown, run_names
    from train.report import runs_figure

    runs = [
        tmp_path / "a" / "demo-vgg11_bn",
        tmp_path / "b" / "demo-vgg11_bn",
        tmp_path / "a" / "demo-vgg13_bn",
    ]
    names = run_names(runs)
    assert names == ["a/demo-vgg11_bn", "b/demo-vgg11_bn", "demo-vgg13_bn"]
    rows = [RunRow(run_dir=str(r), arch=r.name[5:], recipe="demo", state="stopped", progress="1/3 epochs",
                   epochs_done=1, epochs=3, name=n, curve=[_epoch(1, 50.0 + i)])
            for i, (r, n) in enumerate(zip(runs, names, strict=True))]  # fmt: skip
    md, console = format_markdown(rows, "t"), format_console(rows)
    for n, r in zip(names, rows, strict=True):
        assert f"| {n} | {r.arch} | demo | stopped |" in md and f"- **{n}**" in md
        assert console.count(f"{n} ") >= 1 and f"{n}: stopped, 1/3 epochs" in console
    fig, (ax_err, ax_loss) = runs_figure([(r.label, r.curve) for r in rows])
    for ax in (ax_err, ax_loss):
        labelled = [ln for ln in ax.get_lines() if not ln.get_label().startswith("_")]
        assert [ln.get_label() for ln in labelled] == names  # one entry per run, its table name
        # one colour per run across panels
        assert [ln.get_color() for ln in labelled] == ["C0", "C1", "C2"]
    singles = [ln for ax in (ax_err, ax_loss) for ln in ax.get_lines()]
    assert all(_visible(ln) for ln in singles)  # 1-epoch runs: every point shows
    stars = [ln for ln in ax_err.get_lines() if ln.get_marker() == "*"]
    assert [(ln.get_color(), list(ln.get_xdata())) for ln in stars] == [("C0", [1]), ("C1", [1]), ("C2", [1])]
    plt.close(fig)


# ------------------------------------------------------------------------------------ what real sites need around the job


def test_setup_lines_sbatch_and_srun_options_and_a_container_in_the_sbatch_script(capsys, imagenet_layout):
    common = ("--arch", "vgg16_bn", "--gpus", "8", "--run-dir", "/shared/runs/v16", "--data", str(imagenet_layout),
              "--dry-run")  # fmt: skip
    code, out, err = run_main(capsys, launch.main, *common, "--setup", "module load cuda/12.4", "--setup",
                              "source /shared/env/bin/activate", "--sbatch", "exclusive", "--sbatch",
                              "reservation=r1", "--sbatch=--gres=gpu:a100:8", "--srun=--cpu-bind=cores",
                              "--container-image", "nvcr.io/nvidia/pytorch:24.10-py3", "--python", "python3",
                              "launch.sbatch_args.comment=first")  # fmt: skip
    assert code == 0, err
    script = out.split("# sbatch script submitit would submit")[1]
    for line in ("#SBATCH --exclusive\n", "#SBATCH --reservation=r1\n", "#SBATCH --gres=gpu:a100:8\n",
                 "#SBATCH --comment=first\n", "#SBATCH --nodes=1\n"):  # fmt: skip
        assert line in script
    assert "# setup\nmodule load cuda/12.4\nsource /shared/env/bin/activate\n" in script
    srun = next(ln for ln in script.splitlines() if ln.startswith("srun "))
    assert srun.endswith(
        " --cpu-bind=cores --container-image=nvcr.io/nvidia/pytorch:24.10-py3 python3 -u -m submitit.core._submit "
        "/shared/runs/v16/slurm/%j"
    )
    # the resolved config holds them as launch.* keys
    assert "setup: [module load cuda/12.4, source /shared/env/bin/activate]" in out
    assert "container_image: nvcr.io/nvidia/pytorch:24.10-py3" in out
    code, out, err = run_main(capsys, launch.main, *common, "--sbatch", "time=10")
    assert (
        code == 2 and err == "error: launch.sbatch_args.time: the launcher sets #SBATCH --time; use --time\n"
    )


def test_an_interpreter_on_node_local_storage_is_refused_for_slurm(capsys, imagenet_layout, monkeypatch):
    monkeypatch.delenv("VGG_ONE_MACHINE_CLUSTER", raising=False)
    common = ("--arch", "vgg16_bn", "--gpus", "8", "--run-dir", "/shared/runs/v16", "--data", str(imagenet_layout),
              "--dry-run", "--python", "/tmp/env/bin/python")  # fmt: skip
    code, out, err = run_main(capsys, launch.main, *common)
    assert (
        code == 2
        and out == ""
        and err
        == (
            "error: the job's interpreter /tmp/env/bin/python is on node-local storage (/tmp): the compute nodes cannot "
            "run it; install the environment on storage every node sees, or name one with --python\n"
        )
    )
    code, out, err = run_main(capsys, launch.main, *common, "--cluster", "local")  # this machine: fine
    assert code == 0, err
