"""The demo a new user runs first (``make demo``): the band ``python evaluate`` checks a demo checkpoint against is
the one measured over seeds for exactly this recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.demo_seeds import recipe_digest
from evaluate.evaluator import demo_changes
from evaluate.reference import DEMO_BAND
from tests.conftest import REPO
from train.config import load_config
from train.engine import train

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
    assert demo_changes(cfg) == ["sched.epochs 20 → 2"]
    assert demo_changes(load_config("demo", ["data.root=/elsewhere", "seed=3"])) == []


# The learning test's tree: the first 4 demo classes are four red shapes (circle, square, triangle, star;
# data_pipeline.demo.class_specs), so colour tells nothing and only a net that learned shapes beats chance (75 %).
LEARN_CLASSES, LEARN_TRAIN, LEARN_VAL = 4, 80, 25
LEARN_EPOCHS, LEARN_BATCH = 10, 16  # 20 steps an epoch: 200 steps
LEARN_BOUND = 62.0  # val top-1 error, percent; chance 75 %; measured here: 53.0 (seed 0), 48.0 (seed 1)


@pytest.fixture(scope="module")
def shapes_tree(tmp_path_factory) -> Path:
    from data_pipeline.demo import class_specs, make_demo_dataset

    assert len({s.colour for s in class_specs(LEARN_CLASSES)}) == 1  # one colour: shape is the only cue
    root = tmp_path_factory.mktemp("shapes")
    make_demo_dataset(root, classes=LEARN_CLASSES, train_per_class=LEARN_TRAIN, val_per_class=LEARN_VAL,
                      seed=0, min_size=48, max_size=96)  # fmt: skip
    return root


@pytest.mark.parametrize("seed", [0, 1])
def test_the_demo_recipe_learns_shapes_on_two_seeds(shapes_tree, tmp_path, seed):
    """The demo's learning is real: its recipe (configs/demo.yaml: vgg11_bn from scratch, 32 px crops, SGD with a
    cosine lr), shortened to 200 steps of batch 16 on one process, takes four same-coloured shapes from chance
    (75 % error) to at most LEARN_BOUND in one of the last three epochs, on 100 val images, on two seeds. A net
    that learned nothing gets there with probability ~0.4 % a seed (3 looks at binomial n=100, p=0.75, 3 standard
    errors below); the 9 points between the bound and the worse seed here leave room for another CPU's kernel
    rounding, which moves these CPU results by a few points."""
    cfg = load_config("demo", [f"data.root={shapes_tree}", f"run_dir={tmp_path / 'run'}", f"seed={seed}",
                               f"model.num_classes={LEARN_CLASSES}", f"data.batch_size={LEARN_BATCH}",
                               f"sched.epochs={LEARN_EPOCHS}", "data.workers=0", "log.wandb_mode=disabled"])  # fmt: skip
    result = train(cfg)
    assert result["status"] == "done" and result["epoch"] == LEARN_EPOCHS
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == LEARN_EPOCHS * LEARN_CLASSES * LEARN_TRAIN // LEARN_BATCH
    assert rows[-1]["val_images"] == LEARN_CLASSES * LEARN_VAL
    errors = [r["val_top1_err"] for r in rows]
    print(f"seed {seed}: val top-1 err per epoch {[round(e, 1) for e in errors]}")
    assert rows[0]["val_top1_err"] > LEARN_BOUND  # it starts near chance: the bound is something it learns
    assert min(errors[-3:]) <= LEARN_BOUND, errors
