"""The training engine on real JPEG trees: 2-process gloo DDP, exact resume, outputs, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torchvision

from data_pipeline.layout import index_split
from data_pipeline.loader import epoch_shards
from tests.conftest import REPO, run_cli
from tests.test_loaders import opened_files
from tests.wandb_files import run_files
from train import distributed, engine
from train.checkpoint import load_checkpoint_file
from train.config import load_config
from train.engine import StopVote, Trainer, train
from train.report import ETA

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def tree(small_tree: Path) -> Path:
    return small_tree


def overrides(tree: Path, run_dir: Path, *extra: str) -> list[str]:
    """A vgg11_bn small enough for seconds per epoch on 2 cores."""
    return [
        f"data.root={tree}",
        f"run_dir={run_dir}",
        "data.backend=torchvision",
        "data.batch_size=8",
        "data.workers=0",
        "data.train_crop=32",
        "data.val_resize=36",
        "data.val_crop=32",
        "model.num_classes=4",
        "model.classifier_width=32",
        "sched.epochs=3",
        "sched.name=step",  # not the demo's cosine: a shortened run (sched.epochs=2) below is a prefix of this one
        "sched.step_size=2",
        "sched.warmup_epochs=0",
        "optim.lr=0.01",
        "train.print_every=2",
        "train.deterministic=true",
        "log.wandb_mode=disabled",
        "launch.gpus=2",
        *extra,
    ]


@pytest.fixture
def deterministic():
    yield
    torch.use_deterministic_algorithms(False)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint_file(run_dir / "last.pth")["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_after_epoch_and_mid_epoch_is_exact(tree, tmp_path, deterministic):
    full = train(load_config("demo", overrides(tree, tmp_path / "full")))
    assert full["status"] == "done" and full["epoch"] == 3
    # stopped after epoch 2 (a shorter run), then resumed to 3
    train(load_config("demo", overrides(tree, tmp_path / "split", "sched.epochs=2")))
    resumed = train(load_config("demo", overrides(tree, tmp_path / "split")))
    assert resumed["epoch"] == 3 and resumed["step"] == full["step"]
    assert_same_weights(weights(tmp_path / "full"), weights(tmp_path / "split"))
    # stopped mid-epoch (as on a SLURM time limit; one process: after the step it was asked in), then resumed
    trainer = Trainer(load_config("demo", overrides(tree, tmp_path / "mid")), distributed.setup())
    trainer.stop_requested = True
    assert trainer.run()["status"] == "interrupted"
    state = load_checkpoint_file(tmp_path / "mid" / "last.pth")
    assert (state["epoch"], state["batch_in_epoch"]) == (0, 1)
    mid_cfg = load_config("demo", overrides(tree, tmp_path / "mid"))
    with opened_files(tree / "train") as opened:
        assert train(mid_cfg)["status"] == "done"
    assert_same_weights(weights(tmp_path / "full"), weights(tmp_path / "mid"))
    # the resumed epoch started at batch 1 without reading batch 0 (1 process, 7 batches of 8 per epoch)
    samples = index_split(tree, "train").samples
    epoch0 = [samples[i][0] for i in epoch_shards(len(samples), 1, mid_cfg.seed, 0)[0]]
    assert len(samples) == 56 and len(opened) == (3 * 7 - 1) * 8
    assert opened[: 6 * 8] == epoch0[1 * 8 :]

    # and the interrupted epoch's train statistics continue where they stopped
    def epoch_log(run: str) -> list[dict]:
        return [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    for full_epoch, mid_epoch in zip(epoch_log("full"), epoch_log("mid"), strict=True):
        for key in ("train_loss", "train_top1_err", "train_top5_err", "val_top1_err", "val_loss"):
            assert full_epoch[key] == mid_epoch[key], key
    # the epoch log was not duplicated by the resume
    epochs = [
        json.loads(line)["epoch"] for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    ]
    assert epochs == [1, 2, 3]


def dali(tree: Path, run_dir: Path, *extra: str) -> list[str]:
    """``overrides`` on the DALI-CPU backend, batch 4: 14 steps an epoch, so a stop at step 7 is mid-epoch."""
    return overrides(tree, run_dir, "data.backend=dali", "data.dali_device=cpu", "data.workers=1",
                     "data.batch_size=4", "sched.epochs=2", "sched.step_size=1", *extra)  # fmt: skip


def stop_at(monkeypatch, trainer: Trainer, step: int) -> None:
    """Ask ``trainer`` to stop once it has taken global step ``step`` (one process: it stops right there)."""
    real = engine.train_step

    def counted(*args, **kwargs):
        out = real(*args, **kwargs)
        trainer.stop_requested = trainer.step + 1 >= step
        return out

    monkeypatch.setattr(engine, "train_step", counted)


def signalled_after_a_step(args: list[str], run_dir: Path, sig: signal.Signals) -> tuple[int, str]:
    """Start ``python -m train --config demo ARGS`` in a process group of its own, send ``sig`` to the group (as a
    terminal's Ctrl-C or scancel does) once it has logged a step; its exit status and stderr."""
    argv = [sys.executable, "-m", "train", "--config", "demo", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    steps = run_dir / "steps.jsonl"
    deadline = time.monotonic() + 180
    while not (steps.is_file() and steps.read_text().strip()) and proc.poll() is None:
        assert time.monotonic() < deadline, "no step logged in 180 s"
        time.sleep(0.1)
    os.killpg(proc.pid, sig)
    _, err = proc.communicate(timeout=180)
    return proc.returncode, err


@pytest.fixture(scope="module")
def dali_full(tree: Path, tmp_path_factory) -> Path:
    """An uninterrupted DALI-CPU run (2 epochs of 14 steps): the reference of the DALI resume tests."""
    run_dir = tmp_path_factory.mktemp("dali") / "full"
    try:
        result = train(load_config("demo", dali(tree, run_dir)))
    finally:
        torch.use_deterministic_algorithms(False)
    assert (result["status"], result["step"]) == ("done", 28)
    return run_dir


# The paper's augmentation: scale jitter (S drawn per image), random crop offsets, flip, PCA colour shift.
PAPER_AUGMENT = ("data.augment=scale", "data.scale_min=36", "data.scale_max=48", "data.color_pca_std=0.1")


@pytest.mark.parametrize("augment", ["rrc", "paper"])
def test_dali_cpu_resume_mid_epoch_is_exact(tree, tmp_path, deterministic, monkeypatch, dali_full, augment):
    """Stopped at step 7 of a 14-step epoch and resumed, a DALI-CPU run ends with the uninterrupted run's weights:
    last.pth keeps the pipeline's DALI checkpoint (reader position and the state of its random operators), with
    torchvision's augmentation (random-resized crop, flip) and the paper's (scale jitter, crop offsets, flip,
    colour shift)."""
    extra = PAPER_AUGMENT if augment == "paper" else ()
    if augment == "paper":
        full = train(load_config("demo", dali(tree, tmp_path / "full", *extra)))
        assert (full["status"], full["step"]) == ("done", 28)
    reference = dali_full if augment == "rrc" else tmp_path / "full"
    trainer = Trainer(load_config("demo", dali(tree, tmp_path / "mid", *extra)), distributed.setup())
    stop_at(monkeypatch, trainer, 7)
    assert trainer.run()["status"] == "interrupted"
    monkeypatch.undo()
    state = load_checkpoint_file(tmp_path / "mid" / "last.pth")
    assert (state["epoch"], state["batch_in_epoch"], state["step"]) == (0, 7, 7)
    (saved,) = state["loader_state"]  # one per rank
    assert (saved["backend"], saved["epoch"], saved["batch"], saved["world_size"]) == ("dali-cpu", 0, 7, 1)
    assert isinstance(saved["pipeline"], bytes) and 0 < len(saved["pipeline"]) < 64_000
    assert train(load_config("demo", dali(tree, tmp_path / "mid", *extra)))["status"] == "done"
    log = (tmp_path / "mid" / "train.log").read_text()
    assert "resumed from" in log and "augmentation" not in log
    assert_same_weights(weights(reference), weights(tmp_path / "mid"))


def test_sigterm_on_dali_saves_its_pipeline_and_the_same_command_resumes_exactly(tree, tmp_path, dali_full):
    """``python -m train`` on DALI-CPU, stopped by SIGTERM to its process group (what scancel and a terminal's
    Ctrl-C do, the latter with SIGINT) mid-epoch: exit status 143, last.pth with the pipeline's checkpoint; the same
    command ends with the uninterrupted run's weights."""
    run_dir = tmp_path / "run"
    code, err = signalled_after_a_step(dali(tree, run_dir), run_dir, signal.SIGTERM)
    assert code == 143, err[-3000:]
    assert f"interrupted (SIGTERM): saved {run_dir}/last.pth" in err and "Traceback" not in err, err
    state = load_checkpoint_file(run_dir / "last.pth")
    assert state["epoch"] == 0 and 0 < state["batch_in_epoch"] < 14, (state["epoch"], state["batch_in_epoch"])
    (saved,) = state["loader_state"]
    assert (saved["epoch"], saved["batch"]) == (0, state["batch_in_epoch"])
    again = run_cli("-m", "train", "--config", "demo", *dali(tree, run_dir))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "augmentation" not in again.stdout + again.stderr
    assert_same_weights(weights(dali_full), weights(run_dir))


def test_dali_resume_without_its_pipeline_state_warns_once_and_goes_on(tree, tmp_path, monkeypatch):
    """A checkpoint whose DALI state cannot be used (saved by another process count, or none, as from an older
    version) resumes at the same batch with fresh augmentation: one warning, not an error."""
    run_dir = tmp_path / "run"
    trainer = Trainer(load_config("demo", dali(tree, run_dir, "sched.epochs=1")), distributed.setup())
    stop_at(monkeypatch, trainer, 5)
    assert trainer.run()["status"] == "interrupted"
    monkeypatch.undo()
    state = load_checkpoint_file(run_dir / "last.pth")
    state["loader_state"][0]["world_size"] = 2  # as if saved by rank 0 of 2 processes
    torch.save(state, run_dir / "last.pth")
    result = train(load_config("demo", dali(tree, run_dir, "sched.epochs=1")))
    assert (result["status"], result["step"]) == ("done", 14)
    warned = [line for line in (run_dir / "train.log").read_text().splitlines() if "augmentation" in line]
    assert len(warned) == 1 and warned[0].endswith(
        "resuming mid-epoch with new random augmentation: the DALI pipeline state was saved with world_size 2, "
        "this run has 1: batches 5.. of epoch 1 are its images in order, with fresh crops/flips"
    ), warned


def test_two_process_gloo_run_and_outputs(tree, tmp_path):
    run_dir = tmp_path / "ddp"
    # W&B offline, with no credentials or W&B settings from this machine
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")} | {
        "HOME": str(tmp_path / "home")
    }
    out = run_cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train", "--config", "demo",
                  *overrides(tree, run_dir, "sched.epochs=2", "train.deterministic=false", "log.wandb_mode=auto"),
                  timeout=600, env=env)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "epoch 2/2 done" in out.stdout and "2 process(es)" in out.stdout and "eta" in out.stdout
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(r["val_images"] == 4 * 5 for r in records)  # every val image exactly once over the 2 ranks
    assert all(
        0 <= r["val_top1_err"] <= r["val_top5_err"] + 100 and r["val_top5_err"] <= r["val_top1_err"]
        for r in records
    )
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run_dir / "train.log").is_file() and (run_dir / "config.yaml").is_file()
    state = torch.load(run_dir / "last.pth", weights_only=True)
    assert {
        "model",
        "optimizer",
        "scheduler",
        "scaler",
        "epoch",
        "step",
        "config",
        "rng",
        "wandb_id",
    } <= state.keys()
    assert len(state["rng"]) == 2 and state["epoch"] == 2
    assert state["classes"] == index_split(tree, "train").classes  # label i = classes[i], for the evaluator
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in state["model"])
    # same parameter names and conv shapes as torchvision's vgg11_bn: loads strictly once the classifier matches
    tv = torchvision.models.vgg11_bn(num_classes=4)
    tv.classifier = torch.nn.Sequential(*[torch.nn.Linear(25088, 32), torch.nn.ReLU(True), torch.nn.Dropout(),
                                          torch.nn.Linear(32, 32), torch.nn.ReLU(True), torch.nn.Dropout(),
                                          torch.nn.Linear(32, 4)])  # fmt: skip
    tv.load_state_dict(state["model"], strict=True)
    assert (run_dir / "best.pth").is_file() and len(list((run_dir / "checkpoints").glob("epoch_*.pth"))) == 2
    # the offline W&B run file holds what the run logged (rank 0 only: one run)
    (wandb_run,) = run_files(run_dir, state["wandb_id"])
    logged = {row["epoch/epoch"]: row for row in wandb_run.history if "epoch/epoch" in row}
    for r in records:
        assert logged[r["epoch"]]["epoch/val_top1_err"] == r["val_top1_err"]
        assert logged[r["epoch"]]["epoch/train_loss"] == r["train_loss"]
    assert any("train/img_per_s" in row and "train/data_time_s" in row for row in wandb_run.history)
    assert wandb_run.summary["best_val_top1_err"] == min(r["val_top1_err"] for r in records)
    assert wandb_run.config["model"]["arch"] == "vgg11_bn"
    # the evaluator on the saved checkpoint agrees exactly with the training loop's last validation (all ranks
    # validated rank 0's model: BatchNorm buffers are synchronised before validation)
    out = run_cli("evaluate", "--checkpoint", str(run_dir / "last.pth"), "--data", str(tree),
                  "--json", str(tmp_path / "eval.json"))  # fmt: skip
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "eval.json").read_text())
    assert (result["top1_err"], result["top5_err"], result["n_images"]) == (
        records[-1]["val_top1_err"], records[-1]["val_top5_err"], records[-1]["val_images"])  # fmt: skip


def _bad(tree: Path, run_dir: Path, *extra: str) -> tuple[int, str]:
    out = run_cli("-m", "train", "--config", "demo", *overrides(tree, run_dir, *extra))
    return out.returncode, out.stderr.strip()


def test_bad_input_is_one_line_and_leaves_no_checkpoint(tree, tmp_path):
    code, err = _bad(tree, tmp_path / "a", "model.arch=vgg17")
    assert code == 2 and err.startswith("error: model.arch='vgg17' is not one of") and "\n" not in err
    code, err = _bad(tmp_path / "nowhere", tmp_path / "b")
    assert code == 1 and "nowhere" in err and "does not exist" in err and "\n" not in err
    (tmp_path / "file").write_text("x")
    code, err = _bad(tree, tmp_path / "file" / "run")
    assert code == 1 and err.startswith("error: run_dir") and "not writable" in err and "\n" not in err
    code, err = _bad(tree, tmp_path / "nan", "optim.lr=1e12", "sched.epochs=1")
    assert (code == 1 and err.startswith("error: loss is nan")) or err.startswith("error: loss is inf"), err
    assert not (tmp_path / "nan" / "last.pth").exists()
    # One step an epoch at a huge lr: the step's loss is finite, the weights it leaves are not; the epoch's
    # validation loss is caught before anything of the epoch is saved or written to metrics.jsonl.
    code, err = _bad(tree, tmp_path / "valnan", "optim.lr=1e6", "sched.epochs=1", "data.batch_size=56")
    assert (
        code == 1 and err.startswith("error: epoch 1: mean val loss is nan: stopping") and "\n" not in err
    ), err
    assert (tmp_path / "valnan" / "metrics.jsonl").read_text() == ""
    for run in ("a", "b", "nan", "valnan"):
        assert not list((tmp_path / run).glob("**/*.pth")) if (tmp_path / run).exists() else True


def test_ctrl_c_saves_last_pth_and_the_same_command_resumes(tree, tmp_path):
    """``python -m train`` in a terminal: Ctrl-C (SIGINT to the process group, DataLoader workers included) stops
    within a few steps with last.pth saved, exit status 130; the same command finishes the run."""
    run_dir = tmp_path / "run"
    code, err = signalled_after_a_step(overrides(tree, run_dir, "data.workers=2"), run_dir, signal.SIGINT)
    assert code == 130, err[-3000:]
    assert f"interrupted (SIGINT): saved {run_dir}/last.pth" in err and "Traceback" not in err, err
    state = load_checkpoint_file(run_dir / "last.pth")
    assert 0 < state["step"] < 21  # 3 epochs of 7 steps
    again = run_cli("-m", "train", "--config", "demo", *overrides(tree, run_dir))
    assert again.returncode == 0, again.stderr[-3000:]
    assert load_checkpoint_file(run_dir / "last.pth")["step"] == 21


def test_a_stop_during_validation_ends_the_run_at_that_epoch(tree, tmp_path):
    """A signal that comes while validating: the epoch's checkpoint is the stop's, no next epoch is started."""
    trainer = Trainer(load_config("demo", overrides(tree, tmp_path / "r")), distributed.setup())
    end_epoch = trainer._end_epoch

    def signalled_while_validating() -> None:
        trainer.stop_requested = True
        end_epoch()

    trainer._end_epoch = signalled_while_validating
    assert trainer.run()["status"] == "interrupted"
    state = load_checkpoint_file(tmp_path / "r" / "last.pth")
    assert (state["epoch"], state["batch_in_epoch"]) == (1, 0)
    assert train(load_config("demo", overrides(tree, tmp_path / "r")))["status"] == "done"


def test_eta_counts_the_validations_left(monkeypatch):
    """2 epochs of 10 steps: 1 s a step, 5 s a validation (with the epoch's save)."""
    now = [0.0]
    monkeypatch.setattr("train.report.time.perf_counter", lambda: now[0])
    eta = ETA(total_steps=20, validations=2)
    now[0], eta.steps_done = 10.0, 10
    assert eta.remaining() == 10.0  # no validation measured yet: steps only
    now[0] = 15.0
    eta.validated(5.0)
    now[0], eta.steps_done = 20.0, 15
    assert eta.remaining() == 5 * 1.0 + 1 * 5.0  # the last epoch's validation is still to come
    now[0], eta.steps_done = 25.0, 20
    assert eta.remaining() == 5.0


def _vote(rank: int, init: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    vote = StopVote(torch.device("cpu"), world_size=2)
    answers = [vote(rank == 1 and step >= 5) for step in range(10)]  # only rank 1 got the signal, at step 5
    Path(out, f"{rank}.json").write_text(json.dumps(answers))
    torch.distributed.destroy_process_group()


def test_stop_vote_every_rank_stops_at_the_same_step(tmp_path):
    """A signal that reaches one rank stops every rank at the same step, LAG steps later (not at a print interval:
    SLURM's KillWait after a SIGTERM is short)."""
    torch.multiprocessing.spawn(_vote, args=(f"file://{tmp_path}/store", str(tmp_path)), nprocs=2)
    answers = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)]
    assert answers[0] == answers[1] and answers[0].index(True) == 5 + StopVote.LAG
    assert StopVote(torch.device("cpu"), world_size=1)(True)  # one process: at once


def test_resume_from_another_arch_is_refused(tree, tmp_path):
    run_dir = tmp_path / "r"
    assert train(load_config("demo", overrides(tree, run_dir, "sched.epochs=1")))["status"] == "done"
    saved_config = (run_dir / "config.yaml").read_text()
    code, err = _bad(tree, run_dir, "model.arch=vgg13_bn")
    assert code == 1 and "cannot resume" in err and "model.arch='vgg11_bn'" in err and "\n" not in err
    assert "another run_dir" in err
    # ckpt.resume=never would mix two runs' checkpoints and metrics in one folder: refused too
    code, err = _bad(tree, run_dir, "model.arch=vgg13_bn", "ckpt.resume=never")
    assert code == 1 and "previous run's checkpoints (last.pth, best.pth" in err and "\n" not in err, err
    # neither refusal touched the folder's config: it still describes the run whose checkpoints are there
    assert (run_dir / "config.yaml").read_text() == saved_config


def test_batch_not_divisible_by_world_size(tree, tmp_path):
    out = run_cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train", "--config", "demo",
                  *overrides(tree, tmp_path / "odd", "data.batch_size=9", "launch.gpus=1"))  # fmt: skip
    assert out.returncode != 0
    assert "error: data.batch_size=9 (global) is not divisible by the world size 2" in out.stderr
    assert out.stderr.count("error: data.batch_size=9") == 1


SLOW_RANK_0 = """import os, runpy, sys, time
delay = float(sys.argv.pop(1))
if os.environ["RANK"] == "0":
    time.sleep(delay)  # rank 0 still importing, as on a loaded machine
sys.argv[0] = "train"
runpy.run_module("train", run_name="__main__")
"""


def test_a_config_error_is_printed_when_rank_1_gets_there_first(tree, tmp_path):
    """Rank 1 reaching the error first must not get rank 0 (the one that prints it) killed by torchrun's agent
    before it prints: seen in CI, where the user got torchrun's failure summary and no reason."""
    script = tmp_path / "slow_rank_0.py"
    script.write_text(SLOW_RANK_0)
    out = run_cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), "5", "--config",
                  "demo", *overrides(tree, tmp_path / "odd", "data.batch_size=9", "launch.gpus=1"))  # fmt: skip
    assert out.returncode != 0
    assert out.stderr.count("error: data.batch_size=9 (global) is not divisible by the world size 2") == 1, (
        out.stderr
    )


def test_an_error_only_rank_1_hits_is_printed_by_rank_1(tree, tmp_path):
    """Under torchrun, an unreadable image in rank 1's val block stops rank 1 with its one-line error; rank 0,
    whose collective then fails, says so in one line instead of a gloo traceback."""
    root = tmp_path / "tree"
    shutil.copytree(tree, root)
    victim = index_split(root, "val").samples[-1][0]  # the last block of val_shard: rank 1's
    Path(victim).write_bytes(b"not an image")
    out = run_cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train", "--config", "demo",
                  *overrides(root, tmp_path / "run", "sched.epochs=1"))  # fmt: skip
    assert out.returncode != 0
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert errors[0].startswith(f"error: [rank 1] cannot decode {victim} ("), out.stderr[-3000:]
    assert errors[1].startswith("error: [rank 0] stopped: another process of the job failed"), errors
    assert "[rank0]: Traceback" not in out.stderr


@pytest.mark.parametrize(
    "switches",
    [
        ("train.precision=bf16", "train.channels_last=true", "optim.name=adamw", "optim.lr=0.001"),
        ("train.precision=fp16", "optim.clip_grad_norm=1.0", "optim.decay_norm_and_bias=false"),
    ],
    ids=["bf16-channels_last-adamw", "fp16-gradscaler-clip"],
)
def test_precision_and_optimizer_switches_train(tree, tmp_path, switches):
    result = train(load_config("demo", overrides(tree, tmp_path / "run", "sched.epochs=1",
                                                 "train.deterministic=false", *switches)))  # fmt: skip
    assert result["status"] == "done" and result["epoch"] == 1
    state = load_checkpoint_file(tmp_path / "run" / "last.pth")
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    if "train.precision=fp16" in switches:
        assert state["scaler"]["scale"] > 0  # GradScaler was on and its state is checkpointed


def test_metrics_rows_torn_by_a_kill_are_not_read_as_rows(tmp_path):
    """A writer killed mid-line leaves a last line without its newline: it is not a record (a resumed run would
    otherwise stop on it, or count it); truncate() rewrites the file whole and drops it."""
    from train.report import JsonLines

    log = JsonLines(tmp_path / "metrics.jsonl")
    log.append({"epoch": 1, "loss": 2.0})
    log.append({"epoch": 2, "loss": 1.5})
    with open(log.path, "a") as f:
        f.write('{"epoch": 3, "lo')  # what a kill during a torn write leaves
    assert log.read() == [{"epoch": 1, "loss": 2.0}, {"epoch": 2, "loss": 1.5}]
    log.truncate("epoch", 1)
    assert log.path.read_text() == '{"epoch": 1, "loss": 2.0}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temporary file left


def test_resume_in_fp16_from_a_checkpoint_without_a_loss_scale(tree, tmp_path):
    """A bf16 run's checkpoint holds no GradScaler state; resuming it with train.precision=fp16 starts a fresh
    loss scale (GradScaler.load_state_dict raised on the empty state) and the scaler then steps."""
    run_dir = tmp_path / "run"
    extra = ("train.deterministic=false", "sched.epochs=1")
    assert (
        train(load_config("demo", overrides(tree, run_dir, *extra, "train.precision=bf16")))["status"]
        == "done"
    )
    assert load_checkpoint_file(run_dir / "last.pth")["scaler"] == {}
    result = train(
        load_config("demo", overrides(tree, run_dir, *extra, "sched.epochs=2", "train.precision=fp16"))
    )
    assert result["status"] == "done" and result["epoch"] == 2
    assert (
        "has no GradScaler state (trained with train.precision=bf16)" in (run_dir / "train.log").read_text()
    )
    scaler = load_checkpoint_file(run_dir / "last.pth")["scaler"]
    assert scaler["scale"] > 0 and scaler["_growth_tracker"] > 0  # fp16 stepped: its loss scale is saved
