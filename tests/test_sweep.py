"""The whole table in two commands: ``python slurm/launch.py --arch a,b,...|all`` (one job per arch, each in
``<run-dir>/<recipe>-<arch>``, the paper's B–E after net A) and ``python evaluate --report RUN_DIR...`` (evaluate,
compare, report.md/json/png). Real runs of two small demo-recipe archs through ``--cluster local``, the report read
back against each run's own eval.json and usage records, and the paper's afterok dependency on the local SLURM
cluster.

    .venv/bin/python -m pytest tests/test_sweep.py -rA      # SLURM tests need root (slurm/local_cluster.sh)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from slurm import launch
from slurm.usage import UsageRecorder, read_records, read_usage
from tests.conftest import REPO, run_cli
from tests.slurm_cluster import SlurmCluster
from tests.wandb_files import run_files
from train.models import TORCHVISION_ARCHS
from train.run import lock_run_dir

LAUNCH = "slurm/launch.py"
ARCHS = ("vgg11_bn", "vgg13_bn")

# The demo recipe shrunk to seconds per run on 2 cores (tests/test_launch.py's small(), one epoch).
SMALL = ["--gpus", "2", "--time", "00:15:00", "data.backend=torchvision", "data.batch_size=8", "data.workers=0",
         "data.train_crop=32", "data.val_resize=36", "data.val_crop=32", "model.num_classes=4",
         "model.classifier_width=32", "sched.epochs=1", "sched.name=step", "sched.step_size=1", "sched.warmup_epochs=0", "optim.lr=0.01",
         "train.print_every=2", "train.deterministic=true"]  # fmt: skip


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}


def main_output(capsys, *argv: str) -> tuple[int, str, str]:
    code = launch.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def jobs_of(dry_run: str) -> dict[str, str]:
    """arch → its section of a sweep's dry run."""
    parts = re.split(r"^## ", dry_run, flags=re.M)[1:]
    return {p.split(":", 1)[0]: p for p in parts}


def sbatch(section: str) -> dict[str, str]:
    out = {}
    for line in section.splitlines():
        if line.startswith("#SBATCH --"):
            key, _, value = line[len("#SBATCH --") :].partition("=")
            out[key] = value
    return out


# ----------------------------------------------------------------------------------------------- dry run


def test_dry_run_lists_one_job_per_arch_in_its_own_folder(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))  # no SLURM clients: a dry run needs none
    code, out, err = main_output(capsys, "--arch", "all", "--gpus", "8", "--partition", "gpu", "--run-dir",
                                 "/shared/table", "--data", str(tmp_path), "--dry-run")  # fmt: skip
    assert code == 0, err
    jobs = jobs_of(out)
    assert list(jobs) == list(TORCHVISION_ARCHS)  # all: torchvision's eight rows
    assert "W&B group 'table'" in out.splitlines()[0] and "8 job(s)" in out.splitlines()[0]
    for arch, section in jobs.items():
        assert section.startswith(f"{arch}: run folder /shared/table/torchvision-{arch}\n")
        lines = sbatch(section)
        assert lines["job-name"] == f"vgg-torchvision-{arch}"
        assert lines["output"] == f"/shared/table/torchvision-{arch}/slurm/%j/%j_0_log.out"
        assert (lines["ntasks-per-node"], lines["gpus-per-node"], lines["partition"]) == ("8", "8", "gpu")
        assert "requeue" in lines and "dependency" not in lines  # each requeues on its own; none waits
        lr = "0.1" if arch.endswith("_bn") else "0.01"  # each arch keeps its own recipe
        assert f"# schedule: 90 epochs, lr {lr}," in section
    assert not Path("/shared/table").exists()


@pytest.mark.parametrize("how", ["flag", "init_from"])
def test_paper_sweep_b_to_e_wait_for_net_a(capsys, tmp_path, how):
    """--init-from-a, or model.init_from naming this sweep's net A: B–E start from A's best.pth, after A's job."""
    run_dir = tmp_path / "paper"
    extra = ["--init-from-a"] if how == "flag" else [f"model.init_from={run_dir}/paper-vgg11/best.pth"]
    code, out, err = main_output(capsys, "--arch", "vgg13,vgg11_bn,vgg11,vgg16", "--recipe", "paper", "--gpus",
                                 "8", "--run-dir", str(run_dir), "--data", str(tmp_path), "--dry-run", *extra)  # fmt: skip
    assert code == 0, err
    jobs = jobs_of(out)
    assert list(jobs) == ["vgg11", "vgg13", "vgg11_bn", "vgg16"]  # A first: the others need its job id
    a_best = f"{run_dir}/paper-vgg11/best.pth"
    for arch in ("vgg13", "vgg16"):
        assert sbatch(jobs[arch])["dependency"] == "'afterok:<vgg11>'"
        assert sbatch(jobs[arch])["kill-on-invalid-dep"] == "yes"
        assert f"init_from {a_best}" in jobs[arch]
    for arch in ("vgg11", "vgg11_bn"):  # A, and a BN twin (not one of the paper's B–E), start from scratch
        assert "dependency" not in sbatch(jobs[arch]) and "init_from" not in jobs[arch]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--arch", "vgg11,resnet50"), "error: --arch 'resnet50' is not an architecture; valid: all, vgg11,"),
        (("--arch", "vgg11,vgg11"), "error: --arch names vgg11 twice: each arch is one run"),
        (("--arch", "vgg11,vgg13", "run_dir=/x"), "error: run_dir=... names one run folder; a sweep puts each run"),
        (("--arch", "vgg11,vgg13", "--init-from-a"), "error: --init-from-a is the paper's §3.1 (B–E from net A): "
                                                     "use --recipe paper, not torchvision"),
        (("--arch", "vgg13,vgg16", "--recipe", "paper", "--init-from-a"), "error: --init-from-a: net A (vgg11) is "
                                                                          "not in this sweep and"),
        (("--arch", "vgg13", "--init-from-a"), "error: --init-from-a is for a sweep"),
        (("--arch", "vgg11,vgg13", "optim.lrr=1"), "error: vgg11: command line: unknown key 'optim.lrr'"),
    ],
    ids=["unknown", "twice", "run_dir", "not-paper", "no-a", "single", "typo"],
)  # fmt: skip
def test_bad_sweep_input_is_one_error_line(capsys, tmp_path, args, message):
    code, out, err = main_output(capsys, *args, "--run-dir", str(tmp_path / "s"), "--data", str(tmp_path),
                                 "--dry-run")  # fmt: skip
    assert code == 2 and out == ""
    assert err.startswith(message) and err.count("\n") == 1, err
    assert not (tmp_path / "s").exists()


# ------------------------------------------------------------------------------------------ usage records


def test_usage_record_of_a_job_killed_hard_ends_at_its_last_heartbeat(tmp_path):
    code = ("import sys, time; from slurm.usage import UsageRecorder\n"
            f"with UsageRecorder({str(tmp_path)!r}, processes=4, nodes=1, job_id='77', cluster='slurm', "
            "heartbeat_s=0.2):\n    print('started', flush=True); time.sleep(60)\n")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "started\n"
    time.sleep(2.5)
    os.kill(proc.pid, signal.SIGKILL)  # no end written: the time limit's or a node failure's end
    proc.wait()
    (record,) = read_records(tmp_path)
    assert (record["job_id"], record["processes"], record["end"], record["status"]) == (
        "77",
        4,
        None,
        "running",
    )
    seconds = (
        datetime.fromisoformat(record["heartbeat"]) - datetime.fromisoformat(record["start"])
    ).total_seconds()
    assert seconds >= 2  # the heartbeat went on until the kill
    usage = read_usage(tmp_path)
    assert usage.wall_s == seconds and usage.process_hours == 4 * seconds / 3600
    assert usage.source == "usage records (1 start(s); 1 without an end: last heartbeat)"


def test_usage_sums_every_start_and_falls_back_on_metrics(tmp_path):
    for restart in (0, 1):
        with UsageRecorder(tmp_path, processes=2, nodes=1, job_id="5", cluster="slurm", restart=restart):
            pass
    records = read_records(tmp_path)
    assert [(r["restart"], r["status"]) for r in records] == [(0, "returned"), (1, "returned")]
    assert read_usage(tmp_path).starts == 2
    other = tmp_path / "old"  # a run trained without usage records
    other.mkdir()
    (other / "metrics.jsonl").write_text(
        '{"epoch": 1, "epoch_time_s": 30.0}\n{"epoch": 2, "epoch_time_s": 60.0}\n'
    )
    usage = read_usage(other, processes=8)
    assert (usage.wall_s, usage.process_hours) == (90.0, 8 * 90 / 3600)
    assert usage.source.startswith("metrics.jsonl epoch_time_s (no usage records")


# --------------------------------------------------------------------------------------- real demo sweep


def sweep_args(tree: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--recipe", "demo", "--arch", ",".join(ARCHS), "--cluster", "local", "--run-dir", str(run_dir), "--data",
            str(tree), *SMALL, "log.wandb_mode=offline", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def sweep(small_tree, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One command, two archs, one run folder each: the same launch as `make demo-table`, shorter."""
    run_dir = tmp_path_factory.mktemp("sweep") / "table"
    t0 = time.monotonic()
    out = run_cli(LAUNCH, *sweep_args(small_tree, run_dir), env=clean_env(), timeout=900)
    print(f"2-arch demo sweep, --cluster local: {time.monotonic() - t0:.1f} s")
    return run_dir, out


@pytest.fixture(scope="module")
def reported(sweep) -> tuple[Path, subprocess.CompletedProcess, dict]:
    run_dir, _ = sweep
    out = run_cli("evaluate", "--report", f"{run_dir}/*", env=clean_env())
    return run_dir, out, json.loads((run_dir / "report.json").read_text())


def test_sweep_trains_every_arch_in_its_own_run_folder(sweep):
    run_dir, out = sweep
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.startswith(f"sweep: 2 job(s) ({', '.join(ARCHS)}), recipe demo, W&B group 'table'\n")
    assert sorted(p.name for p in run_dir.iterdir()) == [f"demo-{a}" for a in ARCHS]
    for arch in ARCHS:
        run = run_dir / f"demo-{arch}"
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert (config["model"]["arch"], config["log"]["group"]) == (arch, "table")  # the sweep's W&B group
        (wandb_run,) = run_files(
            run, (run / "wandb_id.txt").read_text().strip()
        )  # the offline run file says so
        assert wandb_run.run.run_group == "table"
        state = torch.load(run / "last.pth", weights_only=True)
        assert (state["epoch"], state["config"]["model"]["arch"]) == (1, arch)
        (record,) = read_records(run)  # this job's own usage record
        assert (record["processes"], record["cluster"], record["status"]) == (2, "local", "returned")
        assert re.search(rf"\[{arch}\] submitted job {record['job_id']} to this machine", out.stdout)


def test_sweep_again_has_nothing_to_do(sweep, small_tree):
    run_dir, _ = sweep
    before = {a: sorted((run_dir / f"demo-{a}" / "slurm").iterdir()) for a in ARCHS}
    again = run_cli(LAUNCH, *sweep_args(small_tree, run_dir), env=clean_env())
    assert again.returncode == 0, again.stderr
    for arch in ARCHS:
        assert f"[{arch}] nothing to do: {run_dir}/demo-{arch}/last.pth is at epoch 1 of 1" in again.stdout
        assert sorted((run_dir / f"demo-{arch}" / "slurm").iterdir()) == before[arch]
    assert "submitted job" not in again.stdout


def test_a_busy_run_folder_stops_the_sweep_before_anything_is_submitted(sweep, small_tree, tmp_path):
    run_dir = tmp_path / "busy"
    with lock_run_dir(run_dir / f"demo-{ARCHS[1]}"):
        out = run_cli(LAUNCH, *sweep_args(small_tree, run_dir, "sched.epochs=2"), env=clean_env())
    assert out.returncode == 2 and "submitted job" not in out.stdout
    assert re.search(rf"error: run_dir {run_dir}/demo-{ARCHS[1]} is in use by pid \d+", out.stderr), (
        out.stderr
    )
    assert not (run_dir / f"demo-{ARCHS[0]}").exists()  # the first arch was checked, not started


def test_report_numbers_are_each_runs_eval_json(reported):
    run_dir, out, report = reported
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = {r["arch"]: r for r in report["runs"]}
    assert list(rows) == list(ARCHS)
    md = (run_dir / "report.md").read_text()
    for arch in ARCHS:
        run = run_dir / f"demo-{arch}"
        row, ev = rows[arch], json.loads((run / "eval.json").read_text())
        assert (row["state"], row["epochs_done"], row["epochs"], row["evaluated_now"]) == ("done", 1, 1, True)
        assert (row["top1_err"], row["top5_err"], row["n_images"]) == (ev["top1_err"], ev["top5_err"], 20)
        assert ev["checkpoint"]["sha256"] == hashlib.sha256((run / "best.pth").read_bytes()).hexdigest()
        # exact counts, independently: the training loop's own validation of the same weights (one epoch)
        (epoch,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert ev["top1_err"] == epoch["val_top1_err"] and row["best_epoch"] == 1
        assert row["verdict"] == "no reference"  # 4 classes, 20 images: no row applies, and it says why
        assert "4 classes, not ImageNet-1k's 1000" in row["note"]
        assert (row["torchvision_top1_err"], row["paper_top1_err"]) == (
            {"vgg11_bn": 29.63, "vgg13_bn": 28.414}[arch], None)  # fmt: skip
        # wall time and GPU-hours: the job's own usage record, processes × (end − start)
        (rec,) = read_records(run)
        seconds = (datetime.fromisoformat(rec["end"]) - datetime.fromisoformat(rec["start"])).total_seconds()
        assert (row["wall_s"], row["process_hours"]) == (seconds, 2 * seconds / 3600) and seconds > 0
        assert row["usage_source"] == "usage records (1 start(s))" and row["device"] == "cpu"
        # the W&B run: the id the launcher fixed, with its offline run folder
        wandb_id = (run / "wandb_id.txt").read_text().strip()
        assert (row["wandb_id"], row["wandb"]) == (wandb_id, "offline")
        assert list(run.glob(f"wandb/offline-run-*-{wandb_id}"))
        line = next(ln for ln in md.splitlines() if ln.startswith(f"| demo-{arch} | {arch} |"))
        assert f"| {ev['top1_err']:.2f} | {ev['top5_err']:.2f} |" in line and f"{wandb_id} (offline)" in line
        assert f"| {2 * seconds / 3600:.3f} (CPU) |" in line
    with Image.open(run_dir / "report.png") as png:  # the learning curves open as a PNG
        assert png.format == "PNG" and png.size[0] > 500
    assert f"wrote {run_dir}/report.md, {run_dir}/report.json, {run_dir}/report.png" in out.stdout


def test_report_evaluates_only_missing_or_stale_eval_json(reported):
    run_dir, _, _ = reported
    stale = run_dir / f"demo-{ARCHS[1]}"
    again = run_cli(
        "evaluate", "--report", str(run_dir), env=clean_env()
    )  # the sweep folder stands for its runs
    assert again.returncode == 0, again.stderr
    assert "evaluating best.pth" not in again.stderr
    assert [r["evaluated_now"] for r in json.loads((run_dir / "report.json").read_text())["runs"]] == [
        False,
        False,
    ]
    state = torch.load(stale / "best.pth", weights_only=True)
    state["model"]["classifier.6.bias"] += 1.0  # another best.pth: its eval.json is stale
    torch.save(state, stale / "best.pth")
    third = run_cli("evaluate", "--report", f"{run_dir}/*", env=clean_env())
    assert third.returncode == 0, third.stderr
    assert f"{stale.name}: evaluating best.pth (stale: best.pth changed), 1-crop" in third.stderr
    rows = json.loads((run_dir / "report.json").read_text())["runs"]
    assert [r["evaluated_now"] for r in rows] == [False, True]
    assert json.loads((stale / "eval.json").read_text())["checkpoint"]["sha256"] == hashlib.sha256(
        (stale / "best.pth").read_bytes()).hexdigest()  # fmt: skip


def test_report_lists_unfinished_runs_with_their_progress(sweep, tmp_path):
    run_dir, _ = sweep
    table = tmp_path / "table"
    done = run_dir / f"demo-{ARCHS[0]}"
    for name in ("demo-stopped", "demo-training"):  # trained 1 of 3 epochs
        shutil.copytree(done, table / name, ignore=shutil.ignore_patterns("eval.json", ".lock"))
        config = table / name / "config.yaml"
        tree = yaml.safe_load(config.read_text())
        tree["sched"]["epochs"] = 3
        config.write_text(yaml.safe_dump(tree))
    (table / "demo-vgg16" / "slurm").mkdir(parents=True)  # launched, nothing started yet
    with lock_run_dir(table / "demo-training"):
        out = run_cli("evaluate", "--report", f"{table}/*", env=clean_env())
    assert out.returncode == 0, out.stderr
    rows = {Path(r["run_dir"]).name: r for r in json.loads((table / "report.json").read_text())["runs"]}
    assert {k: (r["state"], r["epochs_done"], r["top1_err"]) for k, r in rows.items()} == {
        "demo-stopped": ("stopped", 1, None),
        "demo-training": ("training", 1, None),
        "demo-vgg16": ("not started", 0, None),
    }
    assert rows["demo-training"]["progress"] == "1/3 epochs (training)"
    assert (
        "demo-stopped: stopped, 1/3 epochs (stopped: nothing runs; the same launch command resumes it)"
        in out.stdout
    )
    assert not (table / "demo-stopped" / "eval.json").exists()  # unfinished: not evaluated


def test_report_without_run_folders_is_one_error_line(tmp_path):
    out = run_cli("evaluate", "--report", str(tmp_path / "nothing"))
    assert out.returncode == 2 and out.stderr == f"error: {tmp_path}/nothing: no such run folder\n"


# ------------------------------------------------------------------------------------------------ SLURM


def paper_args(tree: Path, run_dir: Path, partition: str) -> list[str]:
    """The paper recipe's A and B, shrunk (scale S = 36, 32 px crops): B starts from A's best.pth, after A."""
    return ["--recipe", "paper", "--arch", "vgg11,vgg13", "--init-from-a", "--cluster", "slurm", "--partition",
            partition, "--run-dir", str(run_dir), "--data", str(tree), *SMALL, "data.scale_min=36",
            "data.scale_max=36", "log.wandb_mode=disabled", "launch.cpus_per_gpu=1", "dist.device=cpu"]  # fmt: skip


def sweep_job_ids(stdout: str) -> dict[str, str]:
    return dict(re.findall(r"^\[(\w+)\] submitted job (\d+) to SLURM", stdout, re.M))


@pytest.mark.slurm
def test_slurm_b_waits_for_a_and_starts_from_its_weights(slurm_env: SlurmCluster, small_tree, tmp_path):
    run_dir = tmp_path / "paper"
    out = run_cli(LAUNCH, *paper_args(small_tree, run_dir, slurm_env.partition), env=clean_env())
    assert out.returncode == 0, out.stdout + out.stderr
    ids = sweep_job_ids(out.stdout)
    a, b = ids["vgg11"], ids["vgg13"]
    assert f"dependency: afterok:{a} (kill_on_invalid_dep=yes)" in out.stdout
    script = (run_dir / "paper-vgg13" / "slurm" / b / f"{b}_submission.sh").read_text()
    assert f"#SBATCH --dependency=afterok:{a}\n" in script and "#SBATCH --kill-on-invalid-dep=yes\n" in script
    reason = slurm_env.run("squeue", "-h", "-j", b, "-o", "%T %r").stdout.strip()
    assert reason == "PENDING Dependency", reason  # while A has not completed
    slurm_env.wait_for("A to complete", lambda: slurm_env.sacct_states(a)[-1:] == ["COMPLETED"], timeout=300)
    slurm_env.wait_for("B to complete", lambda: slurm_env.sacct_states(b)[-1:] == ["COMPLETED"], timeout=300)
    log = (run_dir / "paper-vgg13" / "slurm" / b / f"{b}_0_log.out").read_text()
    assert f"from {run_dir}/paper-vgg11/best.pth (A's first 4 convs + 3 FC layers" in log
    a_start = read_records(run_dir / "paper-vgg11")[0]
    b_start = read_records(run_dir / "paper-vgg13")[0]
    assert b_start["start"] >= a_start["end"]  # B ran after A, not beside it
    # the report evaluates paper-recipe runs with the paper's protocol: dense, at Table 3's one test scale Q = S
    rep = run_cli("evaluate", "--report", str(run_dir), env=clean_env())
    assert rep.returncode == 0, rep.stdout[-2000:] + rep.stderr[-2000:]
    rows = json.loads((run_dir / "report.json").read_text())["runs"]
    assert [(r["arch"], r["state"], r["protocol"]) for r in rows] == [("vgg11", "done", "dense"),
                                                                       ("vgg13", "done", "dense")]  # fmt: skip
    for r in rows:
        ev = json.loads(Path(r["eval_json"]).read_text())
        assert (ev["protocol"], ev["test_scales"], ev["top1_err"]) == ("dense", [36], r["top1_err"])


@pytest.mark.slurm
def test_slurm_dependents_leave_the_queue_when_a_fails(slurm_env: SlurmCluster, small_tree, tmp_path):
    run_dir = tmp_path / "paper"
    out = run_cli(LAUNCH, *paper_args(small_tree, run_dir, slurm_env.partition), env=clean_env())
    assert out.returncode == 0, out.stdout + out.stderr
    ids = sweep_job_ids(out.stdout)
    slurm_env.run("scancel", ids["vgg11"])  # A never completes: B's afterok can never be met
    slurm_env.wait_for("B to leave the queue", lambda: not slurm_env.squeue_state(ids["vgg13"]), timeout=60)
    # accounting records a job that never ran a moment later than squeue drops it
    slurm_env.wait_for(
        "B CANCELLED in sacct", lambda: slurm_env.sacct_states(ids["vgg13"])[-1:] == ["CANCELLED"]
    )
    assert not (run_dir / "paper-vgg13" / "usage").exists()  # B never started


def test_a_demo_runs_verdict_names_the_band_it_was_judged_by():
    """A demo run's PASS/FAIL is the demo band's, not torchvision's row shown beside it for scale: both tables say
    so; a torchvision-recipe run's verdict stays as it is."""
    from evaluate.report import RunRow, format_console, format_markdown

    def row(arch: str, reference: str, verdict: str) -> RunRow:
        return RunRow(run_dir=f"/r/{arch}", arch=arch, recipe="demo", state="done", progress="8/8 epochs",
                      epochs_done=8, epochs=8, top1_err=48.5, top5_err=1.5, torchvision_top1_err=29.63,
                      reference=reference, verdict=verdict)  # fmt: skip

    rows = [row("vgg11_bn", "demo band, benchmarks/results/demo_seeds_cpu.json", "PASS"),
            row("vgg13_bn", "torchvision's table", "FAIL")]  # fmt: skip
    md, console = format_markdown(rows, "t"), format_console(rows)
    for text in (md, console):
        assert "PASS (demo band)" in text and "FAIL (demo band)" not in text and "FAIL" in text
