"""Shared test helpers. Tests make their own real data (JPEG trees on disk); nothing is downloaded."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.slurm_cluster import slurm_cluster, slurm_env  # noqa: F401  (fixtures for @pytest.mark.slurm tests)

REPO = Path(__file__).resolve().parent.parent


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
