"""The typed config: recipes, overrides, round-trips and one clear error per bad input."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from tests.conftest import run_cli
from train.config import (
    CONFIG_DIR,
    Config,
    ConfigError,
    available_recipes,
    effective_lr,
    from_dict,
    load_config,
    per_process_batch,
    resolve_config_path,
    save_yaml,
    to_dict,
    to_yaml,
)
from train.models import ARCHS

ARCHS_8 = ["vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn"]
PAPER_EXTRA = ["vgg11_lrn", "vgg16_c"]
FAMILIES = ["torchvision", "paper"]
RECIPES = available_recipes()


def test_every_arch_has_a_recipe_in_both_families():
    for family in FAMILIES:
        for arch in ARCHS_8 + PAPER_EXTRA:
            assert (CONFIG_DIR / family / f"{arch}.yaml").is_file(), f"{family}/{arch}"
    assert "demo" in RECIPES and "vgg16_bn" in RECIPES and "paper/vgg16" in RECIPES
    assert len(RECIPES) == 2 * 10 + 1


@pytest.mark.parametrize("arch", ARCHS_8 + PAPER_EXTRA)
def test_torchvision_recipe(arch):
    cfg = load_config(f"torchvision/{arch}")
    assert cfg.recipe == "torchvision" and cfg.model.arch == arch
    assert cfg.data.batch_size == 256 and cfg.data.augment == "rrc" and cfg.data.hflip
    assert (cfg.data.train_crop, cfg.data.val_resize, cfg.data.val_crop) == (224, 256, 224)
    assert cfg.optim.name == "sgd" and cfg.optim.momentum == 0.9 and cfg.optim.weight_decay == 1e-4
    assert cfg.optim.lr == (0.1 if arch.endswith("_bn") else 0.01)
    assert (cfg.sched.name, cfg.sched.step_size, cfg.sched.gamma, cfg.sched.epochs) == ("step", 30, 0.1, 90)
    assert cfg.run_dir == f"runs/torchvision-{arch}"
    # the short name means the torchvision family
    assert load_config(arch) == cfg


@pytest.mark.parametrize("arch", ARCHS_8 + PAPER_EXTRA)
def test_paper_recipe(arch):
    cfg = load_config(f"paper/{arch}")
    assert cfg.recipe == "paper" and cfg.model.arch == arch
    assert cfg.data.batch_size == 256 and cfg.optim.momentum == 0.9 and cfg.optim.weight_decay == 5e-4
    assert cfg.model.dropout == 0.5 and cfg.optim.lr == 0.01
    assert (cfg.sched.name, cfg.sched.gamma, cfg.sched.plateau_max_drops, cfg.sched.epochs) == (
        "plateau",
        0.1,
        3,
        74,
    )
    # Table 3: A, A-LRN and B were trained at S = 256 only; C, D, E's best row is jittered S in [256, 512].
    s_max = 256 if arch.startswith(("vgg11", "vgg13")) else 512
    assert cfg.data.augment == "scale" and (cfg.data.scale_min, cfg.data.scale_max) == (256, s_max)
    assert cfg.data.color_pca_std == 0.1 and cfg.data.train_crop == 224 and cfg.data.hflip


def test_recipes_comment_their_sources():
    for path in CONFIG_DIR.rglob("*.yaml"):
        text = path.read_text()
        assert text.lstrip().startswith("#"), f"{path} must start with a comment naming its source"
    base = (CONFIG_DIR / "_base" / "torchvision.yaml").read_text()
    assert "global = 8 GPUs × 32" in base and "lr × B / 256" in base
    assert "29.63" in (CONFIG_DIR / "torchvision" / "vgg11_bn.yaml").read_text()


def test_demo_recipe_is_small():
    cfg = load_config("demo")
    assert cfg.recipe == "demo" and cfg.launch.gpus == 2 and cfg.data.batch_size % 2 == 0
    assert cfg.model.classifier_width < 4096 and cfg.data.train_crop <= 64
    # the smaller classifier is the demo's alone
    for name in RECIPES:
        if name != "demo":
            assert load_config(name).model.classifier_width == 4096, name


@pytest.mark.parametrize("name", RECIPES)
def test_round_trip_yaml_and_dict(name, tmp_path):
    cfg = load_config(name)
    path = save_yaml(cfg, tmp_path / "config.yaml")
    assert load_config(path) == cfg
    assert from_dict(to_dict(cfg)) == cfg
    # a plain dict of builtins: loadable from a checkpoint with weights_only=True
    torch.save({"config": to_dict(cfg)}, tmp_path / "c.pth")
    assert torch.load(tmp_path / "c.pth", weights_only=True)["config"] == to_dict(cfg)


def test_interface_keys_exist():
    cfg = Config()
    for key in [
        "model.arch",
        "data.root",
        "data.backend",
        "data.batch_size",
        "optim.lr",
        "optim.weight_decay",
        "sched.epochs",
        "run_dir",
        "seed",
        "log.wandb_mode",
    ]:
        node = cfg
        for part in key.split("."):
            assert hasattr(node, part), key
            node = getattr(node, part)
    assert {f.name for f in dataclasses.fields(cfg)} >= {
        "data",
        "model",
        "optim",
        "sched",
        "ckpt",
        "log",
        "dist",
        "launch",
    }


def test_overrides_are_typed():
    cfg = load_config(
        "vgg16_bn",
        [
            "optim.lr=0.02",
            "data.batch_size=512",
            "data.hflip=false",
            "data.mean=[0.5, 0.5, 0.5]",
            "log.tags=[a, b]",
            "data.root=/datasets/imagenet",
            "seed=7",
            "log.wandb_mode=disabled",
            "run_dir=/shared/runs/x",
            "model.init_from=/ckpt/a:b.pth",
        ],
    )
    assert cfg.optim.lr == 0.02 and isinstance(cfg.optim.lr, float)
    assert cfg.data.batch_size == 512 and cfg.data.hflip is False and cfg.data.mean == [0.5, 0.5, 0.5]
    assert cfg.log.tags == ["a", "b"] and cfg.seed == 7 and cfg.data.root == "/datasets/imagenet"
    assert cfg.log.wandb_mode == "disabled" and cfg.run_dir == "/shared/runs/x"
    assert cfg.model.init_from == "/ckpt/a:b.pth"
    # later overrides win, and an int is accepted where a float is expected
    assert load_config("vgg16", ["optim.lr=1", "optim.lr=0.5"]).optim.lr == 0.5


def test_custom_layer_list_override():
    cfg = load_config(
        "vgg11",
        [
            "model.arch=custom",
            "model.layers=[64, M, 128, M, LRN, 256, 1x1:256, M, 512, M, 512, M]",
            "model.batch_norm=true",
        ],
    )
    assert cfg.model.layers == [64, "M", 128, "M", "LRN", 256, "1x1:256", "M", 512, "M", 512, "M"]
    assert cfg.model.batch_norm is True


def test_lr_scaling_and_per_process_batch():
    cfg = load_config("vgg16_bn", ["data.batch_size=1024", "optim.lr_scaling=linear"])
    assert effective_lr(cfg) == pytest.approx(0.4)
    assert effective_lr(load_config("vgg16_bn", ["data.batch_size=1024"])) == 0.1
    assert per_process_batch(cfg, 8) == 128
    with pytest.raises(ConfigError, match="not divisible"):
        per_process_batch(cfg, 3)


BAD = [
    (["optim.lrr=0.1"], r"unknown key 'optim.lrr' \(did you mean 'optim.lr'\?\)"),
    (["foo=1"], r"unknown key 'foo'"),
    (["optim.lr=abc"], r"optim.lr: expected float, got 'abc'"),
    (["data.batch_size=2.5"], r"data.batch_size: expected int"),
    (["data.hflip=maybe"], r"data.hflip: expected bool"),
    (["optim=3"], r"'optim' is a section"),
    (["optim.lr.x=3"], r"'optim.lr' is a value, not a section"),
    (["optim.lr=-0.1"], r"optim.lr must be positive, got -0.1"),
    (["optim.weight_decay=-1"], r"optim.weight_decay must be >= 0"),
    (
        ["data.batch_size=250", "launch.gpus=8"],
        r"data.batch_size=250 \(global\) is not divisible by the launch.gpus 8",
    ),
    (["data.backend=ffcv"], r"data.backend='ffcv' is not one of: dali, torchvision"),
    (["model.arch=vgg17"], r"model.arch='vgg17' is not one of: vgg11, "),
    (["model.dropout=1.0"], r"model.dropout must be in \[0, 1\)"),
    (["sched.epochs=0"], r"sched.epochs must be positive"),
    (["data.val_resize=200"], r"data.val_resize \(200\) must be >= data.val_crop \(224\)"),
    (["data.rrc_scale=[0.5, 0.1]"], r"data.rrc_scale must be"),
    (["model.layers=[64, M]"], r"model.layers is only for model.arch=custom"),
    (["model.arch=custom"], r"model.arch=custom needs model.layers"),
    (["model.arch=custom", "model.layers=[64, Q, 512, M]"], r"model.layers: .*'Q'"),
    (["launch.time=3 days"], r"launch.time must be SLURM's"),
    (["optim.lr"], r"override 'optim.lr' is not of the form section.key=value"),
    (["log.tags=x"], r"log.tags: expected list\[str\]"),
    (["dist.grad_compression=int8"], r"dist.grad_compression='int8' is not one of: none, fp16, bf16$"),
    (["dist.grad_compression=FP16"], r"dist.grad_compression='FP16' is not one of: none, fp16, bf16$"),
    (["model.init=he"], r"model.init='he' is not one of: torchvision, paper, glorot$"),
    (["model.init=Paper"], r"model.init='Paper' is not one of: torchvision, paper, glorot$"),
    # a key in the wrong section (or none) suggests the section that has it
    (["train.epochs=1"], r"unknown key 'train.epochs' \(did you mean 'sched.epochs'\?\)$"),
    (["epochs=1"], r"unknown key 'epochs' \(did you mean 'sched.epochs'\?\)$"),
    (["train.epoch=1"], r"unknown key 'train.epoch' \(did you mean 'sched.epochs'\?\)$"),
    (["lr=0.1"], r"unknown key 'lr' \(did you mean 'optim.lr'\?\)$"),
    (["dist.name=x"], r"\(did you mean 'optim.name' or 'sched.name' or 'log.name'\?\)$"),
    # non-finite floats, scalars and lists alike
    (["optim.lr=.inf"], r"^optim.lr must be a finite number, got inf$"),
    (["optim.lr=1e400"], r"^optim.lr must be a finite number, got inf$"),
    (["optim.lr=.nan"], r"^optim.lr must be a finite number, got nan$"),
    (["sched.gamma=-.inf"], r"^sched.gamma must be a finite number, got -inf$"),
    (["data.std=[0.2, .inf, 0.2]"], r"^data.std must hold finite numbers, got \[0.2, inf, 0.2\]$"),
    # null for a key that has no null
    (["seed=null"], r"^command line: seed: expected int, got null$"),
    (["model.arch=null"], r"^command line: model.arch: expected str, got null$"),
    (["data.mean=null"], r"^command line: data.mean: expected list\[float\], got null$"),
    # crops smaller than the max pools allow (vgg16_bn: 5 pools)
    (
        ["data.train_crop=16", "data.val_resize=18", "data.val_crop=16"],
        r"^data.train_crop=16: vgg16_bn has 5 max pools, so crops must be >= 32 px$",
    ),
    (["data.val_crop=31"], r"^data.val_crop=31: vgg16_bn has 5 max pools, so crops must be >= 32 px$"),
    (["data.val_crop=1"], r"^data.val_crop=1: vgg16_bn has 5 max pools, so crops must be >= 32 px$"),
    (
        ["model.arch=custom", "model.layers=[64, M, LRN, 1x1:512, M, 512, M]", "data.train_crop=7"],
        r"^data.train_crop=7: model.layers \(arch=custom\) has 3 max pools, so crops must be >= 8 px$",
    ),
]


@pytest.mark.parametrize(("overrides", "message"), BAD, ids=[b[0][-1] for b in BAD])
def test_bad_input_is_one_clear_error(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config("vgg16_bn", overrides)
    assert "\n" not in str(info.value)


def test_smallest_crop_the_max_pools_accept():
    assert (
        load_config("demo", ["data.train_crop=32", "data.val_resize=32", "data.val_crop=32"]).data.val_crop
        == 32
    )
    for arch in ARCHS_8 + PAPER_EXTRA:
        load_config(arch, ["data.val_crop=32", "data.train_crop=32"])
        with pytest.raises(
            ConfigError, match=rf"^data.val_crop=31: {arch} has 5 max pools, so crops must be >= 32"
        ):
            load_config(arch, ["data.val_crop=31"])
    custom = ["model.arch=custom", "model.layers=[64, M, 512, M]"]
    assert load_config("vgg11", [*custom, "data.train_crop=4", "data.val_crop=4"]).data.train_crop == 4
    # the paper's scale S is >= train_crop, so it is bounded too
    with pytest.raises(ConfigError, match=r"train_crop \(224\) <= scale_min \(16\)"):
        load_config("paper/vgg16", ["data.scale_min=16"])


def test_cli_crop_too_small_is_one_line():
    out = run_cli(
        "-m", "train", "--config", "demo", "data.train_crop=16", "data.val_resize=18", "data.val_crop=16"
    )
    assert out.returncode == 2 and out.stdout == ""
    assert (
        out.stderr.strip() == "error: data.train_crop=16: vgg11_bn has 5 max pools, so crops must be >= 32 px"
    )


def test_null_in_a_yaml_file_names_the_file(tmp_path):
    (tmp_path / "n.yaml").write_text("seed: ~\n")
    with pytest.raises(ConfigError, match=r"n.yaml: seed: expected int, got null$"):
        load_config(tmp_path / "n.yaml")


def test_world_size_must_divide_global_batch():
    load_config("vgg16_bn", world_size=8)
    with pytest.raises(ConfigError, match=r"not divisible by the world size 3"):
        load_config("vgg16_bn", world_size=3)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="unknown config 'nope'"):
        load_config("nope")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: [0.1\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("base: " + str(CONFIG_DIR / "_base" / "paper.yaml") + "\nmodel:\n  arhc: vgg16\n")
    with pytest.raises(
        ConfigError, match=r"typo.yaml: unknown key 'model.arhc' \(did you mean 'model.arch'\?\)"
    ):
        load_config(typo)
    loop = tmp_path / "loop.yaml"
    loop.write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(loop)


def test_yaml_base_chain_and_precedence(tmp_path):
    (tmp_path / "mine.yaml").write_text(f"base: {CONFIG_DIR / 'paper' / 'vgg16.yaml'}\noptim:\n  lr: 0.005\n")
    cfg = load_config(tmp_path / "mine.yaml", ["sched.epochs=3"])
    assert (
        cfg.recipe == "paper"
        and cfg.model.arch == "vgg16"
        and cfg.optim.lr == 0.005
        and cfg.sched.epochs == 3
    )
    assert cfg.optim.weight_decay == 5e-4  # from the paper base


@pytest.mark.parametrize("name", ["vgg16_bn", "paper/vgg11_lrn", "demo"])
def test_recipe_copied_out_of_the_repo_finds_its_base(name, tmp_path):
    # configs/<family>/*.yaml say `base: ../_base/<family>.yaml`, demo.yaml `base: _base/torchvision.yaml`
    copy = tmp_path / "deep" / "my.yaml"
    copy.parent.mkdir()
    copy.write_text(resolve_config_path(name).read_text())
    assert load_config(copy) == load_config(name)


def test_base_next_to_the_file_wins_over_configs(tmp_path):
    (tmp_path / "_base").mkdir()
    (tmp_path / "_base" / "torchvision.yaml").write_text("recipe: paper\nsched:\n  epochs: 7\n")
    (tmp_path / "my.yaml").write_text("base: _base/torchvision.yaml\noptim:\n  lr: 0.5\n")
    cfg = load_config(tmp_path / "my.yaml")
    assert (cfg.recipe, cfg.sched.epochs, cfg.optim.lr) == ("paper", 7, 0.5)
    # a list of bases, later ones win; one found next to the file, one in configs/
    (tmp_path / "two.yaml").write_text("base: [../_base/paper.yaml, _base/torchvision.yaml]\n")
    cfg = load_config(tmp_path / "two.yaml")
    assert (cfg.sched.epochs, cfg.optim.weight_decay) == (7, 5e-4)


BAD_BASES = [
    ("nope.yaml", r"base 'nope.yaml' not found \(tried {tmp}/nope.yaml, {cfg}/nope.yaml\)$"),
    ("../_base/nope.yaml", r"base '../_base/nope.yaml' not found \(tried .*, {cfg}/_base/nope.yaml\)$"),
    (
        "demo",
        r"base 'demo' is not a .yaml file path \(tried {tmp}/demo, {cfg}/demo\); did you mean 'demo.yaml'\?$",
    ),
    ("_base", r"base '_base' is not a .yaml file path \(tried {tmp}/_base, {cfg}/_base\)$"),
    (
        "dir.yaml",
        r"base 'dir.yaml' is a directory, not a YAML file \(tried {tmp}/dir.yaml, {cfg}/dir.yaml\)$",
    ),
    ("3", r"base must be a YAML file path or a list of them, got 3$"),
    ("[demo.yaml, 4]", r"base must be a YAML file path or a list of them, got 4$"),
]


@pytest.mark.parametrize(("base", "message"), BAD_BASES, ids=[b[0] for b in BAD_BASES])
def test_bad_base_is_one_error_naming_the_file_and_places_tried(base, message, tmp_path):
    (tmp_path / "dir.yaml").mkdir()
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: {base}\n")
    pattern = re.escape(f"{bad.resolve()}: ") + message.format(
        tmp=re.escape(str(tmp_path.resolve())), cfg=re.escape(str(CONFIG_DIR))
    )
    with pytest.raises(ConfigError, match=pattern) as info:
        load_config(bad)
    assert "\n" not in str(info.value)


def test_cli_copied_recipe_prints_its_config(tmp_path):
    copy = tmp_path / "my.yaml"
    copy.write_text((CONFIG_DIR / "torchvision" / "vgg16_bn.yaml").read_text())
    out = run_cli("-m", "train", "--config", str(copy), "--print-config")
    assert out.returncode == 0, out.stderr
    assert out.stdout == to_yaml(load_config("vgg16_bn"))
    (tmp_path / "b.yaml").write_text("base: nope.yaml\n")
    out = run_cli("-m", "train", "--config", str(tmp_path / "b.yaml"), "--print-config")
    assert (
        out.returncode == 2 and out.stderr.startswith("error: ") and len(out.stderr.strip().splitlines()) == 1
    )


def test_cli_print_config_round_trips(tmp_path):
    out = run_cli("-m", "train", "--config", "paper/vgg19", "optim.lr=0.02", "--print-config")
    assert out.returncode == 0, out.stderr
    (tmp_path / "c.yaml").write_text(out.stdout)
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg == load_config("paper/vgg19", ["optim.lr=0.02"])
    assert to_yaml(cfg) == out.stdout


def test_cli_errors_are_one_line():
    out = run_cli("-m", "train", "--config", "vgg16_bn", "optim.lr=-1", "--print-config")
    assert out.returncode == 2
    assert out.stderr.strip() == "error: optim.lr must be positive, got -1.0"
    out = run_cli("-m", "train", "--config", "vgg16_bn", "optim.momentun=0.9")
    assert out.returncode == 2
    assert (
        out.stderr.strip()
        == "error: command line: unknown key 'optim.momentun' (did you mean 'optim.momentum'?)"
    )


def test_cli_lists_recipes():
    out = run_cli("-m", "train", "--list")
    assert out.returncode == 0 and set(out.stdout.split()) == set(RECIPES)


def test_arch_registry_matches_recipes():
    assert set(ARCHS_8 + PAPER_EXTRA) <= set(ARCHS)


# ------------------------------------------------------------------------------------------ model.init


def test_model_init_defaults_to_torchvision_in_every_recipe():
    assert Config().model.init == "torchvision"
    for name in RECIPES:
        assert load_config(name).model.init == "torchvision", name


@pytest.mark.parametrize("init", ["torchvision", "paper", "glorot"])
def test_model_init_round_trips_yaml_and_dict(init, tmp_path):
    cfg = load_config("paper/vgg13", [f"model.init={init}", "model.init_from=runs/paper-vgg11/best.pth"])
    assert cfg.model.init == init and cfg.model.init_from == "runs/paper-vgg11/best.pth"
    path = save_yaml(cfg, tmp_path / "config.yaml")
    assert f"init: {init}" in path.read_text()
    assert load_config(path) == cfg
    assert from_dict(to_dict(cfg)) == cfg
    torch.save({"config": to_dict(cfg)}, tmp_path / "c.pth")
    stored = torch.load(tmp_path / "c.pth", weights_only=True)["config"]
    assert stored["model"]["init"] == init and from_dict(stored) == cfg
    (tmp_path / "mine.yaml").write_text(
        f"base: {CONFIG_DIR / 'paper' / 'vgg11.yaml'}\nmodel:\n  init: {init}\n"
    )
    assert load_config(tmp_path / "mine.yaml").model.init == init


def test_model_init_missing_from_an_older_stored_config_means_torchvision():
    old = to_dict(load_config("vgg16_bn"))
    del old["model"]["init"]
    assert from_dict(old).model.init == "torchvision"


def test_stored_config_of_a_run_on_another_process_count_loads():
    """torchrun decides the process count: a 3-process run of the demo recipe (launch.gpus=2) with a global batch
    of 3 passed its checks with world size 3; its checkpoint's config must load again (resume, evaluate)."""
    cfg = load_config("demo", ["data.batch_size=3"], world_size=3)
    assert from_dict(to_dict(cfg)) == cfg
    with pytest.raises(
        ConfigError, match=r"data.batch_size=3 \(global\) is not divisible by the launch.gpus 2"
    ):
        from_dict(to_dict(cfg), batch_split=True)


def test_bad_model_init_on_the_command_line_is_one_line():
    out = run_cli("-m", "train", "--config", "paper/vgg11", "model.init=he", "--print-config")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip() == "error: model.init='he' is not one of: torchvision, paper, glorot"
