"""Durable per-partition worker state: a snapshot plus a write-ahead log, each record carrying the
input offset it brings the state to, so state and offsets are always stored together.

Layout under `<dir>/<topic>-<partition>/`: `snapshot` (one framed record, replaced atomically),
`wal` (framed records appended once per micro-batch), `owner` (the epoch of the instance that
owns the partition). Snapshot and WAL records carry `meta` (the input log their offset is on,
Kafka's topic id, under "log"; whatever else the owner needs restored with the offset), and
the generation of the snapshot they extend, so a fallback to an older snapshot comes back with
that snapshot's offsets and meta and never replays another generation's records. A frame is
magic, length, CRC32C, payload; a torn or corrupt tail is detected by the CRC and ignored, so a
SIGKILL at any moment leaves a loadable store. Every WAL record names the offset it starts from;
only an unbroken chain from the snapshot is replayed. A writer whose
epoch is no longer the owner's (it was paused and the partition moved) is refused.

WAL records are JSON frames (magic `SRS1`). Snapshots are binary frames (magic `SRSB`, same
header and CRC): a JSON head, then the raw bytes of every bytes-valued field of the state, so a
packed state is written without JSON.
"""

from __future__ import annotations

import os
import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import crc32c
import orjson

from pipeline.errors import OwnershipLost, StateError
from pipeline.files import atomic_write, open_private, private_dirs

__all__ = [
    "PartitionStore",
    "Restored",
    "frame",
    "read_frames",
    "clean_length",
    "snapshot_frame",
    "read_snapshot_frame",
]

_MAGIC = b"SRS1"
_SNAPSHOT_MAGIC = b"SRSB"
_SNAPSHOT_VERSION = 2
_HEADER = struct.Struct(">4sII")  # magic, payload length, crc32c(payload)
_HEAD_LENGTH = struct.Struct(">I")


def frame(payload: dict[str, Any]) -> bytes:
    body = orjson.dumps(payload)
    return _HEADER.pack(_MAGIC, len(body), crc32c.crc32c(body)) + body


def read_frames(data: bytes) -> tuple[list[dict[str, Any]], bool]:
    """Decode frames until the first bad one. Returns (payloads, clean) where `clean` is False
    when trailing bytes were torn or corrupt."""
    payloads: list[dict[str, Any]] = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < _HEADER.size:
            return payloads, False
        magic, length, checksum = _HEADER.unpack_from(data, pos)
        body = data[pos + _HEADER.size : pos + _HEADER.size + length]
        if magic != _MAGIC or len(body) != length or crc32c.crc32c(body) != checksum:
            return payloads, False
        try:
            payloads.append(orjson.loads(body))
        except orjson.JSONDecodeError:
            return payloads, False
        pos += _HEADER.size + length
    return payloads, True


def snapshot_frame(
    offset: int,
    state: dict[str, Any],
    meta: dict[str, str] | None = None,
    generation: str | None = None,
) -> list[bytes]:
    """One binary snapshot frame, as chunks to write in order (the bytes fields are not copied):
    header, head length, JSON head (offset, meta, generation, the state's non-bytes fields, the
    name and size of each bytes field), then the bytes fields back to back."""
    blobs = {k: v for k, v in state.items() if isinstance(v, bytes)}
    head = orjson.dumps(
        {
            "version": _SNAPSHOT_VERSION,
            "offset": offset,
            "meta": meta or {},
            "gen": generation,
            "state": {k: v for k, v in state.items() if k not in blobs},
            "blobs": [[k, len(v)] for k, v in blobs.items()],
        }
    )
    body = [_HEAD_LENGTH.pack(len(head)) + head, *blobs.values()]
    checksum = 0
    for chunk in body:
        checksum = crc32c.crc32c(chunk, checksum)
    length = sum(len(chunk) for chunk in body)
    return [_HEADER.pack(_SNAPSHOT_MAGIC, length, checksum), *body]


def read_snapshot_frame(data: bytes) -> dict[str, Any] | None:
    """{"offset", "state", "meta", "gen"} from a whole snapshot file; None when torn or corrupt.
    A valid snapshot of another format raises StateError rather than being ignored."""
    if data[:4] == _MAGIC:
        raise StateError(
            "a JSON-framed snapshot of a pre-release build is not read by this one; "
            "delete the partition's state directory to start its state afresh"
        )
    if len(data) < _HEADER.size + _HEAD_LENGTH.size:
        return None
    magic, length, checksum = _HEADER.unpack_from(data)
    body = memoryview(data)[_HEADER.size :]
    if magic != _SNAPSHOT_MAGIC or len(body) != length or crc32c.crc32c(body) != checksum:
        return None
    (head_length,) = _HEAD_LENGTH.unpack_from(body)
    pos = _HEAD_LENGTH.size + head_length
    head = orjson.loads(body[_HEAD_LENGTH.size : pos])
    if head["version"] != _SNAPSHOT_VERSION:
        raise StateError(f"snapshot format {head['version']} is not supported by this build")
    state = head["state"]
    for name, size in head["blobs"]:
        state[name] = body[pos : pos + size]
        pos += size
    return {
        "offset": head["offset"],
        "state": state,
        "meta": head.get("meta") or {},
        "gen": head.get("gen"),
    }


def clean_length(data: bytes) -> int:
    """Bytes of `data` up to the end of its last whole, valid frame (where a torn tail starts)."""
    pos = 0
    while len(data) - pos >= _HEADER.size:
        magic, length, checksum = _HEADER.unpack_from(data, pos)
        body = data[pos + _HEADER.size : pos + _HEADER.size + length]
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
    meta: dict[str, str] = field(default_factory=dict)  # as of `offset`

    @property
    def log_id(self) -> str | None:
        """The input log `offset` is on, where it was recorded."""
        return self.meta.get("log") or None


class PartitionStore:
    """State store of one input partition. Not thread-safe; one owner at a time."""

    def __init__(
        self,
        root: Path,
        topic: str,
        partition: int,
        *,
        fsync: bool = False,
        compact_bytes: int = 32 * 1024 * 1024,
        fault: Callable[[str], None] | None = None,
    ) -> None:
        self.path = Path(root) / f"{topic}-{partition}"
        self._fsync = fsync
        self._compact_bytes = compact_bytes
        self._epoch: str | None = None
        self._generation: str | None = None  # of the snapshot that appends extend
        self._wal: IO[bytes] | None = None
        self._fault = fault  # fault injection (`streamrec chaos`): called as fault("mid_snapshot")

    # -- ownership -------------------------------------------------------------------------
    def claim(self) -> None:
        """Become the partition's owner; any earlier owner's later writes are refused."""
        private_dirs(self.path, own=True)
        self._epoch = uuid.uuid4().hex
        atomic_write(self.path / "owner", self._epoch.encode())

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
        previous one (`snapshot.prev`), whose chain the caller completes by re-reading input.
        Later appends extend the chain of the snapshot loaded here."""
        snapshot, corrupt = self._read_snapshot(self.path / "snapshot")
        if snapshot is None:  # corrupt, or killed between the two renames of compact()
            snapshot, _ = self._read_snapshot(self.path / "snapshot.prev")
        state = snapshot["state"] if snapshot else None
        offset = snapshot["offset"] if snapshot else None
        meta = dict(snapshot.get("meta") or {}) if snapshot else {}
        self._generation = snapshot.get("gen") if snapshot else None
        deltas: list[dict[str, Any]] = []
        torn = False
        wal_path = self.path / "wal"
        if wal_path.exists():
            records, clean = read_frames(wal_path.read_bytes())
            torn = not clean
            for record in records:
                if record.get("gen") != self._generation:
                    # Another snapshot's chain: already in the loaded one (killed between
                    # compact and truncate), or after a newer snapshot that turned out corrupt
                    # (its offsets may even be on another log).
                    continue
                if record["from"] == offset or (
                    offset is None and not deltas and state is None and record["from"] is None
                ):
                    deltas.append(record["delta"])
                    offset = record["to"]
                    meta.update(record.get("meta") or {})
                elif offset is not None and record["to"] <= offset:
                    continue  # already inside the snapshot (a store older than generations)
                else:
                    break
        return Restored(state, deltas, offset, corrupt, torn, meta)

    @staticmethod
    def _read_snapshot(path: Path) -> tuple[dict[str, Any] | None, bool]:
        if not path.exists():
            return None, False
        try:
            snapshot = read_snapshot_frame(path.read_bytes())
        except StateError as exc:
            raise StateError(f"{path}: {exc}") from exc
        return snapshot, snapshot is None

    # -- writing ---------------------------------------------------------------------------
    def append(
        self,
        from_offset: int | None,
        to_offset: int,
        delta: dict[str, Any],
        meta: dict[str, str] | None = None,
    ) -> int:
        """Log one micro-batch's state change, with `meta` as of `to_offset` (only what
        changed is needed); returns the WAL size in bytes. Call restore() first."""
        self._check_owner()
        if self._wal is None:
            self._wal = open_private(self.path / "wal", "ab")
        record: dict[str, Any] = {"from": from_offset, "to": to_offset, "delta": delta}
        if meta:
            record["meta"] = meta
        if self._generation is not None:
            record["gen"] = self._generation
        self._wal.write(frame(record))
        self._wal.flush()  # in the OS after this: survives SIGKILL of the process
        if self._fsync:
            os.fsync(self._wal.fileno())
        return self._wal.tell()

    def needs_compaction(self, wal_bytes: int) -> bool:
        return wal_bytes >= self._compact_bytes

    def compact(
        self, offset: int, state: dict[str, Any], meta: dict[str, str] | None = None
    ) -> None:
        """Write a full snapshot as of `offset` (with the whole `meta` as of then), keep the
        previous one, start an empty WAL. `state` holds JSON values and bytes (stored raw,
        restored as memoryviews)."""
        self._check_owner()
        current = self.path / "snapshot"
        if current.exists() and self._read_snapshot(current)[0] is not None:
            os.replace(current, self.path / "snapshot.prev")  # a corrupt one never replaces .prev
        if self._fault is not None:
            self._fault("mid_snapshot")  # the worst moment: no `snapshot` file exists
        generation = uuid.uuid4().hex
        atomic_write(current, snapshot_frame(offset, state, meta, generation))
        self._generation = generation
        if self._wal is not None:
            self._wal.close()
            self._wal = None
        atomic_write(self.path / "wal", b"")

    def close(self) -> None:
        if self._wal is not None:
            self._wal.close()
            self._wal = None

    def __enter__(self) -> PartitionStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
