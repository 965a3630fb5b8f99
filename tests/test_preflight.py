"""``python slurm/launch.py --preflight``: the demo recipe's preflight job on the 1- and 2-node test clusters (CPU
tasks, gloo: the clusters' GPUs are fake GRES), its verdict, ``preflight.json`` and ``preflight.md``; the
bandwidth references and the --time projection as functions.

    .venv/bin/python -m pytest tests/test_preflight.py -rA      # as root (the SLURM tests start the clusters)
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from evaluate.report import ReportError, find_runs
from slurm import launch
from slurm.preflight import link_reference, network_reference, problems, project, suggest_minutes
from slurm.submit import slurm_job_ids
from tests.slurm_cluster import SlurmCluster
from tests.test_launch import small
from train.config import load_config

STEPS = 3


def preflight(capsys, tree: Path, run_dir: Path, *extra: str) -> tuple[int, str, str]:
    code = launch.main(
        [*small(tree, run_dir, "--cluster", "slurm", *extra), "--preflight", "--preflight-steps", str(STEPS)]
    )
    out = capsys.readouterr()
    return code, out.out, out.err


def read_report(run_dir: Path) -> tuple[dict, str]:
    folder = run_dir / "preflight"
    return json.loads((folder / "preflight.json").read_text()), (folder / "preflight.md").read_text()


def check_common(report: dict, md: str, stdout: str, tasks: int) -> None:
    """What both clusters' preflights must hold: a verdict, the projection and the bandwidth, a readable page."""
    assert report["verdict"] == "preflight OK: every check passed", report["problems"]
    assert stdout.rstrip().splitlines()[-2:] == [
        report["verdict"],
        f"report: {report['run_dir']}/preflight/preflight.md (and preflight.json)",
    ]
    p = report["projection"]
    assert p["steps_per_epoch"] == 7 and p["epochs"] == 2  # 56 images / global batch 8; sched.epochs=2
    assert p["epoch_s"] == pytest.approx(p["train_epoch_s"] + p["val_epoch_s"])
    assert p["train_epoch_s"] == pytest.approx(7 * report["training"]["step_s"])
    assert p["total_s"] == pytest.approx(p["startup_s"] + 2 * p["epoch_s"])
    assert p["gpu_hours"] == pytest.approx(p["total_s"] / 3600 * tasks)
    assert p["time_suggested"] == "00:15:00" and p["jobs_at_time_asked"] == 1
    t = report["training"]
    assert (
        t["steps"] == STEPS and t["img_per_s"] == pytest.approx(8 / t["step_s"]) and t["peak_memory_gib"] > 0
    )
    assert report["data"]["classes"] == 4 and report["data"]["sample"]["shape"] == [4, 3, 32, 32]
    assert report["weights"]["skipped"].startswith("model.num_classes=4")
    assert [task["rank"] for task in report["tasks_seen"]] == list(range(tasks))
    # the demo recipe asks 1 CPU per task (launch.cpus_per_gpu): SLURM granted it, and the task may run there
    assert all(t["device"] == "cpu" and t["cpus_asked"] == 1 <= t["cpus"] for t in report["tasks_seen"])
    assert report["run_folder_problems"] == []
    for heading in (
        "Cost of the run",
        "Training steps",
        "All-reduce bus bandwidth",
        "Data",
        "Run folder",
        "Builds",
    ):
        assert f"\n## {heading}\n" in md
    assert f"**{report['verdict']}**" in md
    assert "no reference (nccl-tests measures NCCL)" in md


def check_leaves_the_run_folder_to_the_launch(run_dir: Path) -> None:
    """Nothing a real launch into the same run folder reads (no job of it in <run_dir>/slurm, no config, no lock),
    nor a run for ``python evaluate --report``; only the file tables its loaders listed, which the run reuses."""
    assert slurm_job_ids(run_dir) == []
    # file_tables/: the data listing the preflight's loaders made, which the run's own loaders then map instead of
    # listing the tree again (data_pipeline.loader)
    assert sorted(p.name for p in run_dir.iterdir()) == ["file_tables", "preflight"]
    with pytest.raises(ReportError, match="no run folders"):
        find_runs([str(run_dir)])


@pytest.mark.slurm
def test_preflight_one_node(slurm_env: SlurmCluster, small_tree: Path, tmp_path: Path, capsys) -> None:
    """2 tasks on one node: gloo busbw within the node, none across nodes; the verdict is OK."""
    run_dir = tmp_path / "run"
    code, out, err = preflight(capsys, small_tree, run_dir, "--partition", slurm_env.partition)
    assert code == 0, out[-3000:] + err[-3000:]
    report, md = read_report(run_dir)
    check_common(report, md, out, tasks=2)
    within, across = report["all_reduce"]["within_node"], report["all_reduce"]["across_nodes"]
    assert within["backend"] == "gloo" and within["ranks"] == 2 and within["busbw_gbs"] > 0
    assert within["busbw_gbs"] == pytest.approx(within["algbw_gbs"])  # 2(n-1)/n = 1 for n = 2
    assert within["reference"]["gbs"] is None and across == {"skipped": "1 node"}
    check_leaves_the_run_folder_to_the_launch(run_dir)

    # the same measurements, a longer recipe: epochs for about 45 minutes (at the measured epoch time, whatever the
    # machine's speed) do not fit in 15 minutes without requeues
    epochs = math.ceil(45 * 60 / report["projection"]["epoch_s"])
    cfg = load_config("demo", [f"sched.epochs={epochs}", "launch.time=00:15:00", "launch.max_num_timeout=0"])
    longer = {**report, "projection": project(cfg, report, 2)}
    p = longer["projection"]
    assert (
        p["total_s"] == pytest.approx(p["startup_s"] + epochs * p["epoch_s"]) and p["jobs_at_time_asked"] > 1
    )
    useful_s = 15 * 60 - p["startup_s"] - p["signal_delay_s"]  # of each 15-minute job
    assert p["jobs_at_time_asked"] == math.ceil(epochs * p["epoch_s"] * 1.2 / useful_s)
    found = problems(cfg, longer)
    assert found == [
        f"--time 00:15:00 needs {p['jobs_at_time_asked']} jobs (requeues) for the projected "
        f"{md_duration(p['total_s'])}, launch.max_num_timeout=0 allows 1: give --time {p['time_suggested']} or "
        f"launch.max_num_timeout={p['jobs_at_time_asked']}"
    ]


@pytest.mark.slurm
def test_preflight_that_slurm_never_starts_is_cancelled(
    slurm_env: SlurmCluster, small_tree: Path, tmp_path: Path, capsys
) -> None:
    """16 tasks on the one-node cluster: refused before submission (sinfo: one node; exit 2); with --force,
    pending for a partition limit, which the launch would wait on forever; the preflight cancels it and says so
    (exit 1)."""
    args = ("--partition", slurm_env.partition, "--gpus", "16", "data.batch_size=16")
    code, out, err = preflight(capsys, small_tree, tmp_path / "run", *args)
    assert (code, out, err) == (2, "", (
        "error: the job needs 2 nodes with 8+ GPUs, but partition debug has 1: use --gpus 8 or fewer\n"))  # fmt: skip
    code, out, err = preflight(capsys, small_tree, tmp_path / "run", *args, "--force")
    assert code == 1, out + err
    job_id = re.search(r"^submitted preflight job (\d+) to SLURM", out, re.M)[1]
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"preflight found 1 problem\(s\): job {job_id} was pending for Partition\w+, .*", last
    )
    assert last.endswith("cancelled it: launch fewer --gpus/--nodes, CPUs or memory, or another --partition")
    slurm_env.wait_for("the cancelled job to leave the queue", lambda: slurm_env.squeue_state(job_id) == "")


def md_duration(seconds: float) -> str:
    from slurm.preflight import _hours

    return _hours(seconds)


@pytest.mark.slurm
def test_preflight_two_nodes(slurm2_env: SlurmCluster, small_tree: Path, tmp_path: Path, capsys) -> None:
    """One task on each of node1 and node2: the run folder written and read back across the nodes, gloo busbw
    across nodes, none within (one task per node); the verdict is OK."""
    run_dir = tmp_path / "run"
    code, out, err = preflight(
        capsys, small_tree, run_dir, "--nodes", "2", "--partition", slurm2_env.partition
    )
    assert code == 0, out[-3000:] + err[-3000:]
    report, md = read_report(run_dir)
    check_common(report, md, out, tasks=2)
    assert [(t["host"], t["node"]) for t in report["tasks_seen"]] == [("node1", 0), ("node2", 1)]
    within, across = report["all_reduce"]["within_node"], report["all_reduce"]["across_nodes"]
    assert within == {"skipped": "1 task per node"}
    assert across["backend"] == "gloo" and across["ranks"] == 2 and across["busbw_gbs"] > 0
    assert "| 1 | node2 | 1 |" in md
    check_leaves_the_run_folder_to_the_launch(run_dir)


def test_preflight_refuses_what_the_launch_refuses(capsys, small_tree: Path, tmp_path: Path) -> None:
    """A missing data root: exit 2, one line, nothing submitted or written; --dry-run with it: choose one."""
    missing = tmp_path / "nope"
    code = launch.main([*small(missing, tmp_path / "run", "--cluster", "local"), "--preflight"])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().splitlines()[-1].startswith(
        f"error: data root '{missing}' does not exist"
    )
    assert not (tmp_path / "run").exists()
    code = launch.main(
        [*small(small_tree, tmp_path / "run", "--cluster", "local"), "--preflight", "--dry-run"]
    )
    assert (
        code == 2 and "--preflight submits a short job; --dry-run submits nothing" in capsys.readouterr().err
    )


def test_bandwidth_references(tmp_path: Path) -> None:
    """NVLink per GPU from its name (PCIe cards: none); the node's active InfiniBand ports' line rate, summed."""
    assert link_reference("NVIDIA H100 80GB HBM3")[0] == 450.0
    assert link_reference("NVIDIA A100-SXM4-80GB")[0] == 300.0
    assert link_reference("NVIDIA H100 PCIe") is None and link_reference("NVIDIA A100 80GB PCIe") is None
    for hca, state in (("mlx5_0", "4: ACTIVE"), ("mlx5_1", "4: ACTIVE"), ("mlx5_2", "1: DOWN")):
        port = tmp_path / hca / "ports" / "1"
        port.mkdir(parents=True)
        (port / "state").write_text(state + "\n")
        (port / "rate").write_text("400 Gb/sec (4X NDR)\n")
    gbs, source = network_reference(str(tmp_path))
    assert gbs == 100.0 and "2 active InfiniBand/RoCE port(s)" in source
    assert network_reference(str(tmp_path / "none")) is None


def test_suggested_time_has_headroom_and_no_short_limit() -> None:
    # at least 15 minutes: submitit counts every signal of a job of 10 minutes or less as a timeout
    assert suggest_minutes(60) == 15
    assert suggest_minutes(50 * 60) == 60 and suggest_minutes(51 * 60) == 90  # 1.2 × 51 min = 61.2 → 1:30
    assert suggest_minutes(40 * 60, 120 + 60) == 60  # 48 min of training + 3 min start-up and signal lead


def test_released_weights_not_cached_is_skipped_with_the_command(
    small_tree: Path, tmp_path: Path, monkeypatch
):
    """ImageNet's class count but torchvision's weights not in torch.hub's cache: one line naming the file and the
    command that downloads it (nothing is downloaded by the preflight)."""
    import time
    import types

    import torch

    from slurm.preflight import Checks, Options
    from train.distributed import DistInfo

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cfg = load_config("demo", ["model.arch=vgg11", "model.num_classes=1000", "model.classifier_width=4096",
                               f"data.root={small_tree}", f"run_dir={tmp_path / 'run'}"])  # fmt: skip
    info = DistInfo(0, 0, 1, torch.device("cpu"), "single")
    job = types.SimpleNamespace(job_id="1", cluster="debug", node=0, num_nodes=1)
    skipped = Checks(cfg, info, Options(), job, 0.0, time.perf_counter()).released_weights(val_loader=None)
    path = tmp_path / "torch" / "hub" / "checkpoints" / "vgg11-8a719046.pth"
    assert skipped == {
        "skipped": f"VGG11_Weights.IMAGENET1K_V1 is not in torch.hub's cache ({path}): `python evaluate --weights "
        "VGG11_Weights.IMAGENET1K_V1` downloads it"
    }


def test_preflight_names_a_problem_with_its_fix(capsys, small_tree: Path, tmp_path: Path) -> None:
    """In this process (--cluster debug), past the launcher's own checks (--force): a class count the tree does
    not have is the verdict's one problem, with its fix, in the verdict line and preflight.md; exit 1."""
    run_dir = tmp_path / "run"
    argv = small(small_tree, run_dir, "--cluster", "debug", "--gpus", "1", "model.num_classes=5")
    code = launch.main([*argv, "--preflight", "--preflight-steps", "1", "--force"])
    out = capsys.readouterr().out
    problem = (
        f"data: {small_tree} has 4 classes but model.num_classes=5: set model.num_classes=4, or check --data"
    )
    assert code == 1 and out.strip().splitlines()[-2] == f"preflight found 1 problem(s): {problem}"
    report, md = read_report(run_dir)
    assert report["problems"] == [problem] and f"- problem: {problem}\n" in md
    assert report["training"] == {"skipped": "the data check failed"} and "not projected" in md
