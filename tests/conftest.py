"""Shared test helpers. Tests make their own real data (JPEG trees on disk); nothing is downloaded."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.slurm_cluster import slurm2_env, slurm_cluster, slurm_cluster2, slurm_env  # noqa: F401  (fixtures for @pytest.mark.slurm tests)

REPO = Path(__file__).resolve().parent.parent
# Every SLURM cluster the tests start is this machine (slurm/local_cluster.sh): its /tmp is every node's, so a
# clone, interpreter or run folder there is fine (slurm.submit refuses node-local paths for SLURM jobs otherwise).
# The tests of those refusals remove it.
os.environ.setdefault("VGG_ONE_MACHINE_CLUSTER", "1")

try:
    import submitit  # noqa: F401
except ImportError:
    # the lent GPU machine (benchmarks/device/run.sh) has no submitit: the SLURM tests import it (and slurm/)
    collect_ignore = ["test_first_run.py", "test_launch.py", "test_multinode.py", "test_slurm_cluster.py"]


def run_cli(
    *args: str, cwd: Path | str = REPO, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run ``python ARGS...`` with this interpreter, capturing text output; ``env`` replaces the environment."""
    env = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def small_tree(tmp_path_factory) -> Path:
    """A 4-class demo JPEG tree (56 train / 20 val images, 40-72 px) for seconds-per-epoch training runs."""
    from data_pipeline.demo import make_demo_dataset

    root = tmp_path_factory.mktemp("small_tree")
    make_demo_dataset(root, classes=4, train_per_class=14, val_per_class=5, seed=3, min_size=40, max_size=72)
    return root


@pytest.fixture(scope="session")
def imagenet_layout(tmp_path_factory) -> Path:
    """ImageNet's folder layout without its images: train/ and val/ with 1,000 class folders each, one (empty)
    file in the first of each, as much as the launcher's checks before submitting look at (dry runs)."""
    root = tmp_path_factory.mktemp("imagenet_layout")
    for split in ("train", "val"):
        for i in range(1000):
            (root / split / f"n{i:08d}").mkdir(parents=True)
        (root / split / "n00000000" / "x.JPEG").touch()
    return root
