"""A small, real JPEG dataset in ImageNet's layout, drawn procedurally, for the tests and the CPU demo.

The tree looks like an extracted ILSVRC2012 (after the usual "move val images into class folders" step):

    OUT/train/<wnid>/<wnid>_<n>.JPEG                 n = 1 .. train_per_class
    OUT/val/<wnid>/ILSVRC2012_val_<8 digits>.JPEG    1-based, unique across classes, shuffled w.r.t. class
    OUT/class_index.json                             {"0": ["n99000000", "red_circle"], ...}
    OUT/demo_manifest.json                           generation parameters, counts, oddities

Classes are shape x colour family ("red circle", "cyan stripes", ...), at most 10 x 10 = 100. Every image
has a random size and aspect ratio, a noisy gradient background, and one object at a random position, scale
and rotation, with colour jitter and shading; JPEG quality varies from 75 to 95. The first classes are chosen
so that neither colour nor shape alone separates them: classes 0-9 are 5 shapes x 2 colours (``class_specs``).

WordNet IDs are made up: ``n99`` + 6 digits. WordNet 3.0 noun offsets end near 15,300,000, so no real
ImageNet wnid (n01440764 ... n15075141) starts with n99, and sorted wnid order equals our class order, which
is also the order torchvision's ``ImageFolder`` assigns. Class names use underscores, as
``imagenet_class_index.json`` does ("great_white_shark").

ImageNet's file oddities are reproduced a few times per split, at seeded positions: greyscale JPEGs (mode L),
CMYK JPEGs (ILSVRC2012 train has 22) and a PNG saved under a .JPEG name (train has one, n02105855_2933.JPEG).

Every image is drawn from its own RNG, seeded by (seed, split, class, index), so a file's bytes do not
depend on generation order or on how many other classes/images are requested; the same arguments give
byte-identical trees. The default tree (10 x (100 + 20) images) takes about 2 s on one CPU core.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "COLOURS",
    "MAX_CLASSES",
    "SHAPES",
    "ClassSpec",
    "DemoSummary",
    "DemoTreeError",
    "Oddity",
    "check_params",
    "class_specs",
    "make_demo_dataset",
    "render_image",
]

# Bump when the drawing changes: a tree made by another version is then refused instead of silently mixed.
GENERATOR_VERSION = 1
MANIFEST_FORMAT = "vgg-imagenet-demo"
MANIFEST_NAME = "demo_manifest.json"
# Written first and replaced by the manifest once every file is on disk: marks an interrupted generation.
PARTIAL_NAME = "demo_manifest.partial.json"
CLASS_INDEX_NAME = "class_index.json"
SPLITS = ("train", "val")

# Two groups of five shapes; see class_specs for how they are combined with colours.
SHAPES = (
    ("circle", "square", "triangle", "star", "stripes"),
    ("ring", "cross", "crescent", "checkerboard", "dots"),
)
# Colour families: (name, hue in degrees). Hues are >= 25 degrees apart; jitter is +-7 degrees.
COLOURS = (
    ("red", 0.0),
    ("orange", 28.0),
    ("yellow", 55.0),
    ("lime", 90.0),
    ("green", 130.0),
    ("cyan", 180.0),
    ("blue", 220.0),
    ("violet", 268.0),
    ("magenta", 303.0),
    ("pink", 335.0),
)
MAX_CLASSES = len(SHAPES) * len(SHAPES[0]) * len(COLOURS)
MAX_SEED = 2**32 - 1
MIN_SIDE = 16  # pixels; smaller objects stop looking like their shape
MAX_SIDE = 1024  # pixels; ImageNet's images are mostly ~500 px, and masks are drawn at 4x this size

# Oddities per split (all of them once a split has >= 60 images; fewer below, see _oddity_kinds).
_ODDITY_ORDER = ("png", "grayscale", "cmyk", "grayscale", "cmyk", "grayscale")
_SPLIT_IDS = {"train": 0, "val": 1}
# First element of every SeedSequence entropy list, so the streams for different purposes never coincide.
_TAG_IMAGE, _TAG_ODDITIES, _TAG_VAL_NAMES = 1, 2, 3


class DemoTreeError(RuntimeError):
    """The output directory holds something that must not be overwritten or mixed with."""


@dataclass(frozen=True)
class ClassSpec:
    """One class: its index (= sorted wnid order), made-up wnid, readable name and what is drawn."""

    index: int
    wnid: str
    name: str
    shape: str
    colour: str
    hue: float


@dataclass(frozen=True)
class Oddity:
    """A file that is not a plain RGB JPEG; ``kind`` is "grayscale", "cmyk" or "png"."""

    split: str
    kind: str
    path: Path


@dataclass
class DemoSummary:
    """What ``make_demo_dataset`` produced (or found already there, when ``created`` is False)."""

    root: Path
    class_index: Path
    manifest: Path
    classes: int
    counts: dict[str, int]
    oddities: list[Oddity] = field(default_factory=list)
    created: bool = True
    seconds: float = 0.0


def class_specs(classes: int) -> list[ClassSpec]:
    """The first ``classes`` classes, in index order.

    Classes come in blocks of ten: one shape group (5 shapes) x two colour families half the hue circle
    apart. Block b uses shape group b % 2 and colours (b // 2, b // 2 + 5), so ten blocks cover all 100
    combinations, and in the 10-class demo colour alone tells 2 groups of 5 apart, shape alone 5 groups of 2.
    """
    if not 1 <= classes <= MAX_CLASSES:
        raise ValueError(f"classes must be in 1..{MAX_CLASSES}, got {classes}")
    specs = []
    half = len(COLOURS) // 2
    for k in range(classes):
        block, within = divmod(k, 10)
        group = SHAPES[block % 2]
        colour_idx = block // 2 + half * (within // len(group))
        shape = group[within % len(group)]
        colour, hue = COLOURS[colour_idx]
        specs.append(ClassSpec(k, f"n99{k:06d}", f"{colour}_{shape}", shape, colour, hue))
    return specs


def check_params(
    classes: int, train_per_class: int, val_per_class: int, seed: int, min_size: int, max_size: int
) -> None:
    """Raise ValueError with one readable sentence if the parameters cannot make a demo tree."""
    given = locals()
    for name, value in given.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"--{name.replace('_', '-')} must be an integer, got {value!r}")
    if not 2 <= classes <= MAX_CLASSES:
        raise ValueError(
            f"--classes must be between 2 and {MAX_CLASSES} "
            f"({len(SHAPES) * len(SHAPES[0])} shapes x {len(COLOURS)} colours), got {classes}"
        )
    if train_per_class < 1:
        raise ValueError(f"--train-per-class must be at least 1, got {train_per_class}")
    if val_per_class < 1:
        raise ValueError(f"--val-per-class must be at least 1, got {val_per_class}")
    if classes * val_per_class > 99_999_999:
        raise ValueError("val file names have 8 digits: classes x val-per-class must be below 100,000,000")
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"--seed must be in 0..{MAX_SEED}, got {seed}")
    if min_size < MIN_SIDE:
        raise ValueError(f"--min-size must be at least {MIN_SIDE} px, got {min_size}")
    if max_size < min_size:
        raise ValueError(f"--max-size ({max_size}) must be >= --min-size ({min_size})")
    if max_size > MAX_SIDE:
        raise ValueError(f"--max-size must be at most {MAX_SIDE} px, got {max_size}")


# --------------------------------------------------------------------------------------------------- drawing


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    """h in degrees, s and v in [0, 1] -> float RGB in [0, 255]."""
    h = (h % 360.0) / 60.0
    c = v * s
    x = c * (1 - abs(h % 2 - 1))
    r, g, b = [(c, x, 0), (x, c, 0), (0, c, x), (0, x, c), (x, 0, c), (c, 0, x)][int(h) % 6]
    m = v - c
    return np.array([r + m, g + m, b + m], dtype=np.float32) * 255.0


def _image_size(rng: np.random.Generator, min_size: int, max_size: int) -> tuple[int, int]:
    """(width, height): mostly 4:3-ish landscape like ImageNet, some portrait/square, ~7% very wide/tall."""
    u = rng.random()
    if u < 0.55:
        ratio = rng.uniform(1.25, 1.5)
    elif u < 0.80:
        ratio = 1 / rng.uniform(1.25, 1.5)
    elif u < 0.93:
        ratio = rng.uniform(0.9, 1.1)
    elif u < 0.965:
        ratio = rng.uniform(2.0, 3.0)
    else:
        ratio = 1 / rng.uniform(2.0, 3.0)
    max_ratio = max_size / min_size
    ratio = min(max(ratio, 1 / max_ratio), max_ratio)
    elong = max(ratio, 1 / ratio)
    long_side = rng.uniform(min_size * elong, max_size)
    short_side = max(min_size, round(long_side / elong))
    long_side = round(long_side)
    return (long_side, short_side) if ratio >= 1 else (short_side, long_side)


def _shape_mask(shape: str, size: int, angle: float, rng: np.random.Generator) -> Image.Image:
    """Anti-aliased mask (mode L, size x size) of ``shape`` inscribed in the square, rotated by ``angle``."""
    ss = 4  # supersampling factor
    n = size * ss
    c = n / 2
    r = n / 2 * 0.94  # every shape stays inside this radius, so rotation never clips it
    img = Image.new("L", (n, n), 0)
    d = ImageDraw.Draw(img)

    def disc(radius: float, fill: int = 255, dx: float = 0.0) -> None:
        d.ellipse([c + dx - radius, c - radius, c + dx + radius, c + radius], fill=fill)

    if shape == "circle":
        disc(r * 0.85)
    elif shape == "square":
        a = r * 0.68
        d.rectangle([c - a, c - a, c + a, c + a], fill=255)
    elif shape == "triangle":
        d.polygon([(c + r * math.sin(t), c - r * math.cos(t)) for t in np.arange(3) * 2 * math.pi / 3], 255)
    elif shape == "star":
        inner = rng.uniform(0.36, 0.45)
        pts = [
            (c + rr * math.sin(t), c - rr * math.cos(t))
            for i, t in enumerate(np.arange(10) * math.pi / 5)
            for rr in [r if i % 2 == 0 else r * inner]
        ]
        d.polygon(pts, 255)
    elif shape == "ring":
        disc(r * 0.88)
        disc(r * rng.uniform(0.5, 0.6), fill=0)
    elif shape == "cross":
        a, w = r * 0.9, r * rng.uniform(0.2, 0.26)
        d.rectangle([c - a, c - w, c + a, c + w], fill=255)
        d.rectangle([c - w, c - a, c + w, c + a], fill=255)
    elif shape == "crescent":
        disc(r * 0.88)
        disc(r * 0.72, fill=0, dx=r * rng.uniform(0.38, 0.48))
    elif shape in ("stripes", "checkerboard", "dots"):
        # A pattern inside a disc window; 3-5 periods across the disc.
        periods = rng.uniform(3.0, 5.0) if shape != "dots" else rng.uniform(3.0, 4.0)
        p = 2 * r / periods
        phase = rng.uniform(0, p)
        pat = Image.new("L", (n, n), 0)
        pd = ImageDraw.Draw(pat)
        ks = range(-1, math.ceil(n / p) + 1)
        if shape == "stripes":
            for k in ks:
                x0 = phase + k * p
                pd.rectangle([x0, 0, x0 + p / 2, n], fill=255)
        elif shape == "checkerboard":
            for i in ks:
                for j in ks:
                    if (i + j) % 2 == 0:
                        x0, y0 = phase + i * p, phase + j * p
                        pd.rectangle([x0, y0, x0 + p, y0 + p], fill=255)
        else:
            dr = p * rng.uniform(0.26, 0.32)
            for i in ks:
                for j in ks:
                    x0, y0 = phase + (i + 0.5 * (j % 2)) * p, phase + j * p * 0.87
                    pd.ellipse([x0 - dr, y0 - dr, x0 + dr, y0 + dr], fill=255)
        disc(r * 0.92)
        img = Image.fromarray(np.minimum(np.asarray(img), np.asarray(pat)))
    else:
        raise ValueError(f"unknown shape {shape!r}")
    # Nearest-neighbour rotation of the 4x supersampled mask; the box reduction below anti-aliases the edges.
    img = img.rotate(angle, resample=Image.Resampling.NEAREST)
    return img.reduce(ss)


def render_image(spec: ClassSpec, rng: np.random.Generator, min_size: int, max_size: int) -> Image.Image:
    """Draw one RGB image of class ``spec`` from ``rng`` (nothing else is random)."""
    w, h = _image_size(rng, min_size, max_size)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)

    def ramp() -> np.ndarray:
        """A linear 0..1 ramp across the image in a random direction."""
        t = rng.uniform(0, 2 * math.pi)
        g = xx * math.cos(t) + yy * math.sin(t)
        return ((g - g.min()) / np.float32(max(float(np.ptp(g)), 1e-6)))[..., None]

    # Background: gradient between two dull colours (saturation <= 0.3: never looks like a class colour).
    bg0, bg1 = (_hsv_to_rgb(rng.uniform(0, 360), rng.uniform(0, 0.3), rng.uniform(0.15, 0.95)) for _ in "ab")
    img = bg0 * (1 - ramp()) + bg1 * ramp()

    # Object: jittered colour of the class family, shaded across the image.
    fg = _hsv_to_rgb(spec.hue + rng.uniform(-7, 7), rng.uniform(0.6, 1.0), rng.uniform(0.5, 1.0))
    shade = 1 + np.float32(rng.uniform(0, 0.35)) * (ramp() - 0.5)
    side = min(w, h)
    size = max(8, round(side * rng.uniform(0.45, 0.9)))
    mask_img = _shape_mask(spec.shape, size, rng.uniform(0, 360), rng)
    x0 = round(rng.uniform(-0.05 * size, w - 0.95 * size))  # up to 5% of the object may leave the image
    y0 = round(rng.uniform(-0.05 * size, h - 0.95 * size))
    full = Image.new("L", (w, h), 0)
    full.paste(mask_img, (x0, y0))
    m = np.asarray(full, dtype=np.float32)[..., None] / 255.0
    img = img * (1 - m) + np.clip(fg * shade, 0, 255) * m

    # Sensor-like noise over everything.
    img += np.float32(rng.uniform(2, 12)) * rng.standard_normal(size=img.shape, dtype=np.float32)
    return Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8))  # H x W x 3 uint8 -> mode RGB


# --------------------------------------------------------------------------------------------------- the tree


def _image_rng(seed: int, split: str, class_idx: int, index: int) -> np.random.Generator:
    return np.random.default_rng(
        np.random.SeedSequence([_TAG_IMAGE, seed, _SPLIT_IDS[split], class_idx, index])
    )


def _oddity_kinds(seed: int, split: str, total: int) -> dict[int, str]:
    """{flat index (class * per_class + index): kind}: up to 6 per split, at most one per 10 images."""
    n = min(len(_ODDITY_ORDER), total // 10)
    rng = np.random.default_rng(np.random.SeedSequence([_TAG_ODDITIES, seed, _SPLIT_IDS[split]]))
    positions = rng.choice(total, size=n, replace=False)
    return {int(p): kind for p, kind in zip(positions, _ODDITY_ORDER[:n], strict=True)}


def _relpaths(specs: list[ClassSpec], split: str, per_class: int, seed: int) -> list[str]:
    """Relative file paths of a split, in flat (class, index) order."""
    if split == "train":
        return [f"train/{s.wnid}/{s.wnid}_{i + 1}.JPEG" for s in specs for i in range(per_class)]
    # Like ILSVRC2012_val_00000001.JPEG: numbered 1..N over the whole split, in an order unrelated to class.
    rng = np.random.default_rng(np.random.SeedSequence([_TAG_VAL_NAMES, seed, len(specs), per_class]))
    numbers = rng.permutation(len(specs) * per_class) + 1
    flat = [(s, i) for s in specs for i in range(per_class)]
    return [f"val/{s.wnid}/ILSVRC2012_val_{int(n):08d}.JPEG" for (s, _), n in zip(flat, numbers, strict=True)]


def _save(img: Image.Image, path: Path, kind: str | None, quality: int) -> None:
    if kind == "png":
        img.save(path, format="PNG")  # a PNG under a .JPEG name, like n02105855_2933.JPEG
        return
    if kind == "grayscale":
        img = img.convert("L")
    elif kind == "cmyk":
        img = img.convert("CMYK")
    img.save(path, format="JPEG", quality=quality)


def _plan(params: dict) -> dict:
    """Everything about the tree that follows from the parameters without drawing: paths, oddities, counts."""
    specs = class_specs(params["classes"])
    files: dict[str, list[str]] = {}
    oddities: dict[str, dict[int, str]] = {}
    for split in SPLITS:
        per_class = params[f"{split}_per_class"]
        files[split] = _relpaths(specs, split, per_class, params["seed"])
        oddities[split] = _oddity_kinds(params["seed"], split, len(files[split]))
    return {"specs": specs, "files": files, "oddities": oddities}


def _manifest(params: dict, plan: dict) -> dict:
    return {
        "format": MANIFEST_FORMAT,
        "generator_version": GENERATOR_VERSION,
        "params": params,
        "counts": {split: len(plan["files"][split]) for split in SPLITS},
        "oddities": [
            {"split": split, "kind": kind, "path": plan["files"][split][i]}
            for split in SPLITS
            for i, kind in sorted(plan["oddities"][split].items())
        ],
        "classes": [asdict(s) for s in plan["specs"]],
    }


def _summary(root: Path, manifest: dict, created: bool, seconds: float) -> DemoSummary:
    return DemoSummary(
        root=root,
        class_index=root / CLASS_INDEX_NAME,
        manifest=root / MANIFEST_NAME,
        classes=manifest["params"]["classes"],
        counts=dict(manifest["counts"]),
        oddities=[Oddity(o["split"], o["kind"], root / o["path"]) for o in manifest["oddities"]],
        created=created,
        seconds=seconds,
    )


def _check_existing(root: Path, manifest: dict, files: dict[str, list[str]]) -> bool:
    """True if ``root`` already holds this tree; False if it may be (re)written; else DemoTreeError."""
    if root.exists() and not root.is_dir():
        raise DemoTreeError(f"{root} exists and is not a directory")
    for name, complete in ((MANIFEST_NAME, True), (PARTIAL_NAME, False)):
        path = root / name
        if not path.is_file():
            continue
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise DemoTreeError(f"{path} is not readable JSON ({e}); delete {root} and generate again") from e
        if old.get("format") != MANIFEST_FORMAT:
            raise DemoTreeError(f"{path} is not a demo manifest; refusing to write into {root}")
        if old.get("generator_version") != GENERATOR_VERSION or old.get("params") != manifest["params"]:
            theirs = {"generator_version": old.get("generator_version"), **(old.get("params") or {})}
            ours = {"generator_version": GENERATOR_VERSION, **manifest["params"]}
            diff = ", ".join(
                f"{k}={theirs.get(k)!r} (asked for {ours[k]!r})" for k in ours if theirs.get(k) != ours[k]
            )
            raise DemoTreeError(
                f"{root} holds a demo dataset made with other parameters: {diff}. Not mixing them: use "
                f"another directory, the same parameters, or delete {root}"
            )
        if not complete:
            return False  # an interrupted run with the same parameters: regenerate (same bytes) over it
        expected = [root / CLASS_INDEX_NAME] + [root / p for split in SPLITS for p in files[split]]
        missing = [str(p.relative_to(root)) for p in expected if not p.is_file()]
        if missing:
            raise DemoTreeError(
                f"{root} is an incomplete demo dataset: {len(missing)} files missing (first: {missing[0]}); "
                f"delete {root} and generate again"
            )
        for split in SPLITS:
            known = set(files[split])
            found = (str(p.relative_to(root)) for p in (root / split).rglob("*") if p.is_file())
            extra = sorted(rel for rel in found if rel not in known)
            if extra:
                raise DemoTreeError(
                    f"{root} holds {len(extra)} file(s) the demo generator did not write (first: {extra[0]}); "
                    f"delete {root} and generate again"
                )
            recorded = old.get("bytes", {}).get(split)  # absent in manifests written before it was recorded
            total = _split_bytes(root, files[split]) if recorded is not None else None
            if total != recorded:
                raise DemoTreeError(
                    f"{root}/{split} is not what the demo generator wrote (its files total {total:,} bytes, "
                    f"{recorded:,} when written: a file was truncated or replaced); delete {root} and generate again"
                )
        return True
    if root.is_dir() and any(root.iterdir()):
        raise DemoTreeError(f"{root} is not empty and holds no {MANIFEST_NAME}; refusing to write into it")
    return False


def _split_bytes(root: Path, relpaths: list[str]) -> int:
    return sum((root / rel).stat().st_size for rel in relpaths)


def _write_json(path: Path, obj: object, indent: int | None = 1) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=indent) + "\n")
    os.replace(tmp, path)


def make_demo_dataset(
    out_dir: str | os.PathLike,
    classes: int = 10,
    train_per_class: int = 100,
    val_per_class: int = 20,
    seed: int = 0,
    min_size: int = 64,
    max_size: int = 160,
) -> DemoSummary:
    """Write the demo dataset to ``out_dir`` (see the module docstring) and return what is in it.

    ``min_size`` is the smallest shorter side and ``max_size`` the largest longer side, in pixels. Running it
    again with the same arguments on a complete tree does nothing (``created=False``); a tree made with other
    arguments, or a non-empty directory that is not a demo tree, raises ``DemoTreeError``; bad arguments raise
    ValueError.
    """
    check_params(classes, train_per_class, val_per_class, seed, min_size, max_size)
    start = time.perf_counter()
    root = Path(out_dir)
    params = {
        "classes": classes,
        "train_per_class": train_per_class,
        "val_per_class": val_per_class,
        "seed": seed,
        "min_size": min_size,
        "max_size": max_size,
    }
    plan = _plan(params)
    manifest = _manifest(params, plan)
    if _check_existing(root, manifest, plan["files"]):
        return _summary(root, manifest, created=False, seconds=time.perf_counter() - start)

    root.mkdir(parents=True, exist_ok=True)
    _write_json(root / PARTIAL_NAME, manifest)
    specs = plan["specs"]
    for split in SPLITS:
        per_class = params[f"{split}_per_class"]
        for s in specs:
            (root / split / s.wnid).mkdir(parents=True, exist_ok=True)
        for flat, rel in enumerate(plan["files"][split]):
            class_idx, index = divmod(flat, per_class)
            rng = _image_rng(seed, split, class_idx, index)
            img = render_image(specs[class_idx], rng, min_size, max_size)
            quality = int(rng.integers(75, 96))
            _save(img, root / rel, plan["oddities"][split].get(flat), quality)
    # One line, like the widely used imagenet_class_index.json.
    _write_json(root / CLASS_INDEX_NAME, {str(s.index): [s.wnid, s.name] for s in specs}, indent=None)
    # What a later run checks the tree against (a truncated or replaced image changes its split's total)
    manifest["bytes"] = {split: _split_bytes(root, plan["files"][split]) for split in SPLITS}
    _write_json(root / MANIFEST_NAME, manifest)
    (root / PARTIAL_NAME).unlink()
    return _summary(root, manifest, created=True, seconds=time.perf_counter() - start)
