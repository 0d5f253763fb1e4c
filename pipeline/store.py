"""Durable per-partition worker state: a snapshot plus a write-ahead log, each record carrying the
input offset it brings the state to, so state and offsets are always stored together.

Layout under `<dir>/<topic>-<partition>/`: `snapshot` (one framed record, replaced atomically),
`wal` (framed records appended once per micro-batch), `owner` (the epoch of the instance that
owns the partition). A frame is magic, length, CRC32C, payload; a torn or corrupt tail is detected
by the CRC and ignored, so a SIGKILL at any moment leaves a loadable store. Every WAL record names
the offset it starts from; only an unbroken chain from the snapshot is replayed. A writer whose
epoch is no longer the owner's (it was paused and the partition moved) is refused.
"""

from __future__ import annotations

import os
import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import crc32c
import orjson

from pipeline.errors import StateError

__all__ = ["PartitionStore", "Restored", "OwnershipLost", "frame", "read_frames", "clean_length"]

_MAGIC = b"SRS1"
_HEADER = struct.Struct(">4sII")  # magic, payload length, crc32c(payload)


class OwnershipLost(StateError):
    """Another instance took this partition over; this one must not write its state."""


def frame(payload: dict[str, Any]) -> bytes:
    body = orjson.dumps(payload)
    return _HEADER.pack(_MAGIC, len(body), crc32c.crc32c(body)) + body


def read_frames(data: bytes) -> tuple[list[dict[str, Any]], bool]:
    """Decode frames until the first bad one. Returns (payloads, clean) where `clean` is False
    when trailing bytes were torn or corrupt."""
    payloads = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < _HEADER.size:
            return payloads, False
        magic, length, checksum = _HEADER.unpack_from(data, pos)
        body = data[pos + _HEADER.size: pos + _HEADER.size + length]
        if magic != _MAGIC or len(body) != length or crc32c.crc32c(body) != checksum:
            return payloads, False
        try:
            payloads.append(orjson.loads(body))
        except orjson.JSONDecodeError:
            return payloads, False
        pos += _HEADER.size + length
    return payloads, True


def clean_length(data: bytes) -> int:
    """Bytes of `data` up to the end of its last whole, valid frame (where a torn tail starts)."""
    pos = 0
    while len(data) - pos >= _HEADER.size:
        magic, length, checksum = _HEADER.unpack_from(data, pos)
        body = data[pos + _HEADER.size: pos + _HEADER.size + length]
        if magic != _MAGIC or len(body) != length or crc32c.crc32c(body) != checksum:
            break
        pos += _HEADER.size + length
    return pos


@dataclass(frozen=True)
class Restored:
    """What was found on disk: the state as of `offset` (next input offset to read)."""

    state: dict[str, Any] | None
    deltas: list[dict[str, Any]]
    offset: int | None
    snapshot_corrupt: bool
    wal_torn: bool


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PartitionStore:
    """State store of one input partition. Not thread-safe; one owner at a time."""

    def __init__(self, root: Path, topic: str, partition: int, *, fsync: bool = False,
                 compact_bytes: int = 32 * 1024 * 1024,
                 fault: Callable[[str], None] | None = None) -> None:
        self.path = Path(root) / f"{topic}-{partition}"
        self._fsync = fsync
        self._compact_bytes = compact_bytes
        self._epoch: str | None = None
        self._wal: Any = None
        self._fault = fault  # fault injection (`streamrec chaos`): called as fault("mid_snapshot")

    # -- ownership -------------------------------------------------------------------------
    def claim(self) -> None:
        """Become the partition's owner; any earlier owner's later writes are refused."""
        self.path.mkdir(parents=True, exist_ok=True)
        self._epoch = uuid.uuid4().hex
        self._atomic_write(self.path / "owner", self._epoch.encode())

    def _check_owner(self) -> None:
        try:
            owner = (self.path / "owner").read_text()
        except OSError as exc:
            raise StateError(f"cannot read owner of {self.path}: {exc}") from exc
        if owner != self._epoch:
            raise OwnershipLost(f"{self.path} is now owned by another instance")

    # -- reading ---------------------------------------------------------------------------
    def restore(self) -> Restored:
        """Load snapshot + the unbroken WAL chain after it. A corrupt snapshot falls back to the
        previous one (`snapshot.prev`), whose chain the caller completes by re-reading input."""
        snapshot, corrupt = self._read_snapshot(self.path / "snapshot")
        if snapshot is None:  # corrupt, or killed between the two renames of compact()
            snapshot, _ = self._read_snapshot(self.path / "snapshot.prev")
        state = snapshot["state"] if snapshot else None
        offset = snapshot["offset"] if snapshot else None
        deltas: list[dict[str, Any]] = []
        torn = False
        wal_path = self.path / "wal"
        if wal_path.exists():
            records, clean = read_frames(wal_path.read_bytes())
            torn = not clean
            for record in records:
                if record["from"] == offset or (offset is None and not deltas and state is None
                                                 and record["from"] is None):
                    deltas.append(record["delta"])
                    offset = record["to"]
                elif offset is not None and record["to"] <= offset:
                    continue  # already inside the snapshot (crash between compact and truncate)
                else:
                    break
        return Restored(state, deltas, offset, corrupt, torn)

    @staticmethod
    def _read_snapshot(path: Path) -> tuple[dict[str, Any] | None, bool]:
        if not path.exists():
            return None, False
        records, clean = read_frames(path.read_bytes())
        if not clean or len(records) != 1:
            return None, True
        return records[0], False

    # -- writing ---------------------------------------------------------------------------
    def append(self, from_offset: int | None, to_offset: int, delta: dict[str, Any]) -> int:
        """Log one micro-batch's state change; returns the WAL size in bytes."""
        self._check_owner()
        if self._wal is None:
            self._wal = open(self.path / "wal", "ab")
        self._wal.write(frame({"from": from_offset, "to": to_offset, "delta": delta}))
        self._wal.flush()  # in the OS after this: survives SIGKILL of the process
        if self._fsync:
            os.fsync(self._wal.fileno())
        return self._wal.tell()

    def needs_compaction(self, wal_bytes: int) -> bool:
        return wal_bytes >= self._compact_bytes

    def compact(self, offset: int, state: dict[str, Any]) -> None:
        """Write a full snapshot as of `offset`, keep the previous one, start an empty WAL."""
        self._check_owner()
        current = self.path / "snapshot"
        if current.exists() and self._read_snapshot(current)[0] is not None:
            os.replace(current, self.path / "snapshot.prev")  # a corrupt one never replaces .prev
        if self._fault is not None:
            self._fault("mid_snapshot")  # the worst moment: no `snapshot` file exists
        self._atomic_write(current, frame({"offset": offset, "state": state}))
        if self._wal is not None:
            self._wal.close()
            self._wal = None
        self._atomic_write(self.path / "wal", b"")

    def _atomic_write(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)

    def close(self) -> None:
        if self._wal is not None:
            self._wal.close()
            self._wal = None

    def __enter__(self) -> "PartitionStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
