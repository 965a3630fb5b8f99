"""The demo a new user runs first (``make demo``): the band ``python evaluate`` checks a demo checkpoint against is
the one measured over seeds for exactly this recipe."""

from __future__ import annotations

import json

from benchmarks.demo_seeds import recipe_digest
from evaluate.evaluator import demo_changes
from evaluate.reference import DEMO_BAND
from tests.conftest import REPO
from train.config import load_config

RESULT = REPO / "benchmarks" / "results" / "demo_seeds_cpu.json"


def test_demo_band_is_the_measured_one_for_this_recipe():
    """DEMO_BAND (what `python evaluate` says of a demo checkpoint) = benchmarks/results/demo_seeds_cpu.json's best
    val top-1 error over its seeds, measured with configs/demo.yaml exactly as it is now (re-measure the band with
    `python benchmarks/demo_seeds.py` after changing the recipe)."""
    result = json.loads(RESULT.read_text())
    assert result["overrides"] == [] and len(result["seeds"]) >= 5
    assert result["recipe_sha256"] == recipe_digest(), "configs/demo.yaml changed since its band was measured"
    best = [r["best_top1_err"] for r in result["seeds"]]
    assert (DEMO_BAND.low, DEMO_BAND.high) == (round(min(best), 2), round(max(best), 2))
    assert DEMO_BAND.seeds == len(best) and DEMO_BAND.val_images == result["dataset"]["images"]["val"]
    assert max(best) < result["chance_top1_err"] - 20  # every seed learned more than colour alone (80 %)


def test_a_changed_recipe_is_named_and_gets_no_band():
    cfg = load_config("demo", ["sched.epochs=2", "data.root=/elsewhere", "seed=3", "data.workers=4"])
    assert demo_changes(cfg) == ["sched.epochs 8 → 2"]
    assert demo_changes(load_config("demo", ["data.root=/elsewhere", "seed=3"])) == []
