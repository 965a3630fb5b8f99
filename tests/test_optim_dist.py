"""Schedules, weight-decay groups, distributed environment detection, paper initialisation from net A."""

from __future__ import annotations

import itertools
import os

import pytest
import torch

from train import distributed
from train.config import load_config
from train.init import init_from_checkpoint
from train.models import build_model
from train.optim import Schedule, build_optimizer, param_groups


def _schedule(name: str, *overrides: str) -> Schedule:
    cfg = load_config(name, list(overrides))
    return Schedule(cfg, build_optimizer(cfg, torch.nn.Linear(2, 2)))


@pytest.mark.parametrize(("arch", "lr"), [("vgg16", 0.01), ("vgg16_bn", 0.1)])
def test_torchvision_step_schedule(arch, lr):
    s = _schedule(arch)
    expected = [lr] * 30 + [lr / 10] * 30 + [lr / 100] * 30
    assert [s.lr_at(e) for e in range(90)] == pytest.approx(expected, rel=1e-12)


def test_warmup_then_step():
    s = _schedule("vgg16_bn", "sched.warmup_epochs=5", "sched.warmup_factor=0.1")
    assert [s.lr_at(e) for e in range(6)] == pytest.approx([0.01, 0.028, 0.046, 0.064, 0.082, 0.1])
    assert s.lr_at(30) == pytest.approx(0.01)


def test_cosine_ends_near_zero():
    s = _schedule("vgg16_bn", "sched.name=cosine", "sched.epochs=10")
    lrs = [s.lr_at(e) for e in range(10)]
    assert lrs[0] == pytest.approx(0.1) and all(a > b for a, b in itertools.pairwise(lrs))


def test_paper_plateau_drops_at_most_three_times_and_resumes():
    s = _schedule("paper/vgg16", "sched.plateau_patience=1")
    lrs = []
    for epoch in range(14):
        lrs.append(s.start_epoch(epoch))
        s.end_epoch(epoch, 60.0)  # no improvement after the first epoch
    assert lrs[0] == 0.01 and min(lrs) == pytest.approx(1e-5) and s.drops == 3
    assert sorted(set(round(x, 12) for x in lrs)) == [1e-5, 1e-4, 1e-3, 1e-2]
    # the plateau state survives a checkpoint round trip
    t = _schedule("paper/vgg16", "sched.plateau_patience=1")
    t.load_state_dict(s.state_dict())
    assert t.lr_at(14) == s.lr_at(14) and t.drops == 3


def test_plateau_keeps_lr_while_improving():
    s = _schedule("paper/vgg16", "sched.plateau_patience=0")
    for epoch in range(5):
        assert s.start_epoch(epoch) == 0.01
        s.end_epoch(epoch, 50.0 + epoch)  # +1 point per epoch > 0.1 threshold


def test_no_weight_decay_on_bn_and_bias_by_module_type():
    model = build_model("vgg11_bn", num_classes=10, classifier_width=16)
    decay, no_decay = param_groups(model, 5e-4, decay_norm_and_bias=False)
    no_decay_ids = {id(p) for p in no_decay["params"]}
    bn = model.features[1]  # named "features.1": a name rule like "'bn' in name" would miss it
    assert isinstance(bn, torch.nn.BatchNorm2d)
    assert id(bn.weight) in no_decay_ids and id(bn.bias) in no_decay_ids
    assert id(model.features[0].bias) in no_decay_ids and id(model.features[0].weight) not in no_decay_ids
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 5e-4
    n = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == n
    (everything,) = param_groups(model, 1e-4, decay_norm_and_bias=True)
    assert len(everything["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, (0, 0, 1, "single")),
        ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3"}, (3, 3, 8, "torchrun")),
        ({"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1"}, (9, 1, 16, "slurm")),
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0"}, (0, 0, 1, "single")),
        (  # torchrun inside a SLURM allocation: torchrun's variables win
            {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"},
            (1, 1, 2, "torchrun"),
        ),
    ],
)
def test_detect(monkeypatch, env, expected):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert distributed.detect() == expected


# (dist.device, local rank, visible GPUs, SLURM's GPU variables) → the device, or the start of the one-line error
DEVICE_CASES = [
    ("auto", 0, 0, {}, "cpu"),  # a CPU machine
    ("auto", 1, 0, {}, "cpu"),
    ("auto", 0, 1, {}, "cuda:0"),
    ("auto", 3, 1, {"SLURM_GPUS_ON_NODE": "1"}, "cuda:0"),  # --gpus-per-task=1 / --gpu-bind: one GPU per task
    ("auto", 0, 8, {}, "cuda:0"),
    ("auto", 7, 8, {"SLURM_GPUS_ON_NODE": "8"}, "cuda:7"),
    ("auto", 8, 8, {}, "error: local rank 8 but only 8 visible GPUs"),
    ("auto", 2, 2, {}, "error: local rank 2 but only 2 visible GPUs"),
    ("auto", 0, 0, {"SLURM_GPUS_ON_NODE": "8"}, "error: SLURM gave this task GPUs (SLURM_GPUS_ON_NODE=8"),
    ("auto", 1, 0, {"SLURM_STEP_GPUS": "0,1"}, "error: SLURM gave this task GPUs (SLURM_STEP_GPUS=0,1"),
    ("auto", 0, 0, {"SLURM_GPUS_ON_NODE": "0"}, "cpu"),  # a CPU-only job step
    ("cpu", 0, 8, {"SLURM_GPUS_ON_NODE": "8"}, "cpu"),  # the fake-GPU test cluster: CPU on purpose
    ("cpu", 5, 8, {}, "cpu"),
    ("cuda", 0, 0, {}, "error: dist.device=cuda but torch sees no GPU"),
    ("cuda", 0, 0, {"SLURM_JOB_GPUS": "0"}, "error: SLURM gave this task GPUs (SLURM_JOB_GPUS=0"),
    ("cuda", 1, 8, {}, "cuda:1"),
]


@pytest.mark.parametrize(("requested", "local_rank", "visible", "env", "expected"), DEVICE_CASES)
def test_device_for_0_1_and_8_visible_gpus(requested, local_rank, visible, env, expected):
    if expected.startswith("error: "):
        with pytest.raises(distributed.DistError) as e:
            distributed.choose_device(requested, local_rank, visible > 0, visible, env)
        assert str(e.value).startswith(expected[len("error: ") :]) and "\n" not in str(e.value)
    else:
        assert str(distributed.choose_device(requested, local_rank, visible > 0, visible, env)) == expected


def test_a_task_given_gpus_where_torch_sees_none_stops_at_once_with_one_line(small_tree, tmp_path):
    """SLURM's GPU variables on this CPU-only machine are a node whose driver torch cannot use: stop before
    anything is built (one line: what was allocated, what torch sees, the build's CUDA, the driver), not days of
    CPU training. dist.device=cpu is the way to train on the CPU there on purpose."""
    from tests.conftest import run_cli

    env = {**os.environ, "SLURM_GPUS_ON_NODE": "8", "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}
    args = ("-m", "train", "--config", "demo", f"data.root={small_tree}", f"run_dir={tmp_path / 'run'}",
            "model.num_classes=4", "log.wandb_mode=disabled")  # fmt: skip
    out = run_cli(*args, env=env, timeout=120)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith(
        "error: SLURM gave this task GPUs (SLURM_GPUS_ON_NODE=8, CUDA_VISIBLE_DEVICES=0,1,2,"
    )
    assert f"torch {torch.__version__} is built for CUDA {torch.version.cuda}" in line
    assert "dist.device=cpu" in line and not (tmp_path / "run" / "last.pth").exists()


# Node lists as SLURM writes them in SLURM_JOB_NODELIST (zero-padded ranges, several groups, dashes in names).
NODELISTS = [
    ("gpu-a[001-004,010],gpu-b7", ["gpu-a001", "gpu-a002", "gpu-a003", "gpu-a004", "gpu-a010", "gpu-b7"]),
    ("node[01-02]", ["node01", "node02"]),
    ("node[1-2]", ["node1", "node2"]),
    ("gpu07", ["gpu07"]),
    ("node[3,5],cpu1", ["node3", "node5", "cpu1"]),
    ("a-b-c[008-010]", ["a-b-c008", "a-b-c009", "a-b-c010"]),
    ("n[1-2]-ib[3-4]", ["n1-ib3", "n1-ib4", "n2-ib3", "n2-ib4"]),
]


@pytest.mark.slurm
@pytest.mark.parametrize(("nodelist", "hosts"), NODELISTS, ids=[n for n, _ in NODELISTS])
def test_rendezvous_host_from_scontrol_show_hostnames(slurm_env, monkeypatch, nodelist, hosts):
    """SLURM's own expansion (``scontrol show hostnames`` with the test cluster's slurm.conf) of real node-list
    forms; rank 0 runs on the first host, the rendezvous address."""
    calls = []
    real_run = distributed.subprocess.run
    monkeypatch.setattr(
        distributed.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or real_run(cmd, **kw)
    )
    assert distributed.slurm_hostnames(nodelist) == hosts
    assert distributed.first_host(nodelist) == hosts[0]
    assert [c[1:] for c in calls] == [["show", "hostnames", nodelist]] * 2  # SLURM's answer, not the fallback


@pytest.mark.parametrize(("nodelist", "hosts"), NODELISTS, ids=[n for n, _ in NODELISTS])
def test_rendezvous_host_without_scontrol_uses_submitits_parser(monkeypatch, tmp_path, nodelist, hosts):
    """Where SLURM's clients are missing, submitit's parser (behind ``JobEnvironment().hostnames``) gives the
    same list."""
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol there
    assert distributed.slurm_hostnames(nodelist) == hosts
    # inside a job: what submitit's JobEnvironment (the launcher's jobs) says
    import submitit

    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setenv("SLURM_JOB_NODELIST", nodelist)
    assert submitit.JobEnvironment().hostnames == hosts


def test_a_malformed_node_list_is_one_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # submitit's parser; SLURM never writes such a list
    with pytest.raises(distributed.DistError, match=r"^cannot parse SLURM node list 'gpu\[01-'$"):
        distributed.slurm_hostnames("gpu[01-")


def test_master_port_is_below_the_ephemeral_range_and_per_job_run():
    lo, _ = distributed.ephemeral_port_range()
    ports = {distributed.master_port(str(job), restart) for job in range(1000, 1200) for restart in (0, 1)}
    # below the ephemeral range, unless it leaves no room there
    assert all(1024 <= p < lo for p in ports) or lo <= 21000
    assert len(ports) > 350  # per (job, restart): a requeued job does not reuse its last port
    assert distributed.master_port("1234", 2) == distributed.master_port("1234", 2)  # the same on every task


def test_single_process_setup_picks_cpu_here(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # as SLURM sets it on GPU-less test nodes
    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    info = distributed.setup()
    if not torch.cuda.is_available():
        assert info.device == torch.device("cpu")
    assert info.world_size == 1 and info.is_main and not info.distributed


def test_init_from_net_a(tmp_path):
    a = build_model("vgg11", num_classes=10, classifier_width=32)
    torch.save({"model": a.state_dict()}, tmp_path / "a.pth")
    d = build_model("vgg16", num_classes=10, classifier_width=32)
    before = d.features[2].weight.clone()
    copied = init_from_checkpoint(d, str(tmp_path / "a.pth"))
    assert len(copied) == 14  # 4 convs + 3 FC, weight and bias each
    # A's convs 1-4 land at (block, position) (1,1), (2,1), (3,1), (3,2) of D: features 0, 5, 10, 12
    for a_idx, d_idx in [(0, 0), (3, 5), (6, 10), (8, 12)]:
        assert torch.equal(d.features[d_idx].weight, a.features[a_idx].weight)
    assert torch.equal(d.classifier[6].weight, a.classifier[6].weight)
    assert torch.equal(d.features[2].weight, before)  # intermediate layers stay random
    wrong = build_model("vgg16", num_classes=5, classifier_width=32)
    with pytest.raises(
        ValueError, match=r"classifier.6.weight \(10, 32\) .* does not fit classifier.6.weight \(5, 32\)"
    ):
        init_from_checkpoint(wrong, str(tmp_path / "a.pth"))
