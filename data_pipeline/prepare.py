r"""Sort the official ILSVRC2012 validation images into class folders: ``VAL_DIR/<wnid>/ILSVRC2012_val_*.JPEG``.

The val tar (ILSVRC2012_img_val.tar) extracts to 50,000 flat files ``ILSVRC2012_val_00000001.JPEG`` ...
``ILSVRC2012_val_00050000.JPEG``. Their classes come in one of two forms:

* the devkit (ILSVRC2012_devkit_t12.tar.gz): ``data/ILSVRC2012_validation_ground_truth.txt`` holds one
  ILSVRC2012_ID per line, line i for file number i, and ``data/meta.mat`` maps IDs to WordNet IDs (struct array
  ``synsets``; the 1000 leaf synsets, ``num_children == 0``, have IDs 1..1000, not in wnid order);
* Kaggle's ``LOC_val_solution.csv``: ``ImageId,PredictionString`` rows such as
  ``ILSVRC2012_val_00008726,n02119789 255 142 454 329 n02119789 44 21 322 295``; the first token is the wnid.

    python -m data_pipeline prepare-val /datasets/imagenet/val \
        --labels ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt \
        --meta ILSVRC2012_devkit_t12/data/meta.mat
    python -m data_pipeline prepare-val /datasets/imagenet/val --labels LOC_val_solution.csv
    python -m data_pipeline prepare-val /datasets/imagenet/val --labels LOC_val_solution.csv --link --dry-run

Default: move (rename) every image into its class folder. ``--link`` leaves the flat files where they are and
makes hard links in the class folders. Where hard links are refused (a class folder that is a link to another
filesystem, some network filesystems, ``fs.protected_hardlinks`` on files of another user) it makes relative
symbolic links instead (``../NAME`` for a plain class folder, so they stay valid if VAL_DIR is moved as a whole)
and says how many.

Every step is one rename or link, so an interrupted run leaves each image either flat or in its class folder:
running the command again finishes the job, and running it on a finished folder changes nothing and says so.
An image already in its class folder is fine; one in another class folder is an error naming it. Moving a
folder prepared with ``--link`` (without ``--link``) removes the flat names and keeps the class-folder files.
"""

from __future__ import annotations

import csv
import errno
import os
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

__all__ = [
    "PrepareError",
    "PrepareSummary",
    "Progress",
    "UsageError",
    "ValLabels",
    "ValPlan",
    "apply_plan",
    "plan_val",
    "prepare_val",
    "read_labels",
    "read_meta",
]

LOC_CSV_HEADER = ["ImageId", "PredictionString"]
# The only files in VAL_DIR that must have a label; anything else (a README, the labels file) is left alone.
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
WNID_RE = re.compile(r"^n\d{8}$")
# Hard link refused: across filesystems, not allowed (protected_hardlinks, some FUSE/network filesystems), not
# supported, or too many links. Then a relative symbolic link is made instead.
_NO_HARDLINK = {
    errno.EXDEV,
    errno.EPERM,
    errno.EACCES,
    errno.ENOTSUP,
    errno.EOPNOTSUPP,
    errno.EMLINK,
    errno.ENOSYS,
}
_SHOW = 3  # names quoted in a one-line problem about many files
_SHOW_EACH = 20  # problems reported one line per file, at most


class PrepareError(ValueError):
    """The labels or the folder are inconsistent: ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class UsageError(PrepareError):
    """The command line names something that is not there or not usable (exit status 2)."""


def _fmt(n: int) -> str:
    return f"{n:,}"


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOW])
    return shown + (f", ... ({_fmt(len(names) - _SHOW)} more)" if len(names) > _SHOW else "")


class Progress:
    """A progress line with counts, rate and ETA on ``stream`` (stderr by default).

    On a terminal the line is rewritten in place (``\\r``) every ``interval`` s (default 0.5); elsewhere (SLURM
    logs, pipes) one line is written every ``interval`` s (default 15), plus a final one if any was written.
    """

    def __init__(self, label: str, total: int, stream: TextIO | None = None, interval: float | None = None):
        self.label, self.total = label, total
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval if interval is not None else (0.5 if self.tty else 15.0)
        self.start = self.last = time.perf_counter()
        self.done = 0
        self.written = False

    def line(self) -> str:
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        pct = 100.0 * self.done / self.total if self.total else 100.0
        text = f"{self.label}: {_fmt(self.done)}/{_fmt(self.total)} ({pct:.0f}%), {rate:,.0f}/s"
        if 0 < self.done < self.total and rate > 0:
            text += f", ETA {_duration((self.total - self.done) / rate)}"
        return text

    def update(self, done: int) -> None:
        """Record that ``done`` items are finished; write a line if ``interval`` s have passed."""
        self.done = done
        now = time.perf_counter()
        if now - self.last >= self.interval:
            self.last = now
            self._write()

    def close(self) -> None:
        """Write the final line (only if an intermediate one was written)."""
        if self.written:
            self._write()
            if self.tty:
                self.stream.write("\n")
                self.stream.flush()

    def _write(self) -> None:
        self.written = True
        self.stream.write(("\r" if self.tty else "") + self.line() + ("" if self.tty else "\n"))
        self.stream.flush()


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


# ------------------------------------------------------------------------------------------------- labels


@dataclass(frozen=True)
class ValLabels:
    """Ground truth of a validation set: image file name -> wnid."""

    source: Path
    form: str  # "devkit" (ground-truth txt + meta.mat) or "loc_csv" (LOC_val_solution.csv)
    labels: dict[str, str]

    @property
    def wnids(self) -> list[str]:
        return sorted(set(self.labels.values()))


def _as_int(value: object) -> int | None:
    """An integral number from a loadmat field (uint8/uint16/double, 0-d or 1-element array), else None."""
    try:
        import numpy as np

        arr = np.asarray(value)
        if arr.size != 1 or arr.dtype.kind not in "uif":
            return None
        x = arr.reshape(()).item()
    except (TypeError, ValueError):
        return None
    return int(x) if float(x).is_integer() else None


def read_meta(meta: str | os.PathLike) -> dict[int, str]:
    """Leaf synsets of the devkit's ``meta.mat``: {ILSVRC2012_ID: wnid} (1000 entries, IDs 1..1000, for ILSVRC2012).

    The file holds a struct array ``synsets`` (1860 x 1 in the real devkit) with fields ILSVRC2012_ID, WNID,
    words, gloss, num_children, children, wordnet_height, num_train_images; the classes are the leaves
    (``num_children == 0``), the other 860 are WordNet ancestors with IDs above 1000.
    """
    from scipy.io import loadmat  # only this form needs scipy

    path = Path(meta)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise UsageError(f"--meta {path} {what} (the devkit has it at ILSVRC2012_devkit_t12/data/meta.mat)")
    try:
        mat = loadmat(str(path), squeeze_me=True)
    except Exception as e:  # scipy raises ValueError, MatReadError, TypeError, ... on non-MAT input
        raise PrepareError(f"{path} is not a MATLAB .mat file ({type(e).__name__}: {e})") from None
    synsets = mat.get("synsets")
    need = ("ILSVRC2012_ID", "WNID", "num_children")
    names = getattr(getattr(synsets, "dtype", None), "names", None) or ()
    if synsets is None or any(f not in names for f in need):
        raise PrepareError(
            f"{path} is not the ILSVRC2012 devkit's meta.mat: it needs a struct array 'synsets' with fields "
            f"{', '.join(need)} (found variables: {', '.join(k for k in mat if not k.startswith('__')) or 'none'})"
        )
    leaves: dict[int, str] = {}
    for i, s in enumerate(synsets.reshape(-1)):
        sid, children = _as_int(s["ILSVRC2012_ID"]), _as_int(s["num_children"])
        wnid = s["WNID"]
        if sid is None or children is None or not isinstance(wnid, str):
            raise PrepareError(
                f"{path}: synsets({i + 1}) has no integer ILSVRC2012_ID/num_children or WNID text"
            )
        if children != 0:
            continue
        if sid in leaves:
            raise PrepareError(f"{path}: ILSVRC2012_ID {sid} appears twice among the leaf synsets")
        leaves[sid] = wnid
    if not leaves:
        raise PrepareError(f"{path} has no leaf synsets (num_children == 0)")
    dup = [w for w, n in Counter(leaves.values()).items() if n > 1]
    if dup:
        raise PrepareError(f"{path}: WNID {dup[0]} belongs to two leaf synsets")
    return leaves


def _read_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise PrepareError(f"{path} is not a text file (ground-truth txt or LOC_val_solution.csv)") from None
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def _read_devkit(path: Path, lines: list[str], meta: Path) -> ValLabels:
    leaves = read_meta(meta)
    labels: dict[str, str] = {}
    bad_syntax: list[int] = []
    unknown: list[tuple[int, int]] = []
    for n, line in enumerate(lines, start=1):
        sid = line.strip()
        if not sid.isdigit():
            bad_syntax.append(n)
            continue
        wnid = leaves.get(int(sid))
        if wnid is None:
            unknown.append((n, int(sid)))
            continue
        labels[f"ILSVRC2012_val_{n:08d}.JPEG"] = wnid
    if bad_syntax:
        n = bad_syntax[0]
        raise PrepareError(
            f"{path} line {n}: {lines[n - 1].strip()!r} is not an ILSVRC2012_ID "
            f"(the ground-truth file has one integer per line){_more(bad_syntax)}"
        )
    if unknown:
        (n, sid), ids = unknown[0], sorted(leaves)
        raise PrepareError(
            f"{path} line {n}: ILSVRC2012_ID {sid} is not one of the {_fmt(len(leaves))} leaf synsets of {meta} "
            f"(IDs {ids[0]}..{ids[-1]}){_more(unknown)}"
        )
    return ValLabels(path, "devkit", labels)


def _more(items: list) -> str:
    return f" (and {_fmt(len(items) - 1)} more lines like it)" if len(items) > 1 else ""


def _read_loc_csv(path: Path, lines: list[str], known: dict[int, str] | None, meta: Path | None) -> ValLabels:
    known_wnids = set(known.values()) if known is not None else None
    labels: dict[str, str] = {}
    bad: list[tuple[int, str]] = []
    for n, row in enumerate(csv.reader(lines[1:]), start=2):
        if len(row) != 2 or not row[0].strip() or not row[1].split():
            bad.append((n, f"expected 'ImageId,PredictionString' with a wnid first, got {','.join(row)!r}"))
            continue
        image_id, wnid = row[0].strip(), row[1].split()[0]
        name = image_id if image_id.upper().endswith(".JPEG") else image_id + ".JPEG"
        if not WNID_RE.match(wnid):
            bad.append((n, f"{wnid!r} is not a WordNet ID (n + 8 digits)"))
        elif known_wnids is not None and wnid not in known_wnids:
            bad.append((n, f"{wnid} is not one of the {_fmt(len(known_wnids))} leaf synsets of {meta}"))
        elif name in labels:
            bad.append((n, f"{image_id} is listed twice"))
        else:
            labels[name] = wnid
    if bad:
        (n, why) = bad[0]
        raise PrepareError(f"{path} line {n}: {why}{_more(bad)}")
    if not labels:
        raise PrepareError(f"{path} has a header but no rows")
    return ValLabels(path, "loc_csv", labels)


def read_labels(labels: str | os.PathLike, meta: str | os.PathLike | None = None) -> ValLabels:
    """Read either label form (told apart by content: the CSV starts with its header ``ImageId,...``).

    The ground-truth txt needs ``meta`` (the devkit's meta.mat); with the CSV, ``meta`` is optional and, when
    given, every wnid must be one of its leaf synsets (otherwise it must look like a WordNet ID).
    """
    path = Path(labels)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise UsageError(
            f"--labels {path} {what} (ILSVRC2012_validation_ground_truth.txt from the devkit, or Kaggle's "
            "LOC_val_solution.csv)"
        )
    lines = _read_lines(path)
    if not lines:
        raise PrepareError(f"{path} is empty")
    first = next(csv.reader(lines[:1]))
    meta_path = Path(meta) if meta is not None else None
    if [c.strip() for c in first] == LOC_CSV_HEADER:
        return _read_loc_csv(path, lines, read_meta(meta_path) if meta_path else None, meta_path)
    if lines[0].strip().isdigit():
        if meta_path is None:
            raise UsageError(
                f"{path} is a devkit ground-truth file (ILSVRC2012_IDs): give --meta ILSVRC2012_devkit_t12/data/"
                "meta.mat to map the IDs to wnids"
            )
        return _read_devkit(path, lines, meta_path)
    raise PrepareError(
        f"{path} is neither ILSVRC2012_validation_ground_truth.txt (one integer per line) nor LOC_val_solution.csv "
        f"(header 'ImageId,PredictionString'); its first line is {lines[0][:60]!r}"
    )


# --------------------------------------------------------------------------------------------------- plan


@dataclass
class ValPlan:
    """What ``apply_plan`` will do in ``val_dir``: ``todo`` images to move or link, ``finish`` link-prepared
    images whose flat name is removed (move mode), ``done`` images already in their class folder."""

    val_dir: Path
    labels: ValLabels
    link: bool
    todo: list[tuple[str, str]] = field(default_factory=list)  # (file name, wnid)
    finish: list[tuple[str, str]] = field(default_factory=list)
    done: int = 0
    ignored: list[str] = field(default_factory=list)  # non-image files directly in val_dir, left alone

    @property
    def classes(self) -> int:
        return len(self.labels.wnids)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def plan_val(val_dir: str | os.PathLike, labels: ValLabels, link: bool = False) -> ValPlan:
    """Compare ``val_dir`` with the labels and list what is left to do; every inconsistency -> PrepareError."""
    root = Path(val_dir)
    if not root.is_dir():
        raise UsageError(f"VAL_DIR {root} is not a directory")
    wnids = set(labels.wnids)
    plan = ValPlan(root, labels, link)
    flat: set[str] = set()
    placed: dict[str, list[str]] = {}  # name -> class folders holding it
    broken: list[str] = []
    foreign_dirs: list[str] = []
    with os.scandir(root) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if entry.name not in wnids:
                foreign_dirs.append(entry.name)
                continue
            with os.scandir(entry.path) as sub:
                for f in sub:
                    if f.is_file():
                        placed.setdefault(f.name, []).append(entry.name)
                    elif not f.is_dir() and f.is_symlink():
                        broken.append(f"{entry.name}/{f.name}")
        elif entry.is_file():
            if entry.name.lower().endswith(IMAGE_SUFFIXES):
                flat.add(entry.name)
            else:
                plan.ignored.append(entry.name)
        elif entry.is_symlink():
            broken.append(entry.name)

    problems: list[str] = []
    problems += [
        f"{root / d}/ is not a class folder: no label names {d} (move it out of {root})" for d in foreign_dirs
    ]
    problems += [f"{root / b} is a broken symbolic link" for b in broken]
    misplaced = [
        (name, d, labels.labels[name])
        for name, dirs in sorted(placed.items())
        if name in labels.labels
        for d in dirs
        if d != labels.labels[name]
    ]
    for name, d, want in misplaced[:_SHOW_EACH]:
        problems.append(f"{root / d / name} is in the wrong class folder: {labels.source.name} says {want}")
    if len(misplaced) > _SHOW_EACH:
        problems.append(f"... and {_fmt(len(misplaced) - _SHOW_EACH)} more images in the wrong class folder")
    found = flat | set(placed)
    unlabelled = sorted(found - set(labels.labels))
    if unlabelled:
        problems.append(
            f"{_fmt(len(unlabelled))} image(s) in {root} have no label in {labels.source} "
            f"({_fmt(len(labels.labels))} labels for {_fmt(len(found))} images): {_names(unlabelled)}"
        )
    missing = sorted(set(labels.labels) - found)
    if missing:
        problems.append(
            f"{_fmt(len(missing))} labelled image(s) are not in {root}, neither flat nor in their class folder "
            f"({_fmt(len(labels.labels))} labels for {_fmt(len(found))} images): {_names(missing)}"
        )

    conflicts: list[str] = []
    for name in sorted(set(labels.labels) & found):
        wnid = labels.labels[name]
        in_class = wnid in placed.get(name, ())
        if name not in flat:
            plan.done += 1  # moved by an earlier run
        elif not in_class:
            plan.todo.append((name, wnid))
        elif not _same_file(root / name, root / wnid / name):
            conflicts.append(f"{root / name} and {root / wnid / name} both exist and are different files")
        elif link:
            plan.done += 1
        else:
            plan.finish.append((name, wnid))  # prepared with --link, now moved: drop the flat name
    problems += conflicts[:_SHOW_EACH]
    if len(conflicts) > _SHOW_EACH:
        problems.append(f"... and {_fmt(len(conflicts) - _SHOW_EACH)} more files that exist twice")
    if problems:
        raise PrepareError(problems)
    return plan


# -------------------------------------------------------------------------------------------------- apply


@dataclass
class PrepareSummary:
    """What ``prepare_val`` did (or would do, with ``dry_run``)."""

    val_dir: Path
    form: str
    images: int  # labelled images in val_dir
    classes: int
    moved: int = 0
    linked: int = 0  # hard links
    symlinked: int = 0  # symbolic links made where hard links were refused
    already: int = 0  # already in their class folder before this run
    ignored: list[str] = field(default_factory=list)
    dry_run: bool = False
    seconds: float = 0.0
    symlink_reason: str = ""


def _link(src: Path, dst: Path, summary: PrepareSummary) -> None:
    if not summary.symlinked:
        try:
            os.link(src, dst)
            summary.linked += 1
            return
        except OSError as e:
            if e.errno not in _NO_HARDLINK:
                raise
            summary.symlink_reason = f"{e.strerror} (errno {errno.errorcode.get(e.errno, e.errno)})"
    # Relative to where the class folder really is (it may itself be a link to another filesystem, the usual
    # reason hard links fail): "../NAME" for a plain folder, so the link survives moving VAL_DIR as a whole.
    os.symlink(os.path.relpath(os.path.realpath(src), os.path.realpath(dst.parent)), dst)
    summary.symlinked += 1


def apply_plan(plan: ValPlan, progress: Progress | None = None) -> PrepareSummary:
    """Carry out ``plan``: one rename (or link) per image, class folders created as needed."""
    start = time.perf_counter()
    root = plan.val_dir
    summary = PrepareSummary(
        root, plan.labels.form, len(plan.labels.labels), plan.classes, already=plan.done, ignored=plan.ignored
    )
    for wnid in sorted({w for _, w in plan.todo}):
        (root / wnid).mkdir(exist_ok=True)
    n, total = 0, len(plan.todo) + len(plan.finish)
    try:
        for name, wnid in plan.todo:
            src, dst = root / name, root / wnid / name
            if plan.link:
                _link(src, dst, summary)
            else:
                os.rename(src, dst)  # atomic: an interruption never loses or doubles an image
                summary.moved += 1
            n += 1
            if progress is not None:
                progress.update(n)
        for name, wnid in plan.finish:
            src, dst = root / name, root / wnid / name
            if dst.is_symlink():
                os.replace(src, dst)  # the file takes the place of the symlink that pointed to it
            else:
                os.unlink(src)  # a hard link: the class-folder name keeps the data
            summary.moved += 1
            n += 1
            if progress is not None:
                progress.update(n)
    except OSError as e:
        hint = (
            " (a class folder on another filesystem? --link works across them)"
            if e.errno == errno.EXDEV
            else ""
        )
        raise PrepareError(
            f"{e.filename}: {e.strerror}{hint}; {_fmt(n)} of {_fmt(total)} images done, rerun to continue"
        ) from None
    finally:
        if progress is not None:
            progress.close()
    summary.seconds = time.perf_counter() - start
    return summary


def prepare_val(
    val_dir: str | os.PathLike,
    labels: str | os.PathLike,
    meta: str | os.PathLike | None = None,
    link: bool = False,
    dry_run: bool = False,
    progress_stream: TextIO | None = None,
) -> tuple[ValPlan, PrepareSummary]:
    """Read the labels, plan, and (unless ``dry_run``) sort ``val_dir`` into class folders.

    Raises UsageError for paths that are missing and PrepareError for inconsistent labels or folders; both
    carry one line per problem. Progress goes to ``progress_stream`` (stderr by default).
    """
    if not Path(val_dir).is_dir():
        raise UsageError(f"VAL_DIR {val_dir} is not a directory")
    plan = plan_val(val_dir, read_labels(labels, meta), link=link)
    if dry_run:
        summary = PrepareSummary(
            plan.val_dir,
            plan.labels.form,
            len(plan.labels.labels),
            plan.classes,
            already=plan.done,
            ignored=plan.ignored,
            dry_run=True,
        )
        return plan, summary
    total = len(plan.todo) + len(plan.finish)
    progress = Progress("prepare-val", total, stream=progress_stream) if total else None
    return plan, apply_plan(plan, progress)
