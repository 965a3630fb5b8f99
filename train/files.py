"""Files written atomically: a temporary file in the same folder, then ``os.replace`` onto the name, so a reader
(another rank, another node, the launcher) never sees a partial file, and a failed write leaves no temporary file.

Standard library only: the batch script's retry step (``slurm.retry``, with ``train.watchdog``) imports it with a
node's own ``python3``, outside the project's environment.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomically(path: str | os.PathLike[str], write: Callable[[Path], object]) -> Path:
    """``write`` a temporary file beside ``path`` (named with this process's id), then replace ``path`` with it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """A text file (a JSON record, a config), atomically."""
    return atomically(path, lambda tmp: tmp.write_text(text))


def read_json_lines(path: str | os.PathLike[str]) -> list[Any]:
    """The JSON rows of a ``.jsonl`` file, a line that does not parse (torn by a crash mid-write) skipped; [] when
    there is no file. (``train.report.JsonLines`` is the strict reader and the writer of the training's own.)"""
    import json

    try:
        text = Path(path).read_text(errors="replace")
    except (FileNotFoundError, IsADirectoryError):
        return []
    rows = []
    for line in text.splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows
