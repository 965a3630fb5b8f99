"""Benchmarks run in smoke mode (tiny data, seconds) so they never rot. No timing is asserted: only that each
script runs end to end on real data and writes complete, consistent results."""

from __future__ import annotations

import base64
import hashlib
import importlib
import json
import os
import zipfile

import pytest

from tests.conftest import run_cli


def test_loader_throughput_smoke(tmp_path):
    """Every backend on the tree and on its pack, in one run: full epochs, consistent ratios, and the files each
    loader opened (strace, where it runs): every image once an epoch from the folder, each shard at most once a
    reader process from the pack, nothing more in the second epoch where the reader persists."""
    out, readme = tmp_path / "lt.json", tmp_path / "README.md"
    proc = run_cli(
        "benchmarks/loader_throughput.py",
        "--smoke",
        "--data",
        str(tmp_path / "data"),
        "--out",
        str(out),
        "--readme",
        str(readme),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["smoke"] is True and result["threads"] == 1
    assert result["data"]["files"] == 36
    m = result["machine"]
    assert m["torch"] and m["torchvision"] and m["nvidia_dali"] and m["pillow"] and m["cpu_model"]
    assert result["decode_only"]["ceiling"]["images_per_s"] > 0
    pack = result["pack"]
    assert pack["root"] == str(tmp_path / "data-pack") and pack["shard_size"] == "40KB"
    assert pack["images"] == {"train": 24, "val": 12} and pack["reused"] is False
    shards = pack["shards"]
    assert shards["train"] >= 2 and shards["val"] >= 2  # several shards a split
    variants = ("dali-cpu", "torchvision-pil", "torchvision-decode_image")
    for split in ("train", "val"):
        r = result["results"][split]
        assert r["dali-cpu"]["backend"] == r["shards"]["dali-cpu"]["backend"] == "dali-cpu"
        assert r["torchvision-pil"]["backend"] == r["shards"]["torchvision-pil"]["backend"] == "torchvision"
        # every loader delivered one full epoch: train drops the partial batch, val keeps every image
        expected = {"train": (24 // 4) * 4, "val": 12}[split]
        for name in variants:
            for row in (r[name], r["shards"][name]):
                assert row["images_per_s"] > 0 and row["images_per_epoch"] == expected
            ratio = r["shards"][name]["images_per_s"] / r[name]["images_per_s"]
            assert abs(r["ratios"]["shards_over_folder"][name] - ratio) < 0.01 * ratio
        d, p = r["dali-cpu"]["images_per_s"], r["torchvision-pil"]["images_per_s"]
        assert abs(r["ratios"]["dali_over_pil_dataloader"] - d / p) < 0.01 * d / p
        opened = result["files_opened"]
        if "skipped" in opened:  # no usable strace here: said so, nothing counted
            assert "strace" in opened["skipped"]
            continue
        assert opened["epochs"] == 2 and "strace" in opened["method"]
        for name in variants:
            folder = opened["subjects"][f"{split} {name}"]
            packed = opened["subjects"][f"{split} {name} shards"]
            assert folder["images_per_epoch"] == packed["images_per_epoch"] == [expected, expected]
            assert folder["build"]["files"] == 0 and folder["build"]["directories"] > 0  # the folder walk
            assert packed["build"]["files"] == 1 + shards[split]  # manifest.json and one .idx a shard
            if name == "dali-cpu":  # DALI's file reader reads ahead, past an epoch's end too
                assert folder["epoch_1"]["files"] >= folder["epoch_1"]["distinct_files"] == expected
                assert folder["epoch_2"]["files"] > 0
            else:  # the DataLoader: each image it delivers, once an epoch
                for epoch in ("epoch_1", "epoch_2"):
                    assert folder[epoch]["files"] == folder[epoch]["distinct_files"] == expected
            assert packed["epoch_1"]["directories"] == packed["epoch_2"]["directories"] == 0
            one, two = packed["epoch_1"], packed["epoch_2"]
            if split == "train" and name == "dali-cpu":
                # a pipeline per epoch, each opening every tar once: epoch 1's, then epoch 2's and 3's, each built
                # ahead by a thread from half of the epoch before, so their opens land in that window or the next
                # (epoch 3's may come after the second window: then it holds none)
                assert one["distinct_files"] == shards[split] and two["distinct_files"] in (0, shards[split])
                assert one["files"] % shards[split] == two["files"] % shards[split] == 0
                assert 2 * shards[split] <= one["files"] + two["files"] <= 3 * shards[split], (one, two)
            else:
                # each tar exactly once: one worker, or one DALI reader (--smoke: 1 thread), reads them all (one
                # process, world size 1), and keeps them open: the worker, DALI's val pipeline
                assert (one["files"], two["files"]) == (shards[split], 0)
    text = readme.read_text()
    assert "| train |" in text and "| val |" in text and "smoke run" in text
    assert "| train | dali-cpu |" in text and "| val | torchvision-pil |" in text  # the folder-vs-pack rows
    # a second run reuses the generated tree and its pack, and appends a second table
    proc = run_cli("benchmarks/loader_throughput.py", "--smoke", "--data", str(tmp_path / "data"),
                   "--out", str(out), "--readme", str(readme))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert readme.read_text().count("### Loader throughput") == 2
    assert json.loads(out.read_text())["pack"]["reused"] is True


# --------------------------------------------------------------------------- train/eval throughput (issue 7)


def test_train_throughput_smoke(tmp_path):
    """All three sources in one run on a real JPEG tree; the figures are consistent with each other and with an
    independent MAC count; on a CPU the DALI-GPU source is skipped and DALI-CPU stands in, labelled."""
    from train.models import build_model, summarize

    out, readme = tmp_path / "tt.json", tmp_path / "README.md"
    proc = run_cli("benchmarks/train_throughput.py", "--smoke", "--arch", "vgg11", "--precision", "fp32",
                   "--profile", "--data", str(tmp_path / "data"), "--out", str(out), "--readme", str(readme))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    cuda = result["machine"]["gpu"] is not None
    assert result["smoke"] is True and result["setting"]["precision"] == "fp32"
    assert result["data"]["files"] == 2 * (24 + 8)
    assert result["command"].startswith("python benchmarks/train_throughput.py --smoke")
    (row,) = result["results"]
    assert row["arch"] == "vgg11" and row["input_size"] == 32
    expected_macs = summarize(build_model("vgg11", classifier_width=64), input_size=32).total_macs
    assert row["macs_per_image"] == expected_macs and row["train_flops_per_image"] == 6 * expected_macs
    src = row["sources"]
    dali = "dali-gpu" if cuda else "dali-cpu"
    if not cuda:
        assert src["dali-gpu"] == {"skipped": "no CUDA: DALI's GPU pipeline needs a CUDA device"}
    assert src["synthetic"]["backend"] == "synthetic"
    assert src[dali]["backend"] == dali and src["torchvision"]["backend"] == "torchvision"
    gemm = result["gemm_bf16"]["tflops"]
    assert gemm == max(result["gemm_bf16"]["before"]["tflops"], result["gemm_bf16"]["after"]["tflops"]) > 0
    for name in ("synthetic", dali, "torchvision"):
        r = src[name]
        assert r["timed_steps"] == 2 and r["warmup_steps"] == 1 and r["batch"] == 4
        assert r["images_per_s"] > 0 and r["loss_finite"] is True
        assert abs(r["images_per_s"] - 8 / r["seconds"]) <= 0.01 * r["images_per_s"] + 0.01
        assert abs(r["mfu"] - r["achieved_tflops"] / gemm) <= 1e-3 * r["mfu"] + 1e-4
        assert "aten::" in r["profile"]  # --profile: torch.profiler's operator table
    a, b, c = (src[k]["images_per_s"] for k in ("synthetic", dali, "torchvision"))
    assert row["ratios"]["dali_subject"] == dali
    assert abs(row["ratios"]["dali_over_synthetic"] - b / a) <= 5e-4 + 1e-3 * b / a
    assert abs(row["ratios"]["dali_over_pil_dataloader"] - b / c) <= 5e-4 + 1e-3 * b / c
    assert row["targets"] == "not evaluated: smoke run"
    text = readme.read_text()
    assert "### Training throughput" in text and "| vgg11 |" in text and "smoke run" in text
    assert cuda or ("DALI-CPU (stand-in: no CUDA)" in text and "GPU numbers are still to be taken" in text)


def test_eval_throughput_smoke(tmp_path):
    """Every backend counts each val image once per pass; the ratios follow from the figures."""
    out, readme = tmp_path / "et.json", tmp_path / "README.md"
    proc = run_cli("benchmarks/eval_throughput.py", "--smoke", "--arch", "vgg11", "--reps", "2",
                   "--data", str(tmp_path / "data"), "--out", str(out), "--readme", str(readme))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    cuda = result["machine"]["gpu"] is not None
    (row,) = result["results"]
    src = row["sources"]
    assert src["dali"]["backend"] == ("dali-gpu" if cuda else "dali-cpu")
    assert src["torchvision"]["backend"] == "torchvision"
    for r in src.values():
        assert r["images_per_pass"] == 16 and len(r["runs"]) == 2
        assert r["images_per_s"] == max(r["runs"]) > 0
    d = src["dali"]["images_per_s"]
    assert abs(row["ratios"]["dali_over_synthetic"] - d / src["synthetic"]["images_per_s"]) < 0.01 * d
    assert abs(row["ratios"]["dali_over_pil"] - d / src["torchvision"]["images_per_s"]) < 0.01 * d
    assert "### Evaluation throughput" in readme.read_text() and "| vgg11 |" in readme.read_text()


@pytest.mark.parametrize(
    ("script", "args", "message"),
    [
        ("train_throughput", ["--arch", "vgg99"], "error: --arch 'vgg99': vgg99 is not one of: all, vgg11"),
        ("train_throughput", ["--sources", "synthetic,pil"], "error: --sources 'synthetic,pil': pil is not"),
        (
            "train_throughput",
            ["--batch-per-gpu", "0"],
            "error: --batch-per-gpu, --steps, --workers and --gemm-size must",
        ),
        ("train_throughput", ["--precision", "fp8"], "error: argument --precision: invalid choice: 'fp8'"),
        ("eval_throughput", ["--arch", "custom"], "error: --arch 'custom': custom is not one of"),
        ("eval_throughput", ["--reps", "0"], "error: --batch, --reps and --workers must be positive"),
        ("eval_throughput", ["--sources", "dali,x"], "error: --sources 'dali,x': x is not one of"),
        ("loader_throughput", ["--batch", "x"], "error: argument --batch: invalid int value: 'x'"),
    ],
)
def test_throughput_bad_input(script, args, message, capsys):
    """Bad arguments are one `error:` line and exit status 2, before any work."""
    module = importlib.import_module(f"benchmarks.{script}")
    with pytest.raises(SystemExit) as e:
        module.main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and "\n" not in err


@pytest.mark.parametrize("script", ["train_throughput", "eval_throughput", "loader_throughput"])
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--out", "{tmp}"],
            "error: argument --out: {tmp} is a folder; give a file path such as {tmp}/result.json",
        ),
        (["--out", "{tmp}/file/o.json"], "error: argument --out: {tmp}/file is not a folder"),
        (["--readme", "{tmp}"], "error: argument --readme: {tmp} is a folder"),
    ],
)
def test_throughput_output_checked_before_any_work(script, args, message, tmp_path, capsys):
    """--out / --readme that cannot be written are one `error:` line and exit status 2 before the benchmark runs
    (--out to a folder used to crash with IsADirectoryError after it, leaving a .NAME.tmp-PID file)."""
    (tmp_path / "file").write_text("x")
    module = importlib.import_module(f"benchmarks.{script}")
    argv = ["--smoke", "--data", str(tmp_path / "data"), *(a.format(tmp=tmp_path) for a in args)]
    with pytest.raises(SystemExit) as e:
        module.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message.format(tmp=tmp_path)) and "\n" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # no data made, no probe or temp file left


def test_write_result_leaves_no_temp_file_when_the_destination_is_a_folder(tmp_path):
    from benchmarks.common import write_result

    (tmp_path / "out").mkdir()
    with pytest.raises(IsADirectoryError):
        write_result({"x": 1}, tmp_path / "out", tmp_path / "README.md", "| table |")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_train_throughput_tree_too_small(tmp_path, capsys):
    """A timed window that does not fit in one epoch of the tree is refused with a hint."""
    from benchmarks import train_throughput

    with pytest.raises(SystemExit) as e:
        train_throughput.main(["--smoke", "--arch", "vgg11", "--sources", "torchvision", "--warmup", "12",
                               "--data", str(tmp_path / "data"), "--out", str(tmp_path / "o.json")])  # fmt: skip
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: one epoch of") and "has 12 batches of 4" in err and "--warmup" in err
    assert not (tmp_path / "o.json").exists()


# ------------------------------------------------------------------------- wheels to the device (issue 7)


def _wheel(folder, name, version, files):
    """A real (installable) pure-Python wheel with ``files`` {path: bytes} and a correct RECORD."""
    dist = f"{name}-{version}.dist-info"
    files = {
        **files,
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    files[f"{dist}/RECORD"] = ("\n".join([*record, f"{dist}/RECORD,,"]) + "\n").encode()
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name_, data in files.items():
            z.writestr(name_, data)
    return path


def test_wheels_split_join_install_round_trip(tmp_path, capsys):
    """Split two real wheels into 1 MiB parts, lose and corrupt parts (clear errors), join them back byte for
    byte, install them offline into a folder and import from it with the written env.sh's paths."""
    from benchmarks.device import wheels

    kit, parts, joined, site = (tmp_path / d for d in ("kit", "parts", "joined", "site"))
    kit.mkdir()
    probe = _wheel(kit, "kitprobe", "0.3", {"kitprobe/__init__.py": b"__version__ = '0.3'\n"})
    blob = os.urandom(2_600_000)  # incompressible: three 1 MiB parts
    _wheel(kit, "kitblob", "1.0", {"kitblob/__init__.py": b"", "nvidia/kitlib/lib/libkit.so.1": blob})
    manifest = wheels.split(sorted(kit.glob("*.whl")), parts, part_mib=1)
    assert [p["name"] for p in manifest["parts"]] == ["kit.part000", "kit.part001", "kit.part002"]
    assert all(p["bytes"] <= 2**20 for p in manifest["parts"])
    assert sum(p["bytes"] for p in manifest["parts"]) == manifest["tar_bytes"]

    (parts / "kit.part001").rename(tmp_path / "saved")
    assert wheels.main(["status", "--parts", str(parts)]) == 0
    assert "still to carry: kit.part001" in capsys.readouterr().out
    assert wheels.main(["join", "--parts", str(parts), "--dest", str(joined)]) == 1
    assert (
        capsys.readouterr().err.strip() == "error: cannot join: missing kit.part001; carry those parts again"
    )
    (tmp_path / "saved").rename(parts / "kit.part001")
    data = bytearray((parts / "kit.part002").read_bytes())
    data[100] ^= 0xFF
    (parts / "kit.part002").write_bytes(bytes(data))
    assert wheels.main(["join", "--parts", str(parts), "--dest", str(joined)]) == 1
    assert "corrupt (size or sha256) kit.part002" in capsys.readouterr().err
    data[100] ^= 0xFF
    (parts / "kit.part002").write_bytes(bytes(data))

    proc = run_cli("benchmarks/device/wheels.py", "status", "--parts", str(parts))  # as a script: stdlib only
    assert proc.returncode == 0 and "3 of 3" in proc.stdout and "complete" in proc.stdout
    out = wheels.join(parts, joined)
    assert sorted(p.name for p in out) == sorted(p.name for p in kit.glob("*.whl"))
    for w in kit.glob("*.whl"):
        assert (joined / w.name).read_bytes() == w.read_bytes()

    versions = wheels.install(sorted(joined.glob("*.whl")), site, check=["kitprobe", "kitblob"])
    assert versions == {"kitprobe": "0.3", "kitblob": "ok"}
    assert (site / "nvidia/kitlib/lib/libkit.so.1").read_bytes() == blob
    env = (site / "env.sh").read_text()
    assert f'PYTHONPATH="{site.resolve()}' in env and str((site / "nvidia/kitlib/lib").resolve()) in env
    assert probe.name in {w["name"] for w in json.loads((parts / "kit.json").read_text())["wheels"]}


# ------------------------------------------------------------------------------ the scaling note (issue 7)


def test_scaling_note_matches_models_and_model_code(repo):
    """benchmarks/README.md's all-reduce table: parameter counts of the real models, bytes and ring times from
    benchmarks.common's model; and the model's arithmetic itself."""
    import torch

    from benchmarks import common
    from train.models import TORCHVISION_ARCHS, build_model

    text = (repo / "benchmarks/README.md").read_text()
    rows: dict[str, str] = {}
    for line in text.splitlines():  # the first table with a row per arch is the all-reduce table
        if line.startswith("| vgg"):
            rows.setdefault(line.split("|")[1].strip(), line)
    for arch in TORCHVISION_ARCHS:
        with torch.device("meta"):  # counts only: no memory, no init work
            params = sum(p.numel() for p in build_model(arch).parameters())
        cells = [c.strip() for c in rows[arch].split("|")[1:-1]]
        assert cells[1] == f"{params:,}"
        assert cells[4] == f"{2 * params / 1e6:.1f}" and cells[5] == f"{4 * params / 1e6:.1f}"
        assert cells[6] == f"{common.allreduce_seconds(4 * params, 8) * 1e3:.2f} ms"
        assert cells[7] == f"{common.allreduce_seconds(4 * params, 64) * 1e3:.1f} ms"
        assert cells[8] == f"{common.allreduce_seconds(2 * params, 64) * 1e3:.1f} ms"

    # ring all-reduce: 2(N-1)/N x bytes / bandwidth; NVLink inside a node, InfiniBand across nodes
    assert common.ring_allreduce_seconds(1e9, 1, 100.0) == 0.0
    assert abs(common.allreduce_seconds(1e9, 8) - 1.75 / common.INTRA_NODE_BUS_GBPS) < 1e-12
    assert abs(common.allreduce_seconds(1e9, 16) - 1.875 / common.INTER_NODE_BUS_GBPS) < 1e-12
    e = common.predicted_efficiency(1000.0, 32, 4e8, 16, overlap_fraction=0.5)
    comm = 2 * 15 / 16 * 4e8 / (common.INTER_NODE_BUS_GBPS * 1e9)
    assert abs(e["exposed_comm_s"] - max(0.0, comm - 0.016)) < 1e-12
    assert abs(e["efficiency"] - 0.032 / (0.032 + e["exposed_comm_s"])) < 1e-12
    assert e["efficiency_no_overlap"] < e["efficiency"] <= 1.0
    r = common.recipe_hours(2000.0, 90)
    assert abs(r["gpu_hours"] - 90 * 1_281_167 / 2000 / 3600) < 1e-9
    report = common.scaling_report(138_365_992, 0.992, 2000.0, 128)
    assert report["allreduce_bytes_per_step"] == {"fp32": 4 * 138_365_992, "bf16": 2 * 138_365_992}
    assert [x["gpus"] for x in report["efficiency"]["fp32"]] == [8, 16, 32, 64]
    assert [x["gpus"] for x in report["recipes"]["paper"]] == [1, 8, 16, 32, 64]


def test_resume_cost_smoke(tmp_path):
    """benchmarks/resume_cost.py end to end on a tiny tree, DALI only (the backend with a pipeline state; the
    torchvision rows are the same start/stop code with another override, and half of this test's minute): stopped
    mid-epoch, the snapshot holds its pipeline state, every variant timed to its first step, the ratio is that of
    the medians; the DALI / torchvision ratios are left out rather than made up."""
    out, readme = tmp_path / "rc.json", tmp_path / "README.md"
    proc = run_cli("benchmarks/resume_cost.py", "--smoke", "--backends", "dali-cpu", "--workers", "1",
                   "--data", str(tmp_path / "data"),
                   "--runs", str(tmp_path / "runs"), "--out", str(out), "--readme", str(readme), timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    s = result["setting"]
    assert result["smoke"] is True and (s["train_images"], s["batch"], s["steps_per_epoch"]) == (48, 4, 12)
    b = result["backends"]
    assert set(b) == {"dali-cpu"} and result["ratios"] == {}
    r = b["dali-cpu"]
    assert set(r["seconds"]) == {"fresh", "resume", "resume-no-state"}
    assert 0 < r["snapshot"]["batch"] < 12 and r["snapshot"]["step"] == r["snapshot"]["batch"]
    assert all(len(xs) == 1 and xs[0] > 0 for xs in r["seconds"].values())
    med = r["median_s"]
    assert abs(r["ratios"]["resume_over_fresh"] - med["resume"] / med["fresh"]) < 1e-9
    assert r["snapshot"]["loader_state_bytes"] > 0
    text = readme.read_text()
    assert "### Resume cost" in text and "| dali-cpu |" in text and "| torchvision |" not in text
    assert "DALI-CPU / torchvision" not in text and "bytes a rank" in text


# ------------------------------------------------------------------------------------------- scale (issue 28)


def test_scale_smoke(tmp_path):
    """The hard-linked ImageNet-shaped tree, its pack, check --quick and full, and rank 0's DALI loader on the
    tree and on the pack, each in a child process under strace: figures present and consistent with the tree."""
    scale = importlib.import_module("benchmarks.scale")
    out, readme, root = tmp_path / "scale.json", tmp_path / "README.md", tmp_path / "tree"
    argv = ["--smoke", "--backends", "dali", "--root", str(root), "--out", str(out), "--readme", str(readme)]
    assert scale.main(argv) == 0
    r = json.loads(out.read_text())
    assert r["smoke"] and r["machine"]["load_average_at_start"] and r["load_average_at_end"]
    assert r["tree"]["files"] == 400 and r["tree"]["val_files"] == 15 and r["tree"]["reused"] is False
    classes = sorted(p.name for p in (root / "train").iterdir())
    assert len(classes) == 10 and sum(1 for _ in (root / "train").rglob("*.JPEG")) == 400
    assert all(p.stat().st_nlink > 1 for p in (root / "val").rglob("*.JPEG"))  # hard links to a few sources
    assert r["pack"]["shards"]["train"] > 1 and r["pack"]["wall_s"] > 0 and r["pack"]["cpu_s"] >= 0
    assert r["check_quick"]["sound"] and r["check_full"]["sound"]
    assert r["check_quick"]["images"] == r["check_full"]["images"] == r["check_full"]["decoded"] == 415
    assert r["check_quick"]["decoded"] == 20  # one per class of each split
    for fmt in ("folder", "shards"):
        row = r["loaders"][f"dali-{fmt}"]
        assert row["batches_per_epoch"] == (400 // 2) // 8, row  # rank 0 of W = 2, 8 a rank
        assert row["start_to_first_batch"]["wall_s"] > 0 and row["imports"]["cpu_s"] > 0
        opened = row["opened_to_first_batch"]
        if "skipped" in opened:
            continue
        if fmt == "folder":  # the listing walks every class folder of the split (and the other's top)
            assert opened["directories"] >= len(classes)
        else:  # a pack is listed by its manifest and index files, no directory walk
            assert opened["directories"] == 0 and opened["files"] >= 1 + r["pack"]["shards"]["train"]
    assert "dali-folder" in readme.read_text()
