"""CPUs and memory per task from the partition's nodes (slurm/resources.py): sinfo's strings as real sites print
them, the derivation and its refusals, and the launcher against the local SLURM cluster's real sinfo."""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

import pytest

from slurm import launch
from slurm.resources import (
    Node,
    ResourceError,
    fit,
    parse_gres_gpus,
    parse_sinfo,
    size_mb,
)


@pytest.mark.parametrize(
    ("gres", "gpus"),
    [
        ("gpu:8", 8),
        ("gpu:8(S:0-1)", 8),
        ("gpu:a100:8(S:0-1)", 8),
        ("gpu:nvidia_a100-sxm4-80gb:8(S:0-1)", 8),
        ("gpu:h100:4,shard:h100:16", 4),  # shards are not GPUs a task can own
        ("gpu:h100:4(S:0),shard:h100:16(S:0)", 4),
        ("gpu:tesla:2(S:0-1),mps:200", 2),
        ("gpu:a100:2(S:0),gpu:v100:2(S:1)", 4),  # two types on one node: summed
        ("gpu:a100:4(S:0,1),craynetwork:4", 4),  # a comma inside the socket list
        ("gpu:1g.10gb:7(S:0)", 7),  # MIG slices as sites name them
        ("craynetwork:4,gpu:1", 1),
        ("gpu", 1),
        ("gpu:v100", 1),  # a type, no count
        ("(null)", 0),
        ("", 0),
        ("mps:100,bandwidth:lustre:4G", 0),
    ],
)
def test_gres_strings(gres, gpus):
    assert parse_gres_gpus(gres) == gpus


def test_sinfo_lines_of_a_mixed_partition():
    # sinfo -N -h -o '%P|%N|%c|%m|%G|%T|%f' on a site with two node types in its default partition
    text = (
        "gpu*|a001|128|1031000|gpu:a100:8(S:0-1)|mixed|a100,ib\n"
        "gpu*|a002|128|1031000|gpu:a100:8(S:0-1)|drained*|a100,ib\n"
        "gpu*|v001|40|384000|gpu:v100:4(S:0-1)|idle~|v100\n"
        "cpu|c001|64+|256000+|(null)|allocated|(null)\n"
    )
    a1, a2, v1, c1 = parse_sinfo(text)
    assert a1 == Node("a001", "gpu", 128, 1031000, 8, "mixed", ("a100", "ib"), default=True)
    assert (a2.state, a2.usable, v1.state, v1.usable) == ("drained", False, "idle", True)
    assert (c1.cpus, c1.mem_mb, c1.gpus, c1.features, c1.default) == (64, 256000, 0, (), False)


def test_size_mb():
    assert [size_mb(s) for s in ("64G", "500M", "1.5T", "4096", "2GB", "lots")] == [
        65536, 500, 1572864, 4096, 2048, None]  # fmt: skip


# A site's 8-GPU node: 64 CPUs, RealMemory 515000 MB (sbatch refuses the old defaults, 80 CPUs and 512G, there)
H100 = Node("h001", "gpu", 64, 515000, 8, "idle")
V100 = Node("v001", "gpu", 40, 384000, 4, "idle")
A100 = Node("a001", "gpu", 128, 1031000, 8, "idle")


def test_derived_numbers_fit_the_node():
    r = fit("gpu", [H100], tasks_per_node=8, nodes_needed=1, cpus_per_gpu=None, mem_per_gpu=None)
    # 64 // 8 CPUs; 515000 MB less 10 % / 8 = 57937 MB, whole GB down: 56G (× 8 = 448G <= 502G)
    assert (r.cpus_per_gpu, r.mem_per_gpu) == (8, "56G")
    assert r.cpus_source == "sinfo: partition gpu, 64 CPUs / 8 GPUs per node"
    assert r.mem_source == "sinfo: partition gpu, 515000 MB per node less 10%, / 8 GPUs"
    assert r.notes == ()
    # half the node's GPUs: its fair share per GPU, not all of its CPUs
    assert fit("gpu", [H100], 4, 1, None, None).cpus_per_gpu == 8


def test_mixed_partition_sizes_for_the_nodes_that_can_run_the_job():
    nodes = [A100, V100, Node("v002", "gpu", 40, 384000, 4, "allocated")]
    # 8 tasks: only a001 has 8 GPUs; the V100 nodes do not count
    r = fit("gpu", nodes, 8, 1, None, None)
    assert (r.cpus_per_gpu, r.mem_per_gpu) == (16, "113G")
    assert r.notes == (
        "mixed partition: 1 of the 3 nodes of partition gpu can run 8 tasks (8+ GPUs); sized to fit each of them, "
        "the smallest share per GPU being a001 (128 CPUs, 1031000 MB, 8 GPUs)",
    )
    # 4 tasks: every node can; sized for the smallest share per GPU (v001: 10 CPUs, 84G per GPU)
    r = fit("gpu", nodes, 4, 1, None, None)
    assert (r.cpus_per_gpu, r.mem_per_gpu) == (10, "84G")
    assert "3 of the 3 nodes" in r.notes[0] and "v001 (40 CPUs, 384000 MB, 4 GPUs)" in r.notes[0]
    # --constraint a100 (a feature of the node): the V100s are out, nothing mixed
    tagged = [Node("a001", "gpu", 128, 1031000, 8, "idle", ("a100",)),
              Node("v001", "gpu", 40, 384000, 4, "idle", ("v100",))]  # fmt: skip
    r = fit("gpu", tagged, 4, 1, None, None, constraint="a100")
    assert (r.cpus_per_gpu, r.notes) == (16, ())


def test_nodes_that_are_down_still_count_and_the_note_says_the_job_waits():
    drained = Node("h002", "gpu", 64, 515000, 8, "drained")
    r = fit("gpu", [H100, drained], 8, 2, None, None)
    assert (r.cpus_per_gpu, r.mem_per_gpu) == (8, "56G")
    assert r.notes == (
        "only 1 of the 2 node(s) of partition gpu that fit the job are up (the others: h002 (drained)): it waits "
        "until 2 are",
    )


def test_chosen_numbers_are_kept_and_checked():
    r = fit("gpu", [H100], 8, 1, 4, "32G", chosen_by=("you: --cpus-per-gpu", "recipe: launch.mem_per_gpu"))
    assert (r.cpus_per_gpu, r.mem_per_gpu) == (4, "32G")
    assert r.cpus_source == "you: --cpus-per-gpu; fits partition gpu: 64 CPUs per node"
    assert r.mem_source == "recipe: launch.mem_per_gpu; fits partition gpu: 515000 MB per node"


@pytest.mark.parametrize(
    ("nodes", "tasks", "need", "cpus", "mem", "message"),
    [
        ([H100], 8, 1, 10, None, "10 CPUs per GPU (you: --cpus-per-gpu) × 8 tasks per node = 80 CPUs, but the nodes "
                                 "of partition gpu have at most 64: use --cpus-per-gpu 8 (launch.cpus_per_gpu=8)"),
        ([H100], 8, 1, None, "64G", "64G per GPU (you: --mem-per-gpu) × 8 tasks per node = 512G, but the nodes "
                                    "of partition gpu have at most 515000 MB (sinfo %m): use --mem-per-gpu 62G "
                                    "(launch.mem_per_gpu=62G)"),
        ([V100], 8, 1, None, None, "8 GPUs per node, but the nodes of partition gpu have at most 4: use "
                                   "--gpus-per-node 4 (launch.gpus_per_node=4)"),
        ([H100, V100], 8, 2, None, None, "the job needs 2 nodes with 8+ GPUs, but partition gpu has 1: use --gpus 8 "
                                         "or fewer"),
        ([A100, H100], 8, 2, 12, None, "12 CPUs per GPU (you: --cpus-per-gpu) × 8 tasks per node = 96 CPUs, but "
                                       "1 node(s) of partition gpu have that many (the job needs 2): use --cpus-per-gpu 8 "
                                       "(launch.cpus_per_gpu=8)"),
        ([Node("c001", "cpu", 64, 256000, 0, "idle")], 1, 1, None, None, "partition gpu has no GPUs (no gpu GRES on "
                                                                         "its nodes): choose a GPU partition with "
                                                                         "--partition"),
    ],
    ids=["cpus", "mem", "gpus-per-node", "nodes", "cpus-2-nodes", "no-gpus"],
)  # fmt: skip
def test_what_cannot_fit_is_refused_with_the_flag(nodes, tasks, need, cpus, mem, message):
    with pytest.raises(ResourceError) as e:
        fit("gpu", nodes, tasks, need, cpus, mem)
    assert str(e.value).startswith(message), str(e.value)


def test_without_sinfo_the_dry_run_keeps_the_defaults_and_says_why(capsys, imagenet_layout, monkeypatch):
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))  # python, no SLURM clients
    code, out, err = _main(capsys, "--arch", "vgg11", "--gpus", "8", "--run-dir", "/shared/r", "--data",
                           str(imagenet_layout), "--dry-run")  # fmt: skip
    assert code == 0, err
    assert "# cpus per task: 10 (default; sinfo unavailable: sinfo not found on PATH)" in out
    assert "# memory: 64G per GPU, 512G per node (default; sinfo unavailable: sinfo not found on PATH)" in out
    assert "#SBATCH --cpus-per-task=10" in out
    # --cluster local asks no SLURM; a given value is the user's
    code, out, err = _main(capsys, "--arch", "vgg11", "--gpus", "1", "--cluster", "local", "--cpus-per-gpu", "3",
                           "--run-dir", "/shared/r", "--data", str(imagenet_layout), "--dry-run")  # fmt: skip
    assert code == 0, err
    assert "# cpus per task: 3 (you: --cpus-per-gpu)" in out
    assert "# memory: 64G per GPU, 64G per node (default; --cluster local does not ask SLURM)" in out


def _main(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = launch.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.slurm
def test_local_cluster_sinfo_sizes_the_job_and_refuses_what_cannot_fit(
    capsys, slurm_env, small_tree, tmp_path
):
    """The numbers come from the test cluster's real sinfo (64 CPUs, 1 TiB, gres gpu:8 declared); a request over
    them is refused before anything is submitted; the derived one is accepted by sbatch."""
    lines = slurm_env.run("sinfo", "-N", "-h", "-o", "%P|%N|%c|%m|%G|%T|%f").stdout
    (node,) = parse_sinfo(lines)
    assert (node.partition, node.cpus, node.gpus, node.default) == (slurm_env.partition, 64, 8, True)
    share_mb = int(node.mem_mb * 0.9) // 8 // 1024 * 1024
    args = ["--arch", "vgg11", "--gpus", "2", "--data", str(small_tree), "model.num_classes=4",
            "log.wandb_mode=disabled", "--time", "00:15:00"]  # fmt: skip
    run_dir = tmp_path / "fit"
    code, out, err = _main(capsys, *args, "--run-dir", str(run_dir), "--dry-run")
    assert code == 0, err
    assert f"# cpus per task: 8 (sinfo: partition {node.partition}, 64 CPUs / 8 GPUs per node)" in out
    assert (
        f"# memory: {share_mb // 1024}G per GPU, {share_mb * 2 // 1024}G per node (sinfo: partition " in out
    )
    assert "#SBATCH --cpus-per-task=8" in out and f"#SBATCH --mem={share_mb * 2 // 1024}G" in out

    # oversized: refused in one line naming the flag, exit 2, nothing submitted
    too_big = tmp_path / "too-big"
    for extra, fix in [(("--gpus", "8", "--cpus-per-gpu", "10"), "use --cpus-per-gpu 8 (launch.cpus_per_gpu=8)"),
                       (("--mem-per-gpu", "600G"), "use --mem-per-gpu 512G (launch.mem_per_gpu=512G)"),
                       (("--gpus", "16", "--gpus-per-node", "16"), "use --gpus-per-node 8"),
                       (("--partition", "nosuch"), "partition 'nosuch' does not exist (sinfo lists: debug*; * is the "
                                                   "default): use --partition debug"),
                       (("--partition", "debug,nosuch"), "partition 'nosuch' does not exist")]:  # fmt: skip
        code, out, err = _main(capsys, *args, *extra, "--run-dir", str(too_big))
        assert code == 2 and out == "" and err.count("\n") == 1 and fix in err, err
    assert not too_big.exists()
    queued = slurm_env.run("squeue", "-h", "-n", f"vgg-{too_big.name}", "-o", "%i").stdout
    assert queued.strip() == ""

    # the derived request is one sbatch accepts: submitted held (never runs), then cancelled
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = launch.main([*args, "--run-dir", str(run_dir), "--sbatch", "hold"])
    assert code == 0, capsys.readouterr().err
    job_id = next(ln.split()[2] for ln in stdout.getvalue().splitlines() if ln.startswith("submitted job"))
    try:
        shown = slurm_env.run("scontrol", "show", "job", job_id).stdout
        assert "CPUs/Task=8" in shown and f"MinMemoryNode={share_mb * 2 // 1024}G" in shown, shown
    finally:
        slurm_env.run("scancel", job_id, check=False)
