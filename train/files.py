"""Files written atomically: a temporary file in the same folder, then ``os.replace`` onto the name, so a reader
(another rank, another node, the launcher) never sees a partial file, and a failed write leaves no temporary file.

Standard library only: the batch script's retry step (``slurm.retry``, with ``train.watchdog``) imports it with a
node's own ``python3``, outside the project's environment.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


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
