"""Two SLURM nodes on this machine (``slurm/local_cluster.sh up --nodes 2``: node1 and node2, each a slurmd in a
network namespace of its own with its own hostname and address): the cluster itself, and the demo recipe as a
2-node job (one task per node, gloo) checked from its own logs and outputs against 2 processes on one node.

    .venv/bin/python -m pytest tests/test_multinode.py -rA      # as root (network namespaces, daemons)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import submitit
import torch

from data_pipeline.loader import train_steps
from tests.conftest import run_cli
from tests.slurm_cluster import SCRIPT, SlurmCluster, leftovers, net_tag
from tests.test_launch import (
    LAUNCH,
    STEPS,
    _stops,
    assert_same_weights,
    clean_env,
    metrics,
    small,
    submitted,
    val_metrics,
)

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def tree(small_tree: Path) -> Path:
    return small_tree


@pytest.fixture(scope="module")
def one_node(tree: Path, tmp_path_factory) -> tuple[Path, float]:
    """The same config as 2 processes on one node (``--cluster local``): the run the 2-node jobs must equal."""
    ref_dir = tmp_path_factory.mktemp("one_node") / "run"
    t0 = time.monotonic()
    ref = run_cli(LAUNCH, *small(tree, ref_dir, "--cluster", "local", "log.sample_ids=true"), env=clean_env(),
                  timeout=600)  # fmt: skip
    assert ref.returncode == 0, ref.stdout[-2000:] + ref.stderr[-3000:]
    return ref_dir, time.monotonic() - t0


def test_two_nodes_with_their_own_hostnames_and_addresses(
    slurm_cluster2: SlurmCluster, tmp_path: Path
) -> None:
    """sinfo lists node1 and node2 idle with 8 (fake) GPUs each; a 2-node job's tasks run one per node, each
    under its node's hostname and address, and resolve each other by name (what the rendezvous needs)."""
    nodes = slurm_cluster2.run("sinfo", "-h", "-N", "-o", "%N|%T|%G").stdout.split()
    assert [n.split("|")[0] for n in nodes] == ["node1", "node2"], nodes
    assert all(n.split("|")[1] in {"idle", "mixed", "allocated"} and n.endswith("|gpu:8") for n in nodes), (
        nodes
    )

    out = tmp_path / "out.txt"
    script = (
        'srun bash -c \'echo $SLURM_PROCID $(hostname) $(ip -o -4 addr show dev eth0 | awk "{print \\$4}") '
        '$(getent hosts node1 | cut -d" " -f1) $(getent hosts node2 | cut -d" " -f1)\''
    )
    job = slurm_cluster2.run("sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--gres=gpu:1",
                             f"--output={out}", "--wait", "--wrap", script, timeout=120).stdout.strip()  # fmt: skip
    rows = sorted(line.split() for line in out.read_text().splitlines())
    assert [r[:2] for r in rows] == [["0", "node1"], ["1", "node2"]], rows
    addr1, addr2 = (r[2].split("/")[0] for r in rows)
    assert addr1 != addr2 and addr1.rsplit(".", 1)[0] == addr2.rsplit(".", 1)[0]  # one private /24
    assert all(r[3:] == [addr1, addr2] for r in rows), rows  # both nodes resolve both names the same way
    listed = slurm_cluster2.run("sacct", "-n", "-X", "-P", "-j", job, "-o", "NodeList").stdout.split()
    assert listed == ["node[1-2]"], listed


def _rank_lines(log: Path) -> dict[str, str]:
    """``rank R/W: host H (A), node N, local rank L; MASTER_ADDR M = A'; CPUs C (n), T intra-op thread(s)`` from a
    task's log, as a dict."""
    m = re.search(
        r"^rank (\d+)/(\d+): host (\S+) \((\S+)\), node (\d+), local rank (\d+); MASTER_ADDR (\S+) = (\S+); "
        r"CPUs [\d,-]+ \(\d+\), \d+ intra-op thread\(s\)$",
        log.read_text(),
        re.M,
    )
    assert m, log.read_text()[-2000:]
    keys = ("rank", "world", "host", "addr", "node", "local_rank", "master", "master_addr")
    return dict(zip(keys, m.groups(), strict=True))


def _samples(run_dir: Path, epoch: int, rank: int) -> list[str]:
    return (run_dir / "samples" / f"epoch{epoch:03d}_rank{rank}.txt").read_text().splitlines()


def test_two_node_demo_equals_two_processes_on_one_node(
    slurm2_env: SlurmCluster, tree: Path, tmp_path: Path, one_node: tuple[Path, float]
):
    """The demo recipe (short schedule) on ``--gpus 2 --nodes 2``: one task on node1, one on node2, gloo across
    the bridge. From the job's own logs and outputs: world size 2 over two hostnames, rank 1 rendezvouses on rank
    0's host and address; every epoch's train images are each trained exactly once over both nodes (each rank's
    list is also the one-node run's); validation counts every image once; and the final weights equal a
    2-process run on one node of the same config, bitwise (CPU, torchvision backend, deterministic)."""
    (ref_dir, t_ref), run_dir = one_node, tmp_path / "two_nodes"

    args = small(tree, run_dir, "--cluster", "slurm", "--nodes", "2", "--partition", slurm2_env.partition,
                 "--wait", "log.sample_ids=true")  # fmt: skip
    t0 = time.monotonic()
    out = run_cli(LAUNCH, *args, env=clean_env(), timeout=600)
    t_run = time.monotonic() - t0
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    job_id = submitted(out.stdout)
    print(f"2 processes on one node (--cluster local): {t_ref:.1f} s; 2 nodes (submit → done): {t_run:.1f} s")
    assert "2 node(s) × 1 GPU(s) = 2 task(s)" in out.stdout
    # --nodes 2 was the user's choice, not the launcher's: no note about choosing it
    assert "note: 2 GPUs on 8-GPU nodes" not in out.stdout
    assert "2 task(s) on 2 node(s)" in out.stdout  # rank 0's log, followed by --wait

    # who ran where, from each task's own log
    folder = run_dir / "slurm" / job_id
    r0, r1 = (_rank_lines(folder / f"{job_id}_{t}_log.out") for t in (0, 1))
    assert (r0["rank"], r1["rank"], r0["world"], r1["world"]) == ("0", "1", "2", "2")
    assert (r0["host"], r1["host"]) == ("node1", "node2")
    assert (r0["node"], r1["node"], r0["local_rank"], r1["local_rank"]) == ("0", "1", "0", "0")
    assert r0["addr"] != r1["addr"]
    # rank 1 (node2) rendezvouses on rank 0's host, which it resolves to rank 0's own address
    assert r0["master"] == r1["master"] == "node1"
    assert r1["master_addr"] == r0["addr"] == r0["master_addr"]
    nodelist = slurm2_env.run("sacct", "-n", "-X", "-P", "-j", job_id, "-o", "NodeList").stdout.split()
    assert nodelist == ["node[1-2]"]

    # every epoch: each train image trained exactly once over both nodes (none on both, none missing beyond
    # the declared drop), and each rank trained the images the one-node run's rank did
    train_files = {str(p.relative_to(tree / "train")) for p in (tree / "train").rglob("*.*")}
    # what the job declares (rank 0's log): steps per epoch × per-rank batch of the train images; drop the rest
    m = re.search(
        r"on 2 process\(es\) .*global batch (\d+), (\d+) steps/epoch, .*\(torchvision: (\d+) train / (\d+) val\)",
        out.stdout,
    )
    assert m, out.stdout[-3000:]
    global_batch, steps, total, n_val = (int(x) for x in m.groups())
    per_rank = steps * global_batch // 2
    assert total == len(train_files) and steps == train_steps(total, 2, global_batch // 2)
    for epoch in (1, 2):
        a, b = _samples(run_dir, epoch, 0), _samples(run_dir, epoch, 1)
        assert len(a) == len(b) == per_rank
        assert len(set(a)) == len(a) and len(set(b)) == len(b)
        assert not set(a) & set(b), f"epoch {epoch}: images on both nodes"
        assert set(a) | set(b) <= train_files
        assert len(set(a) | set(b)) == total - (total - 2 * per_rank)  # all but the declared drop
        assert (a, b) == (_samples(ref_dir, epoch, 0), _samples(ref_dir, epoch, 1))

    # validation: every val image counted once per epoch, the same numbers as on one node
    assert n_val == sum(1 for _ in (tree / "val").rglob("*.*"))
    assert [r["val_images"] for r in metrics(run_dir)] == [n_val, n_val]
    assert val_metrics(run_dir) == val_metrics(ref_dir)
    assert_same_weights(ref_dir, run_dir)

    speeds = [
        (r["epoch"], r["img_per_s"], s["img_per_s"])
        for r, s in zip(metrics(run_dir), metrics(ref_dir), strict=True)
    ]
    print(
        "img/s per epoch (2 nodes, 1 node × 2 processes): "
        + ", ".join(f"{e}: {a:.1f}, {b:.1f}" for e, a, b in speeds)
    )


def test_two_node_job_requeued_twice_resumes_on_both_nodes_to_the_same_weights(
    slurm2_env: SlurmCluster, tree: Path, tmp_path: Path, one_node: tuple[Path, float]
):
    """The 2-node job interrupted mid-run twice (USR2 alone, what SLURM sends before the time limit; then a
    preemption: SIGTERM, then USR2) requeues itself each time, starts again on both nodes, resumes there from
    last.pth and ends bitwise equal to the uninterrupted run, in one W&B run."""
    ref_dir, _ = one_node
    run_dir = tmp_path / "run"
    args = small(tree, run_dir, "--cluster", "slurm", "--nodes", "2", "--partition", slurm2_env.partition,
                 "log.wandb_mode=offline", "log.sample_ids=true", "data.workers=1")  # fmt: skip
    t0 = time.monotonic()
    out = run_cli(LAUNCH, *args, env=clean_env())
    assert out.returncode == 0, out.stderr
    job_id = submitted(out.stdout)
    wandb_id = re.search(r"^W&B: offline \(log.wandb_mode=offline\): new run (\w+), ", out.stdout, re.M)[1]
    folder = run_dir / "slurm" / job_id
    log = folder / f"{job_id}_0_log.out"
    job = submitit.SlurmJob(folder=run_dir / "slurm" / "%j", job_id=job_id, tasks=[0, 1])
    steps = run_dir / "steps.jsonl"

    def logged_step_above(step: int) -> bool:
        lines = steps.read_text().splitlines() if steps.is_file() else []
        return any(json.loads(line)["step"] > step for line in lines)

    stops: list[int] = []
    for timeout in (True, False):
        after = stops[-1] if stops else 0
        slurm2_env.wait_for(f"training past step {after}", lambda a=after: logged_step_above(a), timeout=300)
        job._interrupt(timeout=timeout)
        slurm2_env.start_requeued_now(job_id, timeout=120)
        stops = _stops(log)
    results = job.results()
    print(f"2 nodes: submit → 2 × (interrupt → requeue) → done: {time.monotonic() - t0:.1f} s")
    assert [(r["status"], r["epoch"], r["step"]) for r in results] == [("done", 2, STEPS)] * 2
    slurm2_env.wait_for("sacct COMPLETED", lambda: slurm2_env.sacct_states(job_id)[-1:] == ["COMPLETED"])
    assert slurm2_env.sacct_states(job_id, duplicates=True) == ["REQUEUED", "REQUEUED", "COMPLETED"]

    # every start ran on both nodes (each task's log is appended to by each start)
    for task, host in ((0, "node1"), (1, "node2")):
        text = (folder / f"{job_id}_{task}_log.out").read_text()
        assert re.findall(rf"^rank {task}/2: host (\S+) ", text, re.M) == [host] * 3, text[-3000:]
    text = log.read_text()
    assert text.count("this job is preempted") == 2 and "restart 1" in text and "restart 2" in text
    resumed = [
        int(m[1])
        for m in re.finditer(
            r"resumed from .*last\.pth at (?:epoch \d+, batch \d+|the end of epoch \d+) \(step (\d+)\)", text
        )
    ]
    assert resumed == stops and 0 < stops[0] < stops[1] <= STEPS, text
    # each node went on with the images it had left: every epoch's list, over the three starts, is the
    # uninterrupted run's
    for epoch in (1, 2):
        for rank in (0, 1):
            assert _samples(run_dir, epoch, rank) == _samples(ref_dir, epoch, rank), (epoch, rank)
    assert_same_weights(ref_dir, run_dir)
    assert val_metrics(run_dir) == val_metrics(ref_dir)
    assert torch.load(run_dir / "last.pth", weights_only=True)["wandb_id"] == wandb_id
    assert len(sorted(run_dir.glob(f"wandb/offline-run-*-{wandb_id}/run-{wandb_id}.wandb"))) == 3


def test_node_failure_ends_the_job_and_it_resumes_once_the_node_is_back(
    slurm2_env: SlurmCluster, tree: Path, tmp_path: Path
):
    """node2 dies mid-epoch (``local_cluster.sh node-fail 2``: its link goes down, then SIGKILL to its slurmd,
    step daemons and task; no signal reaches the job). Rank 0 on node1 waits in a collective that cannot
    finish; SLURM's node-failure handling ends it: node2 is DOWN after SlurmdTimeout (10 s here), the job run
    ends NODE_FAIL and SLURM requeues it (the launcher submits with --requeue). The run folder keeps an intact
    last.pth from the last save and whole metrics rows; once node2 is back the requeued job resumes from that
    last.pth on both nodes and finishes, without a user's command."""
    run_dir = tmp_path / "run"
    epochs, steps_per_epoch = 3, STEPS // 2
    args = small(tree, run_dir, "--cluster", "slurm", "--nodes", "2", "--partition", slurm2_env.partition,
                 f"sched.epochs={epochs}", "train.print_every=1")  # fmt: skip
    out = run_cli(LAUNCH, *args, env=clean_env())
    assert out.returncode == 0, out.stderr
    job_id = submitted(out.stdout)
    steps = run_dir / "steps.jsonl"

    def step_logged() -> int:
        lines = steps.read_text().splitlines() if steps.is_file() else []
        return max((json.loads(x)["step"] for x in lines if x.endswith("}")), default=0)

    # mid-epoch 2: epoch 1 is saved (last.pth), epoch 2 is under way
    slurm2_env.wait_for("a step of epoch 2", lambda: step_logged() > steps_per_epoch + 1, timeout=300)
    fail = _script_args(slurm2_env, "node-fail", "2")
    t_fail = time.monotonic()
    assert fail.returncode == 0, fail.stdout + fail.stderr

    # the job's run ends: NODE_FAIL in accounting, and nothing of it is left on node1
    slurm2_env.wait_for(
        "NODE_FAIL", lambda: "NODE_FAIL" in slurm2_env.sacct_states(job_id, True), timeout=120
    )
    t_end = time.monotonic() - t_fail
    slurm2_env.wait_for("node1 to hold only slurmd", lambda: _only_slurmd(slurm2_env), timeout=60)
    print(
        f"node2 killed → job run NODE_FAIL after {t_end:.1f} s, node1 clear after {time.monotonic() - t_fail:.1f} s"
    )
    assert t_end < 60, t_end  # SlurmdTimeout 10 s, plus SLURM's ping interval and KillWait (5 s)

    # what the run folder holds: last.pth whole (loads, at a save point), every metrics row whole
    state = torch.load(run_dir / "last.pth", weights_only=True)
    saved = state["step"]
    assert saved % steps_per_epoch == 0 and steps_per_epoch <= saved < epochs * steps_per_epoch, saved
    rows = metrics(run_dir)
    assert [r["epoch"] for r in rows] == list(range(1, saved // steps_per_epoch + 1))
    assert (run_dir / "metrics.jsonl").read_text().endswith("\n")
    # SLURM requeued it (still queued: COMPLETING until it gives up on node2's steps, then PENDING, held back by
    # the requeue delay). Nobody cancels or relaunches it: once node2 is back (responding, not only registered) the
    # requeued job starts by itself (here moved to now instead of after SLURM's ~120 s delay), resumes from that
    # last.pth on both nodes and finishes.
    assert slurm2_env.squeue_state(job_id) in {"COMPLETING", "PENDING"}
    back = _script_args(slurm2_env, "node-back", "2")
    assert back.returncode == 0, back.stdout + back.stderr
    t_back, state_back = time.monotonic(), _node_state(slurm2_env, "node2")
    slurm2_env.wait_for("node2 responding", lambda: _responding(slurm2_env, "node2"), timeout=60)
    print(f"node-back: node2 {state_back}, responding {time.monotonic() - t_back:.1f} s later")
    slurm2_env.start_requeued_now(job_id, timeout=120)
    # submitit's watcher takes the first run's NODE_FAIL for the job's end: wait for accounting's COMPLETED
    slurm2_env.wait_for("sacct COMPLETED", lambda: slurm2_env.sacct_states(job_id)[-1:] == ["COMPLETED"], 300)
    print(f"node2 killed → job COMPLETED by itself after {time.monotonic() - t_fail:.1f} s")
    assert slurm2_env.sacct_states(job_id, duplicates=True) == ["NODE_FAIL", "COMPLETED"]
    results = submitit.SlurmJob(folder=run_dir / "slurm" / "%j", job_id=job_id, tasks=[0, 1]).results()
    assert [(r["status"], r["epoch"], r["step"]) for r in results] == [
        ("done", epochs, STEPS // 2 * epochs)
    ] * 2
    folder = run_dir / "slurm" / job_id
    log = (folder / f"{job_id}_0_log.out").read_text()
    assert re.search(rf"resumed from .*last\.pth at the end of epoch {saved // steps_per_epoch} \(step {saved}\)",
                     log), log[-3000:]  # fmt: skip
    rank1 = (folder / f"{job_id}_1_log.out").read_text()
    assert re.findall(r"^rank 1/2: host (\S+) ", rank1, re.M) == ["node2", "node2"]
    assert [r["epoch"] for r in metrics(run_dir)] == list(range(1, epochs + 1))
    assert not (run_dir / "retries.jsonl").exists()  # SLURM's requeue, not a retry of ours


def _responding(cluster: SlurmCluster, node: str) -> bool:
    """The node is up and answering slurmctld's pings: a step on a node still flagged NOT_RESPONDING is refused
    with "Requested nodes are busy" (srun then waits and retries)."""
    state = _node_state(cluster, node)
    return "NOT_RESPONDING" not in state and "DOWN" not in state and not state.endswith("*")


def _node_state(cluster: SlurmCluster, node: str) -> str:
    m = re.search(r"State=(\S+)", cluster.run("scontrol", "show", "node", node).stdout)
    return m[1] if m else ""


def _script_args(cluster: SlurmCluster, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SLURM_LOCAL_DIR": str(cluster.state_dir)}
    return subprocess.run(["bash", str(SCRIPT), *argv], env=env, capture_output=True, text=True, timeout=120)


def _only_slurmd(cluster: SlurmCluster) -> bool:
    ns = f"vgg-{net_tag(cluster.state_dir)}-node1"
    pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
    comms = []
    for p in pids:
        try:
            comms.append(Path(f"/proc/{p}/comm").read_text().strip())
        except OSError:
            continue
    return comms == ["slurmd"]


def test_down_removes_every_namespace_and_veth_and_up_again(slurm_cluster2: SlurmCluster) -> None:
    """``down`` stops every daemon of the 2-node cluster and removes its namespaces, veths and bridge; ``up``
    brings it back (later tests keep using it)."""
    with slurm_cluster2.alone():
        t0 = time.monotonic()
        down = slurm_cluster2.script("down")
        t_down = time.monotonic() - t0
        assert down.returncode == 0, down.stdout + down.stderr
        assert leftovers(slurm_cluster2.state_dir, 2) == []
        t0 = time.monotonic()
        up = slurm_cluster2.script("up")
        t_up = time.monotonic() - t0
        assert up.returncode == 0, up.stdout + up.stderr
        print(f"2-node cluster: down {t_down:.1f} s, up again {t_up:.1f} s")
        assert slurm_cluster2.run("sinfo", "-h", "-N", "-o", "%N").stdout.split() == ["node1", "node2"]
