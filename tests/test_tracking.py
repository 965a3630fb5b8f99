"""W&B tracking (train/tracking.py): real offline runs, read back from the ``.wandb`` run files
(tests/wandb_files.py)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.wandb_files import RunFile, run_files
from train.config import load_config, to_dict
from train.tracking import ID_FILE, Tracker


def next_second() -> None:
    """Wait for the wall clock's next second: wandb names offline folders offline-run-<YYYYmmdd_HHMMSS>-<id>,
    so two starts of one run id within a second would share (and overwrite) a folder."""
    time.sleep(1.0 - time.time() % 1.0 + 0.01)


def user_rows(run: RunFile) -> list[dict]:
    """History rows without W&B's own ``_runtime`` / ``_timestamp`` columns."""
    return [{k: v for k, v in row.items() if k not in ("_runtime", "_timestamp")} for row in run.history]


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module", autouse=True)
def wandb_env(tmp_path_factory):
    """No credentials and no WANDB_MODE from the machine; HOME (netrc, wandb's cache) in a temp folder."""
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        for var in (
            "WANDB_API_KEY",
            "WANDB_MODE",
            "WANDB_DIR",
            "WANDB_INIT_TIMEOUT",
            "WANDB_BASE_URL",
            "NETRC",
        ):
            mp.delenv(var, raising=False)
        mp.setenv("HOME", str(home))
        mp.setenv("WANDB_CACHE_DIR", str(home / "wandb-cache"))
        mp.setenv("WANDB_DATA_DIR", str(home / "wandb-data"))
        mp.setenv("WANDB_CONFIG_DIR", str(home / "wandb-config"))
        yield home


@pytest.fixture
def train_log():
    """Records of the ``train`` logger, INFO and up (a handler on it: the engine turns its propagation off)."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger, handler = logging.getLogger("train"), Keep(logging.INFO)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


def messages(records: list[logging.LogRecord], level: int = logging.INFO) -> list[str]:
    return [r.getMessage() for r in records if r.levelno >= level]


def make_cfg(*overrides: str):
    return load_config("demo", list(overrides))


def _subprocess_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "NETRC"}
    env.update(HOME=str(home), PYTHONPATH=str(REPO), **extra)
    return env


def _run_script(
    script: str, env: dict[str, str], *args: str, timeout: float = 120
) -> subprocess.CompletedProcess:
    """``python -c SCRIPT ARGS...`` from the repository root (``sys.argv[1:]`` = ARGS), capturing text."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ---------------------------------------------------------------------------------------------- tests


def test_offline_run_file_holds_config_history_and_summary(tmp_path, train_log):
    run_dir = tmp_path / "vgg-demo-run"
    cfg = make_cfg("log.wandb_mode=offline", "log.group=ablation", "log.tags=[demo, cpu]", "optim.lr=0.0375")
    tracker = Tracker.create(cfg, run_dir, is_main=True)
    assert tracker.mode == "offline" and tracker.run_id
    assert (run_dir / ID_FILE).read_text().strip() == tracker.run_id

    steps = [
        (1, {"train/loss": 2.25, "train/lr": 0.0375, "train/img_per_s": 812.5, "train/data_time_s": 0.125}),
        (2, {"train/loss": 1.875, "train/lr": 0.0375, "train/img_per_s": 901.0, "train/max_mem_gib": 0.5}),
        (3, {"val/top1_err": 62.5, "val/top5_err": 12.5, "train/top1_err": 70.0, "epoch": 1}),
    ]
    for step, metrics in steps:
        tracker.log(metrics, step=step)
    tracker.summary(best_top1_err=62.5, best_epoch=1)
    tracker.log_checkpoint(run_dir / "best.pth")  # log.log_checkpoint is false in the demo recipe: no-op
    tracker.finish()
    tracker.finish()  # idempotent

    (run,) = run_files(run_dir, tracker.run_id)
    assert run.run.run_id == tracker.run_id
    assert run.run.project == cfg.log.project == "vgg-imagenet"
    assert run.run.display_name == "vgg-demo-run"  # log.name unset: the run folder's name
    assert run.run.run_group == "ablation" and list(run.run.tags) == ["demo", "cpu"]
    assert run.config == to_dict(cfg)
    assert run.config["optim"]["lr"] == 0.0375
    assert user_rows(run) == [{"_step": s, **m} for s, m in steps]
    assert run.summary["best_top1_err"] == 62.5 and run.summary["best_epoch"] == 1
    assert run.artifacts == []
    if (REPO / ".git").exists():  # git_root is set to the code's checkout, wherever run_dir lives
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
        if head.returncode == 0:
            assert run.run.git.commit == head.stdout.strip()

    lines = messages(train_log)
    assert len(lines) == 1, lines
    assert "W&B offline (log.wandb_mode=offline)" in lines[0]
    assert f"wandb sync {run_dir / 'wandb'}/offline-run-*-{tracker.run_id}" in lines[0]


def test_resume_continues_the_same_run_id(tmp_path):
    run_dir = tmp_path / "run"
    cfg = make_cfg("log.wandb_mode=offline", "log.log_checkpoint=true", "ckpt.resume=auto")
    first = Tracker.create(cfg, run_dir, is_main=True)
    for step in (1, 2, 3):
        first.log({"train/loss": 4.0 - step}, step=step)
    first.finish(exit_code=0)

    # Resuming from a checkpoint: the id comes from the checkpoint, whatever the id file says.
    (run_dir / ID_FILE).write_text("someoneelse\n")
    next_second()
    second = Tracker.create(cfg, run_dir, is_main=True, resume_id=first.run_id)
    assert second.run_id == first.run_id and second.mode == "offline"
    for step in (4, 5):
        second.log({"train/loss": 4.0 - step}, step=step)
    ckpt = run_dir / "best.pth"
    ckpt.write_bytes(b"best at epoch 1")
    second.log_checkpoint(ckpt, aliases=("best", "epoch-1"))
    ckpt.write_bytes(b"best at epoch 2, longer")  # a new best replaces the file before the job ends
    second.log_checkpoint(ckpt, aliases=("best", "epoch-2"))
    second.finish()  # uploads the last marked file as it is now
    assert (run_dir / ID_FILE).read_text().strip() == first.run_id

    # A requeued job with no checkpoint yet continues the id in run_dir/wandb_id.txt ...
    next_second()
    third = Tracker.create(cfg, run_dir, is_main=True)
    assert third.run_id == first.run_id
    third.log({"train/loss": -2.0}, step=6)
    third.finish()
    # ... unless the user asked for a fresh start.
    fresh = Tracker.create(make_cfg("log.wandb_mode=offline", "ckpt.resume=never"), run_dir, is_main=True)
    assert fresh.run_id and fresh.run_id != first.run_id
    fresh.finish()
    assert (run_dir / ID_FILE).read_text().strip() == fresh.run_id

    parts = run_files(run_dir, first.run_id)
    assert len(parts) == 3  # one offline folder per start, all with the same id: `wandb sync` joins them
    assert [p.run.run_id for p in parts] == [first.run_id] * 3
    assert all(p.run.resume for p in parts[1:])  # started with resume="allow"
    steps = [[row["_step"] for row in user_rows(p)] for p in parts]
    assert steps == [[1, 2, 3], [4, 5], [6]]
    assert [row["train/loss"] for p in parts for row in user_rows(p)] == [3.0, 2.0, 1.0, 0.0, -1.0, -2.0]
    assert parts[0].artifacts == [] and parts[2].artifacts == []
    (artifact,) = parts[1].artifacts
    assert artifact.type == "model" and artifact.name == f"model-{first.run_id}"
    assert "epoch-2" in artifact.aliases and "epoch-1" not in artifact.aliases
    (entry,) = artifact.manifest.contents
    assert (entry.path, entry.size) == ("best.pth", len(b"best at epoch 2, longer"))


@pytest.mark.parametrize(
    ("config_mode", "env_mode"), [("disabled", None), ("offline", "disabled"), ("auto", "disabled")]
)
def test_disabled_writes_nothing(tmp_path, monkeypatch, train_log, config_mode, env_mode):
    if env_mode:
        monkeypatch.setenv("WANDB_MODE", env_mode)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    tracker = Tracker.create(
        make_cfg(f"log.wandb_mode={config_mode}"), run_dir, is_main=True, resume_id="abc"
    )
    assert tracker.mode == "disabled" and tracker.run_id is None
    tracker.log({"train/loss": 1.0}, step=1)
    tracker.summary(best_top1_err=1.0)
    tracker.log_checkpoint(run_dir / "missing.pth")
    tracker.finish()
    assert list(run_dir.iterdir()) == []
    why = (
        f"WANDB_MODE=disabled overrides log.wandb_mode={config_mode}"
        if env_mode
        else "log.wandb_mode=disabled"
    )
    assert messages(train_log) == [f"W&B disabled ({why})"]


def test_env_mode_beats_config(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    tracker = Tracker.create(make_cfg("log.wandb_mode=disabled"), tmp_path, is_main=True)
    assert tracker.mode == "offline" and tracker.run_id
    tracker.finish()
    assert len(run_files(tmp_path, tracker.run_id)) == 1


def test_bad_wandb_mode_env_is_one_warning(tmp_path, monkeypatch, train_log):
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    tracker = Tracker.create(make_cfg("log.wandb_mode=offline"), tmp_path, is_main=True)
    assert tracker.mode == "disabled"
    warnings = messages(train_log, logging.WARNING)
    assert warnings == [
        "W&B off for this job: ValueError: WANDB_MODE='sometimes' is not one of online, offline, disabled"
    ]


def test_non_main_ranks_and_disabled_never_import_wandb(tmp_path, wandb_env):
    script = """
        import os, sys
        from pathlib import Path
        from train.config import Config
        from train.tracking import Tracker

        def cfg(mode):
            c = Config()  # the plain dataclass: load_config would import torch, slow for this check
            c.log.wandb_mode, c.log.log_checkpoint = mode, True
            return c

        run_dir = Path(sys.argv[1])
        run_dir.mkdir()
        for mode, main in (("offline", False), ("online", False), ("auto", False), ("disabled", True)):
            t = Tracker.create(cfg(mode), run_dir, is_main=main, resume_id="x")
            t.log({"train/loss": 1.0}, step=1); t.summary(best_top1_err=1.0); t.log_checkpoint(sys.executable); t.finish()
            assert (t.mode, t.run_id) == ("disabled", None), (mode, main, t.mode, t.run_id)
        os.environ["WANDB_MODE"] = "disabled"
        t = Tracker.create(cfg("online"), run_dir, is_main=True)
        assert t.mode == "disabled"
        print("files:", sorted(p.name for p in run_dir.iterdir()))
        print("wandb imported:", any(m == "wandb" or m.startswith("wandb.") for m in sys.modules))
    """
    p = _run_script(script, _subprocess_env(wandb_env), str(tmp_path / "run"))
    assert p.returncode == 0, p.stderr
    assert "files: []" in p.stdout and "wandb imported: False" in p.stdout, p.stdout


def test_log_failure_warns_once_and_training_continues(tmp_path, monkeypatch, train_log):
    import wandb

    tracker = Tracker.create(make_cfg("log.wandb_mode=offline"), tmp_path, is_main=True)
    tracker.log({"train/loss": 1.5}, step=1)

    def broken_log(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(wandb.Run, "log", broken_log)
    train_log.clear()
    for step in (2, 3, 4):
        tracker.log({"train/loss": 1.0}, step=step)  # never raises
    tracker.summary(best_top1_err=50.0)
    tracker.finish()

    warnings = messages(train_log, logging.WARNING)
    assert len(warnings) == 1, warnings
    assert "wandb.log failed (OSError: [Errno 28] No space left on device)" in warnings[0]
    assert tracker.mode == "disabled" and tracker.run_id  # the id stays valid: the file has what came before
    monkeypatch.undo()
    (run,) = run_files(tmp_path, tracker.run_id)
    assert [row["_step"] for row in user_rows(run)] == [1]
    assert "best_top1_err" not in run.summary


def test_init_failure_never_raises(tmp_path, train_log):
    (tmp_path / "wandb").write_text("a file where wandb wants its folder")
    tracker = Tracker.create(make_cfg("log.wandb_mode=offline"), tmp_path, is_main=True)
    assert tracker.mode == "disabled" and tracker.run_id is None
    tracker.log({"train/loss": 1.0}, step=1)
    tracker.finish()
    warnings = messages(train_log, logging.WARNING)
    assert len(warnings) == 1 and warnings[0].startswith("W&B off for this job: wandb.init failed ("), (
        warnings
    )
    assert not (tmp_path / ID_FILE).exists()


def test_auto_mode_asks_wandb_for_an_api_key(tmp_path):
    """auto: offline without credentials; online with a netrc entry as `wandb login` writes it (resolution
    only, no network). In a subprocess: wandb keeps found credentials for the rest of the process."""
    script = """
        from pathlib import Path
        from train.tracking import resolve_mode
        print("none:", resolve_mode("auto"))
        Path.home().joinpath(".netrc").write_text("machine api.wandb.ai\\n  login user\\n  password " + "k" * 40 + "\\n")
        print("netrc:", resolve_mode("auto"))
        print("env:", resolve_mode("auto", {"WANDB_MODE": "dryrun"}))
    """
    home = tmp_path / "home"
    home.mkdir()
    p = _run_script(script, _subprocess_env(home))
    assert p.returncode == 0, p.stderr
    assert "none: ('offline', 'log.wandb_mode=auto, no API key found')" in p.stdout, p.stdout
    assert "netrc: ('online', 'log.wandb_mode=auto, API key found')" in p.stdout, p.stdout
    assert "env: ('offline', 'WANDB_MODE=dryrun overrides log.wandb_mode=auto')" in p.stdout, p.stdout
    assert p.stderr.strip() == "", p.stderr  # wandb stays quiet


def test_unreachable_server_falls_back_to_offline(tmp_path):
    """Online with an API key but no server (a closed local port): one warning, then an offline run."""
    script = """
        import logging, sys
        from pathlib import Path
        from train.config import Config
        from train.tracking import Tracker
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stdout)
        t = Tracker.create(Config(), Path(sys.argv[1]), is_main=True)  # log.wandb_mode=auto by default
        t.log({"train/loss": 0.5}, step=7)
        t.finish()
        print("result:", t.mode, t.run_id)
    """
    home = tmp_path / "home"
    home.mkdir()
    env = _subprocess_env(
        home, WANDB_API_KEY="k" * 40, WANDB_BASE_URL="http://127.0.0.1:9", WANDB_INIT_TIMEOUT="2"
    )
    run_dir = tmp_path / "run"
    p = _run_script(script, env, str(run_dir))
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    warnings = [line for line in lines if line.startswith("WARNING")]
    assert len(warnings) == 1 and "W&B online start failed (" in warnings[0], p.stdout
    assert "falling back to offline" in warnings[0]
    result = lines[-1].split()
    assert result[:2] == ["result:", "offline"], p.stdout
    assert any(
        "W&B offline (log.wandb_mode=auto, API key found, online start failed)" in line for line in lines
    ), p.stdout
    (run,) = run_files(run_dir, result[2])
    assert user_rows(run) == [{"_step": 7, "train/loss": 0.5}]


def test_rows_reach_the_offline_file_before_a_sigterm_kills_wandbs_service(tmp_path, wandb_env):
    """SLURM's SIGTERM (preemption, scancel) reaches every process of a job, wandb's service included, and the
    service exits at once: rows it had not yet written to the run file are lost. Rows logged more than
    TRANSACTION_FLUSH_S before the signal must be in the file (wandb's default flush interval is 15 s)."""
    script = """
        import os, signal, sys, time
        from pathlib import Path
        from train.config import load_config
        from train.tracking import TRANSACTION_FLUSH_S, Tracker

        t = Tracker.create(load_config("demo", ["log.wandb_mode=offline"]), Path(sys.argv[1]), is_main=True)
        for step in range(1, 21):
            t.log({"train/loss": 1.0 / step}, step=step)
        t.log({"train/loss": 0.0}, step=21)  # wandb holds the last row open until the next step: this one
        time.sleep(TRANSACTION_FLUSH_S + 1.5)
        me, killed = str(os.getpid()), []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            if stat.rsplit(")", 1)[1].split()[1] == me:  # a child of this process: wandb's service
                os.kill(int(pid), signal.SIGTERM)
                killed.append(stat.split("(", 1)[1].split(")", 1)[0])
        print("killed:", killed, flush=True)
        time.sleep(1.0)
        os._exit(0)  # as the task does after its checkpoint; the service is gone, finish() would fail
    """
    run_dir = tmp_path / "run"
    p = _run_script(script, _subprocess_env(wandb_env), str(run_dir))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "wandb-core" in p.stdout, p.stdout
    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    run = RunFile(path, check=False)
    assert not run.exited  # the service really died before finishing the run
    rows = [
        {
            item.key or "/".join(item.nested_key): float(item.value_json)
            for item in r.history.item
            if (item.key or "/".join(item.nested_key)) in ("train/loss", "_step")
        }
        for r in run.records
        if r.WhichOneof("record_type") == "history"
    ]
    assert [row["_step"] for row in rows][:20] == list(range(1, 21)), rows
    assert [row["train/loss"] for row in rows][:20] == [1.0 / s for s in range(1, 21)]
