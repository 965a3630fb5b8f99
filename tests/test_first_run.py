"""A new user's first run: mistakes answered with the fix (one ``error:`` line naming what to type instead).

    .venv/bin/python -m pytest tests/test_first_run.py -q

In-process calls of the launcher's and the trainer's ``main`` (dry runs and bad input submit nothing).
"""

from __future__ import annotations

import pytest

import train.__main__ as train_cli
from slurm import launch


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


@pytest.mark.parametrize("command", ["launch", "train"])
@pytest.mark.parametrize(("args", "message"), BOTH, ids=[" ".join(a) for a, _ in BOTH])
def test_familiar_flags_and_typos_name_what_to_write(capsys, tmp_path, command, args, message):
    main = launch.main if command == "launch" else train_cli.main
    extra = ("--dry-run",) if command == "launch" else ("--print-config",)
    code, out, err = run_main(capsys, main, *args, "--data", str(tmp_path), *extra)
    assert code == 2 and out == ""
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err


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
    main = launch.main if command == "launch" else train_cli.main
    extra = ("--dry-run",) if command == "launch" else ("--print-config",)
    code, out, err = run_main(capsys, main, *args, "--data", str(tmp_path), *extra)
    assert code == 2 and out == ""
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
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
