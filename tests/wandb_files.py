"""Reading W&B offline run files back, for tests.

wandb 0.31 no longer ships a Python reader for its run files, so ``read_wandb_file`` reads the container (a
LevelDB-style log: ``:W&B`` header, 32 KiB blocks, records framed by CRC-32 / length / type) and decodes each
record with wandb's own protobuf ``Record``. Every record's checksum is verified.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from pathlib import Path

_HEADER = struct.Struct("<4sHB")  # ident, magic, version
_RECORD = struct.Struct("<IHB")  # crc32 (seeded with the type byte), payload length, type
_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_wandb_file(path: Path) -> list:
    """All records of a ``run-<id>.wandb`` file as ``wandb_internal_pb2.Record`` messages."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, version = _HEADER.unpack_from(data)
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"{path}: not a W&B run file"
    records, pending, pos = [], b"", _HEADER.size
    while pos + _RECORD.size <= len(data):
        if _BLOCK - pos % _BLOCK < _RECORD.size:  # a block's tail too short for a header is padding
            pos += _BLOCK - pos % _BLOCK
            continue
        crc, length, kind = _RECORD.unpack_from(data, pos)
        if (crc, length, kind) == (0, 0, 0):
            break
        payload = data[pos + _RECORD.size : pos + _RECORD.size + length]
        assert zlib.crc32(payload, zlib.crc32(bytes([kind]))) == crc, f"{path}: bad checksum at byte {pos}"
        pos += _RECORD.size + length
        pending = payload if kind in (_FULL, _FIRST) else pending + payload
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


class RunFile:
    """What one offline run file says: run record, config, history rows, final summary, artifacts."""

    def __init__(self, path: Path, check: bool = True) -> None:
        self.path = path
        self.records = read_wandb_file(path)
        kinds = [r.WhichOneof("record_type") for r in self.records]
        self.exited = "exit" in kinds
        if not check:
            return
        assert self.exited and kinds.count("run") == 1, f"{path}: incomplete run file, records {kinds}"
        self.run = next(r.run for r in self.records if r.WhichOneof("record_type") == "run")
        self.config = {
            _key(u): json.loads(u.value_json) for u in self.run.config.update if _key(u) != "_wandb"
        }
        self.history = [
            {_key(i): json.loads(i.value_json) for i in r.history.item}
            for r in self.records
            if r.WhichOneof("record_type") == "history"
        ]
        self.summary: dict = {}
        for r in self.records:
            if r.WhichOneof("record_type") == "summary":
                self.summary.update({_key(u): json.loads(u.value_json) for u in r.summary.update})
        self.artifacts = [r.artifact for r in self.records if r.WhichOneof("record_type") == "artifact"]


def run_files(run_dir: Path, run_id: str, timeout: float = 60.0) -> list[RunFile]:
    """The run's offline files under run_dir/wandb, oldest first (one per start), once each is complete.

    wandb's service writes the last records a moment after ``finish()`` returns (it flushes for certain at
    process exit), so wait until every file holds its exit record.
    """

    # wandb names a start's folder offline-run-<time>-<id>, with "-1", "-2"... appended when two starts of the
    # same id fall in the same second (e.g. a training start and an evaluation continuing its run)
    def start_order(path: Path) -> tuple[str, int]:  # (time, same-second number)
        stamp, _, rest = path.parent.name.removeprefix("offline-run-").partition("-")
        suffix = rest.removeprefix(run_id).lstrip("-")
        return stamp, int(suffix) if suffix else 0

    paths = sorted(
        {
            *run_dir.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"),
            *run_dir.glob(f"wandb/offline-run-*-{run_id}-[0-9]*/run-{run_id}.wandb"),
        },
        key=start_order,
    )
    deadline = time.monotonic() + timeout
    while True:
        files = [RunFile(p, check=False) for p in paths]
        if all(f.exited for f in files) or time.monotonic() > deadline:
            return [RunFile(p) for p in paths]
        time.sleep(0.1)
