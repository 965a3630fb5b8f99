"""The evaluator (python evaluate): exact counts, checkpoint loading, the paper's protocols, predict, bad input.

Real data: a demo JPEG tree (7 classes x 3 val images: 21, so 2 processes get 10 and 11), real loaders (the
torchvision backend and DALI's CPU pipeline), real checkpoint files. Models are small (a custom 5-conv trunk with
a 16-wide classifier, or vgg11_bn at 64 px) so the file runs in well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from data_pipeline import build_loader
from data_pipeline.demo import make_demo_dataset
from data_pipeline.layout import DataError, index_split
from data_pipeline.transforms import TransformSpec
from evaluate.__main__ import main
from evaluate.core import Counts, count_loader, precision_context
from evaluate.evaluator import EvalOptions, compare, run_evaluation
from evaluate.imagenet_classes import imagenet_classes
from evaluate.loading import infer_spec, load_model
from evaluate.predict import class_names
from evaluate.protocols import DenseVGG, default_scales, evaluate_protocol
from evaluate.reference import TORCHVISION
from tests.conftest import REPO, run_cli
from train.checkpoint import extract_state_dict
from train.config import Config, from_dict, load_config, to_dict
from train.models import ARCHS, build_model, build_model_from_config

TINY = [8, "M", 16, "M", 16, "M", 32, "M", 512, "M"]  # custom trunk: 64 px -> 2x2x512 features, ~6 M MACs
SMALL = ["data.val_resize=73", "data.val_crop=64", "data.train_crop=64"]  # for bare state dicts (no config)


def _tiny_config(root: Path, **extra: str) -> Config:
    overrides = [
        "model.arch=custom",
        f"model.layers={json.dumps(TINY)}",
        "model.num_classes=7",
        "model.classifier_width=16",
        f"data.root={root}",
        "data.workers=0",
        "data.backend=torchvision",
        *[f"{k}={v}" for k, v in extra.items()],
    ]
    return load_config("demo", overrides)


def _with_data(cfg: Config, **data) -> Config:
    """A copy of cfg with some data.* keys changed (validated like any config)."""
    tree = to_dict(cfg)
    tree["data"].update(data)
    return from_dict(tree)


def _decisive(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random classifier weights 20x torchvision's init (std 0.2, not 0.01): class scores far apart, no near-ties."""
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, 0, 0.2)
            torch.nn.init.normal_(m.bias, 0, 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval") / "demo"
    make_demo_dataset(root, classes=7, train_per_class=2, val_per_class=3)
    return root


@pytest.fixture(scope="module")
def ours(demo: Path) -> Path:
    """Our checkpoint format: {'model', 'config', 'epoch', 'step', 'wandb_id'} in a run folder."""
    cfg = _tiny_config(demo)
    model = _decisive(build_model_from_config(cfg.model), seed=1)
    path = demo.parent / "run" / "best.pth"
    path.parent.mkdir()
    # DDP's prefix on the keys: the loader strips it.
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"model": state, "config": to_dict(cfg), "epoch": 3, "step": 12, "wandb_id": None}, path)
    return path


def _plain_count(model: torch.nn.Module, batches) -> tuple[int, int, int]:
    """An independent count: a plain loop, torch.topk, Python ints."""
    c1 = c5 = n = 0
    with torch.no_grad():
        for images, labels in batches:
            top = torch.topk(model(images), k=min(5, model.classifier[-1].out_features), dim=1).indices
            for row, label in zip(top.tolist(), labels.tolist(), strict=True):
                c1 += row[0] == label
                c5 += label in row
                n += 1
    return c1, c5, n


# --------------------------------------------------------------------------------------------- counting


@pytest.mark.parametrize("backend", ["torchvision", "dali"])
def test_evaluator_equals_an_independent_count(demo, ours, tmp_path, backend):
    out = tmp_path / "eval.json"
    result = run_evaluation(
        EvalOptions(checkpoint=str(ours), backend=backend, batch_size=4, workers=0, json_path=str(out))
    )
    record = json.loads(out.read_text())
    cfg = _with_data(_tiny_config(demo), backend=backend)
    loaded = load_model(ours)
    loader = build_loader(cfg, "val", 0, 1, torch.device("cpu"))
    batches = list(loader)
    c1, c5, n = _plain_count(loaded.model, batches)
    assert (record["correct1"], record["correct5"], record["n_images"]) == (c1, c5, n) and n == 21
    assert record["top1_err"] == 100.0 * (1.0 - c1 / n) and record["top5_err"] == 100.0 * (1.0 - c5 / n)
    assert 0 < c1 < c5 < n, "some right and some wrong at top-1 and top-5, or the test means nothing"
    assert record["backend"] == ("dali-cpu" if backend == "dali" else "torchvision")
    assert record["arch"] == "custom" and record["protocol"] == "1-crop"
    assert record["checkpoint"]["sha256"] == hashlib.sha256(ours.read_bytes()).hexdigest()
    assert record["reference"]["verdict"] == "no reference" and "7 classes" in record["reference"]["note"]
    assert {"torch", "torchvision"} <= set(record["versions"]) and ("dali" in record["versions"]) == (
        backend == "dali"
    )
    assert result.counts == Counts(c1, c5, n)
    # The counting path is the same for any backend: the same tensors, fed as a plain list, give the same counts.
    assert count_loader(loaded.model, batches, torch.device("cpu")) == Counts(c1, c5, n)


def test_one_and_two_processes_agree(demo, ours, tmp_path):
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    run_evaluation(EvalOptions(checkpoint=str(ours), batch_size=3, workers=0, json_path=str(one)))
    env_free = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "evaluate", "--checkpoint", str(ours), "--batch-size", "3", "--workers", "0", "--json", str(two)],
        cwd=REPO, env={**env_free, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert b["world_size"] == 2 and a["world_size"] == 1
    for key in ("top1_err", "top5_err", "n_images", "correct1", "correct5"):
        assert a[key] == b[key], key
    headers = [line for line in proc.stdout.splitlines() if line.split()[:2] == ["arch", "protocol"]]
    assert len(headers) == 1, "only rank 0 prints the table"


# ---------------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "custom"])
def test_arch_inferred_from_state_dict_shapes(arch):
    with torch.device("meta"):  # shapes only: no memory, no init
        model = build_model(arch, num_classes=7)
    state = extract_state_dict({f"_orig_mod.{k}": v for k, v in model.state_dict().items()})
    spec = infer_spec(state)
    assert (spec.arch, spec.num_classes, spec.classifier_width) == (arch, 7, 4096)


def test_torchvision_format_state_dict_is_evaluated(demo, tmp_path, capsys):
    """A bare state dict as torchvision ships them (its VGG class; BN files predate num_batches_tracked)."""
    torch.manual_seed(0)
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["A"], batch_norm=True)
    with torch.device("meta"):  # skip initialising the 4096-wide classifier: it is replaced by a narrow one
        model = torchvision.models.VGG(features, num_classes=7)
    model.classifier[0] = torch.nn.Linear(512 * 7 * 7, 24)  # narrow classifier: a small file
    model.classifier[3] = torch.nn.Linear(24, 24)
    model.classifier[6] = torch.nn.Linear(24, 7)
    model = _decisive(model, seed=2)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "vgg11_bn-00000000.pth"
    torch.save(state, path)
    out = tmp_path / "tv.json"
    rc = main(["--checkpoint", str(path), "--data", str(demo), "--workers", "0", "--json", str(out), *SMALL])
    assert rc == 0
    record = json.loads(out.read_text())
    assert record["arch"] == "vgg11_bn" and record["checkpoint"]["arch_source"] == "state dict shapes"
    assert record["checkpoint"]["kind"] == "state_dict" and record["checkpoint"]["classifier_width"] == 24
    cfg = _with_data(
        Config(), root=str(demo), backend="torchvision", workers=0, val_resize=73, val_crop=64, train_crop=64
    )
    c1, c5, n = _plain_count(model, build_loader(cfg, "val", 0, 1, "cpu"))
    assert (record["correct1"], record["correct5"], record["n_images"]) == (c1, c5, n)
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[:3] == ["arch", "protocol", "images"]
    assert "vgg11_bn" in table and "no reference" in table and "sha256" in table


# -------------------------------------------------------------------------------------------- protocols


@pytest.mark.parametrize("crop", [64, 96, 224])
def test_dense_net_at_the_training_crop_is_the_original_net(crop):
    torch.manual_seed(0)
    model = _decisive(build_model("custom", num_classes=5, classifier_width=16, layers=TINY), seed=3)
    x = torch.randn(2, 3, crop, crop)
    with torch.no_grad():
        dense = DenseVGG(model, train_crop=crop)(x)
        assert dense.shape == (2, 5, 1, 1)
        torch.testing.assert_close(dense[:, :, 0, 0], model(x), rtol=1e-4, atol=1e-4)


def _load_scaled(path: str, q: int, spec: TransformSpec) -> torch.Tensor:
    """Independent preprocessing: PIL decode + PIL antialiased resize of the shorter side + hand normalisation."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        w, h = img.size
        size = (q, int(q * h / w)) if w <= h else (int(q * w / h), q)
        img = img.resize(size, Image.Resampling.BILINEAR)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
    return (x - torch.tensor(spec.mean).view(3, 1, 1)) / torch.tensor(spec.std).view(3, 1, 1)


def _independent_posteriors(model, x: torch.Tensor, crop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense: the classifier applied to every crop-sized window of the feature map (not a converted conv);
    multi-crop: a 5x5 grid from np.linspace, and flips. Both as soft-max averages."""
    f = crop // 32

    def window_scores(img):
        feats = model.features(img[None])[0]
        win = feats.unfold(1, f, 1).unfold(2, f, 1)  # (512, h', w', f, f)
        win = win.permute(1, 2, 0, 3, 4).reshape(-1, feats.shape[0], f, f)
        return model.classifier(torch.flatten(model.avgpool(win), 1)).mean(dim=0)

    dense = torch.stack([window_scores(x).softmax(0), window_scores(x.flip(-1)).softmax(0)]).mean(0)
    tops = np.linspace(0, x.shape[1] - crop, 5).round().astype(int)
    lefts = np.linspace(0, x.shape[2] - crop, 5).round().astype(int)
    crops = torch.stack([x[:, t : t + crop, l : l + crop] for t in tops for l in lefts])
    crops = torch.cat([crops, crops.flip(-1)])
    return dense, model(crops).softmax(1).mean(0)


def test_dense_and_multicrop_match_an_independent_implementation(demo, ours):
    loaded = load_model(ours)
    cfg = loaded.config
    spec = TransformSpec.from_config(cfg.data)
    samples = index_split(demo, "val").samples
    scales = [64, 80]
    got = evaluate_protocol(
        loaded.model, samples, "dense+multi-crop", scales, 64, spec, torch.device("cpu"), workers=0
    )
    expect = {"dense": [0, 0], "multi-crop": [0, 0], "dense+multi-crop": [0, 0]}
    with torch.no_grad():
        for path, label in samples:
            per_scale = [
                _independent_posteriors(loaded.model, _load_scaled(path, q, spec), 64) for q in scales
            ]
            dense = torch.stack([d for d, _ in per_scale]).mean(0)
            crops = torch.stack([c for _, c in per_scale]).mean(0)
            for name, post in (
                ("dense", dense),
                ("multi-crop", crops),
                ("dense+multi-crop", (dense + crops) / 2),
            ):
                top = post.topk(5).indices.tolist()
                expect[name][0] += top[0] == label
                expect[name][1] += label in top
    for name, (c1, c5) in expect.items():
        assert (got[name].correct1, got[name].correct5, got[name].n) == (c1, c5, 21), name
    assert 0 < got["dense"].correct1 < 21
    # Sharded as two processes would (each its contiguous block; summed here): the same counts.
    parts = [
        evaluate_protocol(loaded.model, samples, "dense", [64], 64, spec, torch.device("cpu"), rank=r, world_size=2, workers=0)
        for r in (0, 1)
    ]  # fmt: skip
    whole = evaluate_protocol(loaded.model, samples, "dense", [64], 64, spec, torch.device("cpu"), workers=0)
    summed = [sum(getattr(p["dense"], k) for p in parts) for k in ("correct1", "correct5", "n")]
    assert summed == [whole["dense"].correct1, whole["dense"].correct5, 21]
    assert [p["dense"].n for p in parts] == [10, 11]


def test_constant_model_gives_the_same_error_under_every_protocol(demo, tmp_path):
    cfg = _tiny_config(demo)
    model = build_model_from_config(cfg.model)
    with torch.no_grad():
        model.classifier[6].weight.zero_()
        model.classifier[6].bias.copy_(
            torch.tensor([0.0, 6, 5, 4, 3, 2, 1])
        )  # always 1, then 2, 3, 4, 5 (top-5)
    path = tmp_path / "constant.pth"
    torch.save({"model": model.state_dict(), "config": to_dict(cfg)}, path)
    for protocol, extra in (
        ("1-crop", {}),
        ("dense", {"multi_scale": True}),
        ("multi-crop", {"scales": [72]}),
    ):
        r = run_evaluation(EvalOptions(checkpoint=str(path), protocol=protocol, workers=0, **extra))
        assert (r.counts.correct1, r.counts.correct5, r.counts.n) == (3, 15, 21), (
            protocol
        )  # 3 images per class
        assert (r.counts.top1_err, r.counts.top5_err) == (100.0 * (1.0 - 3 / 21), 100.0 * (1.0 - 15 / 21))


def test_default_test_scales_follow_the_paper():
    assert default_scales("scale", 256, 256, 256, multi=True) == [224, 256, 288]  # fixed S: {S-32, S, S+32}
    assert default_scales("scale", 384, 384, 256, multi=False) == [384]
    assert default_scales("scale", 256, 512, 256, multi=False) == [384]  # jittered: Q = (Smin + Smax) / 2
    assert default_scales("scale", 256, 512, 256, multi=True) == [256, 384, 512]
    assert default_scales("rrc", 256, 512, 256, multi=True) == [256, 384, 512]
    assert default_scales("rrc", 256, 512, 73, multi=False) == [73]


# ----------------------------------------------------------------------------------------- references


def test_reference_verdicts():
    cfg = _with_data(Config())
    ref = TORCHVISION["vgg11_bn"]
    near = Counts(round(50_000 * (1 - (ref.top1_err + 0.2) / 100)), 45_000, 50_000)
    far = Counts(round(50_000 * (1 - (ref.top1_err + 0.5) / 100)), 45_000, 50_000)
    ok = compare("vgg11_bn", cfg, None, "1-crop", [], near, 0.3)
    assert ok.verdict == "PASS" and ok.top1_err == 29.63 and abs(ok.diff_top1 - 0.2) < 1e-9
    assert compare("vgg11_bn", cfg, None, "1-crop", [], far, 0.3).verdict == "FAIL"
    assert compare("vgg11_bn", cfg, None, "1-crop", [], far, 0.6).verdict == "PASS"
    lrn = compare("vgg11_lrn", cfg, None, "1-crop", [], near, 0.3)
    assert lrn.verdict == "no reference" and "torchvision publishes no vgg11_lrn" in lrn.note
    subset = compare("vgg16", cfg, None, "1-crop", [], Counts(10, 20, 30), 0.3)
    assert subset.verdict == "no reference" and "30 images" in subset.note
    # The paper's rows: Table 3 (dense, one Q), Table 4 (dense, 3 Q), Table 5 (multi-crop); S from the config.
    jitter = _with_data(Config(), augment="scale", scale_min=256, scale_max=512)
    got = compare("vgg16", jitter, jitter, "dense", [384], near, 0.3)
    assert got.source.startswith("paper Table 3") and (got.top1_err, got.top5_err) == (25.6, 8.1)
    got = compare("vgg19", jitter, jitter, "dense", [256, 384, 512], near, 0.3)
    assert got.source.startswith("paper Table 4") and (got.top1_err, got.top5_err) == (24.8, 7.5)
    got = compare("vgg19", jitter, jitter, "dense+multi-crop", [256, 384, 512], near, 0.3)
    assert got.source.startswith("paper Table 5") and (got.top1_err, got.top5_err) == (24.4, 7.1)
    fixed = _with_data(Config(), augment="scale", scale_min=256, scale_max=256)
    assert compare("vgg11", fixed, fixed, "dense", [256], near, 0.3).top1_err == 29.6
    rrc = compare("vgg16", cfg, cfg, "dense", [256], near, 0.3)
    assert rrc.verdict == "no reference" and "data.augment=rrc" in rrc.note
    assert compare("vgg16_bn", jitter, jitter, "dense", [384], near, 0.3).verdict == "no reference"
    paper = _with_data(Config(recipe="paper"), augment="scale", scale_min=256, scale_max=512)
    got = compare("vgg16", paper, paper, "1-crop", [], near, 0.3)  # torchvision's row: not this recipe's
    assert got.verdict == "no reference" and "trained with the paper recipe" in got.note
    assert compare("vgg16", paper, None, "1-crop", [], near, 0.3).source is not None  # bare weights: compared


# ----------------------------------------------------------------------------------------------- predict


def test_predict_prints_top_classes_with_probabilities(demo, ours, capsys):
    samples = sorted((demo / "val").glob("*/*.JPEG"))[:2]
    assert main(["--checkpoint", str(ours), "--data", str(demo), "--predict", *map(str, samples)]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = {v[1] for v in json.loads((demo / "class_index.json").read_text()).values()}
    assert lines[0] == f"{samples[0]}:" and lines[6] == f"{samples[1]}:" and len(lines) == 12  # top-5 each
    probs = []
    for line in lines[1:6]:
        name, prob = line.strip().rsplit(" ", 1)
        assert name in names
        probs.append(float(prob))
    assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
    # Same numbers as the model on the 1-crop val tensor of that image (the loader's preprocessing).
    loaded = load_model(ours)
    spec = TransformSpec.from_config(loaded.config.data)
    tensor = spec.normalize(spec.val_transform()(Image.open(samples[0]).convert("RGB"))[None])
    with torch.no_grad():
        expect = loaded.model(tensor).softmax(1)[0].sort(descending=True).values[:5].tolist()
    assert probs == pytest.approx(expect, abs=2e-6)


def test_imagenet_class_list_matches_timm_and_torchvision():
    classes = imagenet_classes()
    tv = torchvision.models.VGG16_Weights.IMAGENET1K_V1.meta["categories"]
    assert [name for _, name in classes] == tv
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    assert [w for w, _ in classes] == [info.index_to_label_name(i) for i in range(1000)]
    assert classes[0] == ("n01440764", "tench") and classes[-1] == ("n15075141", "toilet tissue")
    names, source = class_names(1000, None)
    assert names[258] == "Samoyed" and "torchvision" in source


def test_checkpoint_refuses_val_folders_it_was_not_trained_on(demo, ours, tmp_path, capsys):
    """Our checkpoints store the class folders (label order) they were trained on: a val tree with the same
    number of classes but other folders would silently mislabel every image."""
    state = torch.load(ours, weights_only=True)
    classes = index_split(demo, "val").classes
    state["classes"] = classes
    path = tmp_path / "with_classes.pth"
    torch.save(state, path)
    assert main(["--checkpoint", str(path), "--data", str(demo), "--workers", "0"]) in (
        0,
        1,
    )  # its own folders
    shutil.copytree(demo / "val", tmp_path / "other" / "val")
    (tmp_path / "other" / "val" / classes[2]).rename(tmp_path / "other" / "val" / "n99999999")
    capsys.readouterr()
    assert main(["--checkpoint", str(path), "--data", str(tmp_path / "other"), "--workers", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: {tmp_path / 'other' / 'val'}: 1 class folders are not trained classes (e.g. 'n99999999') and 1 "
        f"are missing (e.g. {classes[2]!r}); labels would not match the model's outputs"
    )


def test_bare_imagenet_weights_refuse_folders_that_are_not_imagenet_wnids(tmp_path):
    from data_pipeline.layout import SplitIndex
    from evaluate.evaluator import EvalError, _check_classes
    from evaluate.imagenet_classes import imagenet_wnids
    from evaluate.loading import LoadedModel, ModelSpec

    wnids = imagenet_wnids()
    loaded = LoadedModel(
        torch.nn.Identity(), ModelSpec("vgg16", 1000, 4096), tmp_path / "w.pth", "state_dict", None, ""
    )
    _check_classes(loaded, SplitIndex(tmp_path, wnids, []))  # ImageNet's own folders pass
    renamed = [*wnids[:500], "n99000000", *wnids[501:]]
    with pytest.raises(
        EvalError,
        match=rf"1 class folders are not ImageNet-1k wnids \(torchvision's weights index sorted wnids\) \(e.g. 'n99000000'\) and 1 are missing \(e.g. '{wnids[500]}'\)",
    ):
        _check_classes(loaded, SplitIndex(tmp_path, sorted(renamed), []))


# --------------------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def bad_files(demo, ours) -> dict[str, Path]:
    folder = demo.parent / "bad"
    folder.mkdir()
    data = ours.read_bytes()
    (folder / "truncated.pth").write_bytes(data[: len(data) // 2])
    with open(folder / "object.pkl", "wb") as f:
        pickle.dump(Path("x"), f)  # a pickle of a Python object: weights_only refuses it
    torch.save({"epoch": 3, "lr": [0.1]}, folder / "not_weights.pth")  # loads, but holds no state dict
    torch.manual_seed(0)
    torch.save(
        build_model("vgg11", num_classes=5, classifier_width=8).state_dict(), folder / "vgg11_5cls.pth"
    )
    return {p.stem: p for p in folder.iterdir()}


PREDICT = ["--checkpoint", "{ours}", "--predict", "{image}"]


@pytest.mark.parametrize(
    "case, args, message",
    [
        ("missing", ["--checkpoint", "{dir}/nope.pth"], "does not exist"),
        ("truncated", ["--checkpoint", "{truncated}"], "truncated, corrupt or not a PyTorch checkpoint"),
        ("pickle", ["--checkpoint", "{object}"], "not a weights-only checkpoint"),
        ("not weights", ["--checkpoint", "{not_weights}"], "not a checkpoint"),
        (
            "wrong arch (bare)",
            ["--checkpoint", "{vgg11_5cls}", "--arch", "vgg13"],
            "--arch vgg13 but the weights",
        ),
        ("wrong arch (ours)", ["--checkpoint", "{ours}", "--arch", "vgg16"], "--arch vgg16 but"),
        ("class count", ["--checkpoint", "{vgg11_5cls}", "--data", "{demo}", *SMALL], "7 class folders but"),
        ("missing data", ["--checkpoint", "{ours}", "--data", "{dir}/nowhere"], "does not exist"),
        (
            "scale too large",
            ["--checkpoint", "{ours}", "--protocol", "dense", "--scales", "100000"],
            "test scales Q=[100000]: above 2048 px",
        ),
        (
            "scale < crop",
            ["--checkpoint", "{ours}", "--protocol", "dense", "--scales", "16"],
            "training crop 32",
        ),
        ("model override", ["--checkpoint", "{ours}", "model.arch=vgg16"], "model comes from the checkpoint"),
        (
            "override typo",
            ["--checkpoint", "{ours}", "data.val_rezise=64"],
            "command line: unknown key 'data.val_rezise' (did you mean 'data.val_resize'?)",
        ),
        ("bad image", ["--checkpoint", "{ours}", "--predict", "{truncated}"], "cannot read image"),
        # argparse's refusals (its line reads "python evaluate: error: argument ...")
        (
            "batch size 0",
            ["--checkpoint", "{ours}", "--batch-size", "0"],
            "argument --batch-size: expected a positive integer, got '0'",
        ),
        (
            "batch size < 0",
            ["--checkpoint", "{ours}", "--batch-size", "-1"],
            "argument --batch-size: expected a positive integer, got '-1'",
        ),
        (
            "tolerance nan",
            ["--checkpoint", "{ours}", "--tolerance", "nan"],
            "argument --tolerance: expected a finite number >= 0 (percentage points), got 'nan'",
        ),
        ("tolerance inf", ["--checkpoint", "{ours}", "--tolerance", "inf"], "got 'inf'"),
        ("tolerance < 0", ["--checkpoint", "{ours}", "--tolerance", "-0.1"], "got '-0.1'"),
        # --json: checked before the evaluation runs
        ("json to a folder", ["--checkpoint", "{ours}", "--json", "{dir}"], "{dir} is a folder"),
        (
            "json under a file",
            ["--checkpoint", "{ours}", "--json", "{truncated}/e.json"],
            "--json {truncated}/e.json: {truncated} is not a folder",
        ),
        # --predict with options of the evaluation it ignores
        (
            "predict + evaluation options",
            [*PREDICT, "--json", "{dir}/p.json", "--protocol", "dense"],
            "error: --predict prints the top-5 classes of images; --json, --protocol do not apply",
        ),
        (
            "predict + scales",
            [*PREDICT, "--multi-scale", "--scales", "96", "--tolerance", "1"],
            "--scales, --multi-scale, --tolerance do not apply",
        ),
    ],
)
def test_bad_input_is_one_error_line(bad_files, demo, ours, capsys, case, args, message):
    names = {k: str(v) for k, v in bad_files.items()} | {
        "dir": str(demo.parent),
        "ours": str(ours),
        "demo": str(demo),
        "image": str(sorted((demo / "val").glob("*/*.JPEG"))[0]),
    }
    try:
        rc = main([a.format(**names) for a in args])
    except SystemExit as e:  # argparse
        rc = e.code
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith(("error:", "python evaluate: error:"))]
    assert rc == 2 and len(errors) == 1 and message.format(**names) in errors[0], err


def test_json_destination_is_checked_before_evaluating(ours, tmp_path, monkeypatch, capsys):
    """A --json that cannot be written is refused at once (it used to fail after the whole evaluation, leaving
    a .NAME.tmp-PID file); the check leaves nothing behind and makes no folder."""
    import evaluate.evaluator
    from train.run import output_file_problem

    def evaluate_anyway(opts):
        raise AssertionError("evaluated before --json was checked")

    monkeypatch.setattr(evaluate.evaluator, "run_evaluation", evaluate_anyway)
    assert main(["--checkpoint", str(ours), "--json", str(tmp_path)]) == 2
    expected = (
        f"error: --json {tmp_path}: {tmp_path} is a folder; give a file path such as {tmp_path / 'eval.json'}"
    )
    assert capsys.readouterr().err.strip() == expected
    assert output_file_problem(str(tmp_path / "e.json")) is None  # probe file created and removed
    assert output_file_problem(str(tmp_path / "new" / "sub" / "e.json")) is None  # made when written
    (tmp_path / "file").write_text("x")
    assert (
        output_file_problem(str(tmp_path / "file" / "sub" / "e.json"))
        == f"{tmp_path / 'file'} is not a folder"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_cli_entry_point_exit_status(tmp_path):
    out = run_cli("evaluate", "--checkpoint", str(tmp_path / "missing.pth"))
    assert out.returncode == 2
    assert out.stderr.strip() == f"error: checkpoint {tmp_path / 'missing.pth'} does not exist"


# --------------------------------------------------------------------------------------------------- W&B


def test_wandb_attaches_to_the_training_run(demo, ours, tmp_path, monkeypatch):
    from tests.wandb_files import run_files
    from train.tracking import Tracker

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "train_run"
    cfg = _tiny_config(demo, run_dir=str(run_dir))
    training = Tracker.create(cfg, run_dir, is_main=True)
    training.summary(best_top1_err=50.0)
    training.finish()
    ckpt = torch.load(ours, weights_only=True)
    ckpt["wandb_id"] = training.run_id
    path = run_dir / "best.pth"
    torch.save(ckpt, path)
    result = run_evaluation(EvalOptions(checkpoint=str(path), workers=0, wandb=True))
    files = run_files(run_dir, training.run_id)
    assert len(files) == 2  # the training start, then the evaluation continuing the same run id
    summary = files[-1].summary
    assert summary["eval/1-crop/top1_err"] == result.counts.top1_err
    assert summary["eval/1-crop/n_images"] == 21
    assert result.record["wandb_run"] == training.run_id


def test_wandb_own_run_leaves_the_training_folder_alone(ours, tmp_path, monkeypatch):
    from tests.wandb_files import run_files

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "wandb_id.txt").write_text("training-id\n")
    path = run_dir / "best.pth"
    path.write_bytes(ours.read_bytes())  # stores no wandb_id: the evaluation gets its own run
    result = run_evaluation(EvalOptions(checkpoint=str(path), workers=0, protocol="dense", wandb=True))
    run_id = result.record["wandb_run"]
    assert run_id and run_id != "training-id"
    assert (run_dir / "wandb_id.txt").read_text() == "training-id\n"
    (file,) = run_files(run_dir / "eval_wandb", run_id)
    assert file.summary["eval/dense/top1_err"] == result.counts.top1_err
    assert file.run.display_name == "eval-custom-dense"


# --------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_gpu_dali_evaluation_equals_an_independent_count(demo, ours):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    result = run_evaluation(EvalOptions(checkpoint=str(ours), backend="dali", batch_size=4, workers=2))
    assert result.record["backend"] == "dali-gpu"
    cfg = _with_data(_tiny_config(demo), backend="dali")
    loaded = load_model(ours)
    model = loaded.model.cuda()
    with precision_context("fp32", torch.device("cuda")):  # the evaluator's fp32: no TF32 convolutions
        c1, c5, n = _plain_count(model, build_loader(cfg, "val", 0, 1, torch.device("cuda")))
    assert (result.counts.correct1, result.counts.correct5, result.counts.n) == (c1, c5, n)


def test_protocol_with_workers_names_an_unreadable_image_in_one_plain_line(ours, demo, tmp_path):
    """A DataError raised in a DataLoader worker comes back wrapped in the worker's traceback; the protocols
    report its own line, without the exception's module path."""
    import shutil

    root = tmp_path / "demo"
    shutil.copytree(demo, root)
    bad = sorted((root / "val").rglob("*.JPEG"))[0]
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(DataError) as info:
        run_evaluation(EvalOptions(checkpoint=str(ours), data=str(root), protocol="dense", workers=1))
    message = str(info.value)
    assert message.startswith(f"cannot decode {bad} (") and "\n" not in message, message
