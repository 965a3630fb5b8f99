"""The entry points work from the repo root and from elsewhere, and import this project's packages."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli

ENTRY_POINTS = [
    ("evaluate", "--help"),
    ("-m", "evaluate", "--help"),
    ("-m", "train", "--help"),
    ("-m", "train.models", "--help"),
    ("-m", "data_pipeline", "--help"),
    ("slurm/launch.py", "--help"),
]


@pytest.mark.parametrize("args", ENTRY_POINTS, ids=" ".join)
def test_help_from_repo_root(args):
    out = run_cli(*args)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage:")


@pytest.mark.parametrize("args", [("evaluate", "--help"), ("slurm/launch.py", "--help")], ids=" ".join)
def test_script_paths_from_another_directory(args, tmp_path):
    out = run_cli(str(REPO / args[0]), *args[1:], cwd=tmp_path)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("name", ["train", "data_pipeline", "evaluate", "slurm"])
def test_packages_are_ours(name):
    # PyPI has an unrelated `evaluate` (Hugging Face); fail loudly if that one is imported instead.
    module = importlib.import_module(name)
    assert Path(module.__file__).resolve().parent == REPO / name


def test_evaluate_reference_table():
    out = run_cli("evaluate", "--reference")
    assert out.returncode == 0 and "vgg11_bn" in out.stdout and "29.630" in out.stdout


def test_launch_without_slurm_suggests_cluster_local(tmp_path):
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}  # python, but no sbatch
    out = run_cli("slurm/launch.py", "--arch", "vgg16_bn", "--gpus", "8", "--data", str(tmp_path), "--run-dir",
                  str(tmp_path / "run"), env=env)  # fmt: skip
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: sbatch not found on PATH") and "--cluster local" in last


def test_launch_dry_run_plan():
    # no SLURM client on PATH: where a sourced local cluster answered sinfo, its one node would refuse 2 nodes
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}
    out = run_cli("slurm/launch.py", "--arch", "vgg16_bn", "--gpus", "16", "--dry-run", env=env)
    assert out.returncode == 0, out.stderr
    assert "# plan: 2 node(s) × 8 GPU(s) = 16 task(s), one per GPU, on SLURM; global batch 256 = 16 × 16" in (
        out.stdout
    )
    assert "#SBATCH --nodes=2\n" in out.stdout and "#SBATCH --ntasks-per-node=8\n" in out.stdout
    out = run_cli("slurm/launch.py", "--arch", "vgg16_bn", "--gpus", "12", "--dry-run")
    assert out.returncode == 2 and out.stderr.strip().startswith(
        "error: --gpus 12 does not divide the global batch, data.batch_size=256 (the recipe's)"
    )
