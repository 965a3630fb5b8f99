"""Carry Python wheels to the lent GPU machine in parts: download and split here, join, check and install there.

The lent GPU machine has torch, torchvision, timm and CUDA 13 but no DALI, omegaconf or submitit, and no
network; one call of the device tool carries at most 64 MiB (working tree included). The kit — DALI for CUDA 13
and what it and this project import — is ~250 MiB, so it travels as ≤ 60 MiB parts of one tar stream over
consecutive calls while the machine stays warm (ignored paths already there are kept between calls).

Here (a machine that reaches PyPI), from the repository root (``.whl/`` is git-ignored):

    python benchmarks/device/wheels.py download     # .whl/kit/*.whl: the KIT below, for CPython 3.12 x86-64
    python benchmarks/device/wheels.py split        # .whl/parts/kit.part000 ... (≤ 60 MiB) + kit.json; prints
                                                    # the plan: what each call carries

``download`` runs ``pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform
manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl/kit NAME==VERSION ...`` (pip matches manylinux tags
exactly, hence the list; the DALI wheel is ``nvidia_dali_cuda130-2.4.0-py3-none-manylinux_2_28_x86_64.whl``,
198,655,209 bytes).

On the device (the ``run`` tool), one call per part, back to back — the machine goes back after ~30 s idle
(``status``: idle_release_s), and then the parts already sent are gone with it:

    call 1 … N-1: carry [".whl/parts/kit.json", ".whl/parts/kit.partNNN"]
                  command: python3 benchmarks/device/wheels.py status
    call N:       carry [".whl/parts/kit.json", ".whl/parts/kit.partNNN"]  (the last part)
                  command: python3 benchmarks/device/wheels.py join && python3 benchmarks/device/wheels.py install
                           && . .whl/site/env.sh && python3 benchmarks/train_throughput.py
    later calls on the same warm machine: . .whl/site/env.sh && python3 benchmarks/...

``status`` lists the parts there (each checked against its sha256 in kit.json) and the ones still to carry.
``join`` checks every part, streams them in order through the tar reader (the sha256 of the whole stream is
checked too), writes the wheels to .whl/kit/ and checks each wheel's sha256. ``install`` runs ``pip install
--no-index --no-deps --no-compile --target .whl/site`` on them, writes .whl/site/env.sh (``PYTHONPATH`` and the
kit's ``nvidia/*/lib`` folders on ``LD_LIBRARY_PATH``) and imports nvidia.dali, its PyTorch plugin and omegaconf
with it to prove the install. Standard library only: it runs under the device's python3.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

MIB = 2**20
PART_MIB = 60
ROOT = Path(".whl")
KIT_DIR = ROOT / "kit"
PARTS_DIR = ROOT / "parts"
SITE_DIR = ROOT / "site"
MANIFEST = "kit.json"
PREFIX = "kit.part"

# What the device lacks for the benchmarks and the data pipeline (its image has torch, torchvision, timm, numpy,
# pyyaml, six, packaging, typing-extensions, cloudpickle, wheel). DALI's own Requires-Dist: astunparse, gast,
# optree, nvtx, makefun, libcst, nvidia-nvimgcodec-cu13 (its [all] extra: nvidia-nvjpeg for JPEG decoding on
# the GPU; the JPEG 2000 / TIFF codecs are left out) and nvidia-libnvcomp-cu13. omegaconf: train.config.
# submitit: slurm/ (76 KB). wandb is left out: 20 MB plus a dozen dependencies, and the benchmarks never import it.
# NPP is left out too: libdali_operators.so dlopens libnppc/libnppicc/libnppig only for the NPP functions it
# calls (nppiCFAToRGB: fn.experimental.debayer; nppiRemap: fn.experimental.remap; read with `strings` on the
# 2.4.0 wheel), and this project's pipelines use neither. The device image has cufft, which libdali_kernels needs.
KIT = (
    "nvidia-dali-cuda130==2.4.0",
    "nvidia-nvimgcodec-cu13==0.9.0.20",
    "nvidia-libnvcomp-cu13==5.3.0.16",
    "nvidia-nvjpeg==13.0.4.44",
    "astunparse==1.6.3",
    "gast==0.7.0",
    "optree==0.20.0",
    "nvtx==0.2.17",
    "makefun==1.16.0",
    "libcst==1.9.0",
    "omegaconf==2.4.0",
    "submitit==1.5.4",
)
PYTHON_VERSION = "3.12"  # the device's python3
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
CHECK_IMPORTS = ("nvidia.dali", "nvidia.dali.plugin.pytorch", "omegaconf")


class KitError(RuntimeError):
    """A problem with the kit, in one line."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(MIB), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------- download


def download(specs: Iterable[str], dest: Path) -> list[Path]:
    """``pip download`` the wheels of ``specs`` for CPython 3.12 on x86-64 Linux into ``dest`` (no deps)."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--python-version", PYTHON_VERSION, "--implementation", "cp"]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    cmd += ["-d", str(dest), *specs]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1:] or ["pip failed"]
        raise KitError(f"pip download failed: {last[0]}")
    return sorted(dest.glob("*.whl"))


# --------------------------------------------------------------------------------------------- split/join


class _PartWriter:
    """A write-only file object that cuts what it is given into ``part_bytes`` files, hashing each part and
    the whole stream."""

    def __init__(self, folder: Path, part_bytes: int) -> None:
        self.folder, self.part_bytes = folder, part_bytes
        self.parts: list[dict] = []
        self.total = hashlib.sha256()
        self.size = 0
        self._f: BinaryIO | None = None
        self._h = hashlib.sha256()
        self._n = 0

    def _open(self) -> None:
        name = f"{PREFIX}{len(self.parts):03d}"
        self._f = (self.folder / name).open("wb")
        self._h, self._n = hashlib.sha256(), 0
        self.parts.append({"name": name})

    def _close(self) -> None:
        if self._f is not None:
            self._f.close()
            self.parts[-1].update(bytes=self._n, sha256=self._h.hexdigest())
            self._f = None

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        while view:
            if self._f is None or self._n == self.part_bytes:
                self._close()
                self._open()
            take = view[: self.part_bytes - self._n]
            assert self._f is not None
            self._f.write(take)
            self._h.update(take)
            self.total.update(take)
            self._n += len(take)
            self.size += len(take)
            view = view[len(take) :]
        return len(data)

    def close(self) -> None:
        self._close()


def split(wheels: list[Path], parts_dir: Path, part_mib: float = PART_MIB) -> dict:
    """Write ``wheels`` as one tar stream cut into ≤ ``part_mib`` MiB parts, plus the manifest kit.json."""
    if not wheels:
        raise KitError("no wheels to split: run `download` first (or give --wheels a folder holding *.whl)")
    part_bytes = int(part_mib * MIB)
    if part_bytes < 1:
        raise KitError(f"--part-mib must be positive, got {part_mib}")
    parts_dir.mkdir(parents=True, exist_ok=True)
    for old in parts_dir.glob(f"{PREFIX}*"):  # a previous kit's parts must not mix with this one's
        old.unlink()
    entries = [{"name": w.name, "bytes": w.stat().st_size, "sha256": sha256_file(w)} for w in wheels]
    writer = _PartWriter(parts_dir, part_bytes)
    with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
        for w in wheels:
            info = tar.gettarinfo(str(w), arcname=w.name)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            with w.open("rb") as f:
                tar.addfile(info, f)
    writer.close()
    manifest = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "part_bytes": part_bytes,
        "tar_bytes": writer.size,
        "tar_sha256": writer.total.hexdigest(),
        "parts": writer.parts,
        "wheels": entries,
    }
    (parts_dir / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def read_manifest(parts_dir: Path) -> dict:
    path = parts_dir / MANIFEST
    if not path.is_file():
        raise KitError(f"{path} is missing: carry .whl/parts/{MANIFEST} with every part")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise KitError(f"{path} is not valid JSON ({e.msg})") from None


def check_parts(parts_dir: Path, manifest: dict) -> tuple[list[str], list[str], list[str]]:
    """(good, missing, corrupt) part names."""
    good, missing, corrupt = [], [], []
    for part in manifest["parts"]:
        path = parts_dir / part["name"]
        if not path.is_file():
            missing.append(part["name"])
        elif path.stat().st_size != part["bytes"] or sha256_file(path) != part["sha256"]:
            corrupt.append(part["name"])
        else:
            good.append(part["name"])
    return good, missing, corrupt


class _PartReader:
    """A read-only file object over the parts in order, hashing the stream as it is read."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = list(paths)
        self.total = hashlib.sha256()
        self.size = 0
        self._f: BinaryIO | None = None

    def read(self, n: int = -1) -> bytes:
        out = bytearray()
        while n < 0 or len(out) < n:
            if self._f is None:
                if not self.paths:
                    break
                self._f = self.paths.pop(0).open("rb")
            chunk = self._f.read(-1 if n < 0 else n - len(out))
            if not chunk:
                self._f.close()
                self._f = None
                continue
            out += chunk
        self.total.update(out)
        self.size += len(out)
        return bytes(out)

    def drain(self) -> None:
        while self.read(MIB):
            pass


def join(parts_dir: Path, dest: Path) -> list[Path]:
    """Check every part, read them as one tar stream, write the wheels to ``dest`` and check each one."""
    manifest = read_manifest(parts_dir)
    _, missing, corrupt = check_parts(parts_dir, manifest)
    if missing or corrupt:
        what = [f"missing {', '.join(missing)}"] if missing else []
        what += [f"corrupt (size or sha256) {', '.join(corrupt)}"] if corrupt else []
        raise KitError(f"cannot join: {'; '.join(what)}; carry those parts again")
    expected = {w["name"]: w for w in manifest["wheels"]}
    dest.mkdir(parents=True, exist_ok=True)
    reader = _PartReader([parts_dir / p["name"] for p in manifest["parts"]])
    written: list[Path] = []
    with tarfile.open(fileobj=reader, mode="r|") as tar:  # type: ignore[call-overload]
        for member in tar:
            name = member.name
            if not member.isfile() or name not in expected or "/" in name or name.startswith("."):
                raise KitError(f"unexpected member {name!r} in the kit: not one of kit.json's wheels")
            src = tar.extractfile(member)
            assert src is not None
            out = dest / name
            tmp = dest / f".{name}.part"
            h = hashlib.sha256()
            with tmp.open("wb") as f:
                while block := src.read(MIB):
                    f.write(block)
                    h.update(block)
            if h.hexdigest() != expected[name]["sha256"]:
                tmp.unlink()
                raise KitError(f"{name}: sha256 differs from kit.json after joining")
            os.replace(tmp, out)
            written.append(out)
    reader.drain()  # the tar's zero padding: the whole stream is hashed
    if reader.total.hexdigest() != manifest["tar_sha256"] or reader.size != manifest["tar_bytes"]:
        raise KitError("the joined stream's sha256 differs from kit.json")
    if {p.name for p in written} != set(expected):
        raise KitError(f"the kit lacks {', '.join(sorted(set(expected) - {p.name for p in written}))}")
    return written


# ------------------------------------------------------------------------------------------------ install


def lib_dirs(site: Path) -> list[Path]:
    """The kit's folders of shared libraries (nvidia/cu13/lib, nvidia/libnvcomp/lib64, ...)."""
    found = []
    for folder in sorted((site / "nvidia").glob("*/lib*")):
        if folder.is_dir() and any(folder.glob("*.so*")):
            found.append(folder)
    return found


def env_script(site: Path) -> str:
    site = site.resolve()
    libs = ":".join(str(p.resolve()) for p in lib_dirs(site))
    lines = ["# written by benchmarks/device/wheels.py install: `. .whl/site/env.sh`"]
    lines.append(f'export PYTHONPATH="{site}${{PYTHONPATH:+:$PYTHONPATH}}"')
    if libs:
        lines.append(f'export LD_LIBRARY_PATH="{libs}${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}"')
    return "\n".join(lines) + "\n"


def install(wheels: list[Path], target: Path, check: Iterable[str] = CHECK_IMPORTS) -> dict[str, str]:
    """``pip install --no-index --no-deps --target`` the wheels, write env.sh, import ``check`` with it; returns
    {module: version or "ok"}."""
    if not wheels:
        raise KitError("no wheels to install: run `join` first")
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    cmd += ["--no-cache-dir", "--upgrade", "--target", str(target), *map(str, wheels)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1:] or ["pip failed"]
        raise KitError(f"pip install failed: {last[0]}")
    (target / "env.sh").write_text(env_script(target))
    versions: dict[str, str] = {}
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(target.resolve()), *filter(None, [env.get("PYTHONPATH")])])
    libs = [str(p.resolve()) for p in lib_dirs(target)]
    env["LD_LIBRARY_PATH"] = os.pathsep.join([*libs, *filter(None, [env.get("LD_LIBRARY_PATH")])])
    for module in check:
        code = f"import {module} as m; print(getattr(m, '__version__', 'ok'))"
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            last = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1:] or ["import failed"]
            raise KitError(f"installed, but `import {module}` fails: {last[0]}")
        versions[module] = proc.stdout.strip()
    return versions


# ---------------------------------------------------------------------------------------------------- CLI


def travelling_tree_mib() -> float | None:
    """MiB of the working tree that travels with every device call (tracked + untracked-not-ignored files);
    None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    names = {n for n in out.decode(errors="replace").split("\0") if n}
    return sum(os.path.getsize(n) for n in names if os.path.isfile(n)) / MIB


def _plan(manifest: dict, parts_dir: Path) -> str:
    parts = [p["name"] for p in manifest["parts"]]
    biggest = max(p["bytes"] for p in manifest["parts"]) / MIB
    tree = travelling_tree_mib()
    lines = []
    if tree is not None:
        total = biggest + tree
        verdict = "fits" if total <= 64 else "does NOT fit: lower --part-mib"
        lines.append(
            f"largest part {biggest:.1f} MiB + working tree {tree:.1f} MiB = {total:.1f} MiB per call "
            f"(limit 64 MiB): {verdict}"
        )
    lines.append(f"{len(parts)} part(s); carry them in consecutive device calls, back to back:")
    for i, name in enumerate(parts):
        carry = json.dumps([str(parts_dir / MANIFEST), str(parts_dir / name)])
        if i + 1 < len(parts):
            command = "python3 benchmarks/device/wheels.py status"
        else:
            command = (
                "python3 benchmarks/device/wheels.py join && python3 benchmarks/device/wheels.py install "
                "&& . .whl/site/env.sh && <your command>"
            )
        lines.append(f"  call {i + 1}: carry {carry}\n          command: {command}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("download", help="pip download the kit's wheels (here)")
    p.add_argument("specs", nargs="*", help=f"NAME==VERSION ... (default: the {len(KIT)} of KIT)")
    p.add_argument("--dest", type=Path, default=KIT_DIR)
    p = sub.add_parser("split", help="cut the wheels into parts + kit.json (here)")
    p.add_argument("--wheels", type=Path, default=KIT_DIR, help="folder of *.whl")
    p.add_argument("--parts", type=Path, default=PARTS_DIR)
    p.add_argument("--part-mib", type=float, default=PART_MIB, help="largest part, MiB (default 60)")
    p = sub.add_parser("status", help="which parts are here and intact (device)")
    p.add_argument("--parts", type=Path, default=PARTS_DIR)
    p = sub.add_parser("join", help="check and join the parts into the wheels (device)")
    p.add_argument("--parts", type=Path, default=PARTS_DIR)
    p.add_argument("--dest", type=Path, default=KIT_DIR)
    p = sub.add_parser("install", help="pip install the joined wheels into a folder, write env.sh (device)")
    p.add_argument("--wheels", type=Path, default=KIT_DIR)
    p.add_argument("--target", type=Path, default=SITE_DIR)
    p.add_argument("--check", default=",".join(CHECK_IMPORTS), help="modules to import after installing")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "download":
            wheels = download(args.specs or KIT, args.dest)
            for w in wheels:
                print(f"{w.stat().st_size:>12,}  {w.name}")
            print(
                f"{sum(w.stat().st_size for w in wheels) / MIB:.1f} MiB in {len(wheels)} wheels in {args.dest}"
            )
        elif args.cmd == "split":
            manifest = split(sorted(args.wheels.glob("*.whl")), args.parts, args.part_mib)
            for part in manifest["parts"]:
                print(f"{part['bytes']:>12,}  {args.parts / part['name']}  sha256 {part['sha256'][:16]}…")
            print(f"{len(manifest['wheels'])} wheels, {manifest['tar_bytes'] / MIB:.1f} MiB")
            print(_plan(manifest, args.parts))
        elif args.cmd == "status":
            manifest = read_manifest(args.parts)
            good, missing, corrupt = check_parts(args.parts, manifest)
            print(f"parts here and intact: {len(good)} of {len(manifest['parts'])}: {', '.join(good) or '-'}")
            if missing:
                print(f"still to carry: {', '.join(missing)}")
            if corrupt:
                print(f"corrupt (carry again): {', '.join(corrupt)}")
            if not missing and not corrupt:
                print("complete: run `python3 benchmarks/device/wheels.py join`")
        elif args.cmd == "join":
            wheels = join(args.parts, args.dest)
            print(f"joined {len(wheels)} wheels into {args.dest}, every sha256 checked")
        else:
            wheels = sorted(args.wheels.glob("*.whl"))
            versions = install(wheels, args.target, [m for m in args.check.split(",") if m])
            print(
                f"installed {len(wheels)} wheels into {args.target}; `. {args.target / 'env.sh'}` before use"
            )
            for module, version in versions.items():
                print(f"  import {module}: {version}")
    except KitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
