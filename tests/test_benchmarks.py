"""Benchmarks run in smoke mode (tiny data, seconds) so they never rot. No timing is asserted: only that each
script runs end to end on real data and writes complete, consistent results."""

from __future__ import annotations

import json

from tests.conftest import run_cli


def test_loader_throughput_smoke(tmp_path):
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
    for split in ("train", "val"):
        r = result["results"][split]
        assert r["dali-cpu"]["backend"] == "dali-cpu"
        assert r["torchvision-pil"]["backend"] == "torchvision"
        # every loader delivered one full epoch: train drops the partial batch, val keeps every image
        expected = {"train": (24 // 4) * 4, "val": 12}[split]
        for name in ("dali-cpu", "torchvision-pil", "torchvision-decode_image"):
            assert r[name]["images_per_s"] > 0 and r[name]["images_per_epoch"] == expected
        d, p = r["dali-cpu"]["images_per_s"], r["torchvision-pil"]["images_per_s"]
        assert abs(r["ratios"]["dali_over_pil_dataloader"] - d / p) < 0.01 * d / p
    text = readme.read_text()
    assert "| train |" in text and "| val |" in text and "smoke run" in text
    # a second run reuses the generated tree and appends a second table
    proc = run_cli("benchmarks/loader_throughput.py", "--smoke", "--data", str(tmp_path / "data"),
                   "--out", str(out), "--readme", str(readme))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert readme.read_text().count("### Loader throughput") == 2
