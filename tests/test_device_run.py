"""benchmarks/device/run.sh, the prepared GPU session, in its CPU mode: it runs to the end, writes env.json and the
summary under $OUT, and skips every part that needs CUDA, saying so (on a GPU it would run them: skipped there)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script runs its GPU parts")


@pytest.mark.parametrize("mode", ["first", "dali"])
def test_device_script_on_a_cpu_skips_the_gpu_parts_and_says_so(mode, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), "DEVICE_WORK": str(tmp_path / "work")}
    env.pop("DEVICE_RUN_ON_CPU", None)
    args = ["bash", str(REPO / "benchmarks/device/run.sh"), mode]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = json.loads((out / "env.json").read_text())
    assert record["torch"] == torch.__version__ and record["cuda_available"] is False
    assert record["torch_cuda"] == torch.version.cuda
    summary = (out / "summary.txt").read_text().splitlines()
    assert summary == proc.stdout.splitlines()  # what it printed is what it kept
    assert summary[0].startswith("env: ok") and summary[1].startswith("device: no CUDA (torch ")
    skipped = {line.split(":")[0] for line in summary if "skipped (no CUDA" in line}
    assert skipped == ({"tests", "dense", "train"} if mode == "first" else {"dali"})
    assert summary[-1].startswith(f"done: {mode} call")
    assert sorted(p.name for p in out.iterdir()) == ["env.json", "log.txt", "summary.txt"]
