"""The fine-tune worker's feedback store: events and impressions on local disk, bounded, durable.

Layout under `root/`: append-only segment files `seg-<first seq>.log` of CRC frames (store.frame),
each opening with a header frame holding the next input offset of every partition as of its start,
then one frame per record `{"s": seq, "k": "e"|"i", "tp": [topic, p], "o": offset, "v": value}`,
and a `{"forget": [topic, p]}` frame where that partition's input log restarted (broker loss).
A torn or corrupt tail (SIGKILL mid-write) is cut off when the store opens. Retention drops whole
oldest segments once the newer ones still hold `retention_events` events. No Kafka or torch here.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from pipeline.files import atomic_write, open_private, private_dirs
from pipeline.store import clean_length, frame, read_frames

__all__ = ["FeedbackRecord", "FeedbackStore"]

log = logging.getLogger(__name__)

_PREFIX, _SUFFIX = "seg-", ".log"
_LOG_IDS = "log-ids.json"
EVENT, IMPRESSION = "e", "i"


@dataclass(frozen=True, slots=True)
class FeedbackRecord:
    """One stored record: `kind` "e" (an Event dict) or "i" (an impression dict), the input
    partition and offset it came from, and `seq`, its position in the store (0, 1, 2, ...)."""

    seq: int
    kind: str
    topic: str
    partition: int
    offset: int
    value: dict[str, Any]


@dataclass
class _Segment:
    path: Path
    first_seq: int
    records: int = 0
    events: int = 0
    size: int = 0


def _tp_key(topic: str, partition: int) -> str:
    return f"{topic}|{partition}"


class FeedbackStore:
    """Append-only, segment-rolled, retention-bounded record log. Thread-safe: the consumer loop
    appends while the trainer thread reads. Constructing it does no I/O; `open()` does."""

    def __init__(
        self,
        root: Path,
        *,
        retention_events: int,
        segment_events: int = 50_000,
        fsync: bool = False,
    ) -> None:
        if retention_events < 1 or segment_events < 1:
            raise ValueError(
                f"retention_events={retention_events} and segment_events="
                f"{segment_events} must be >= 1"
            )
        self.root = Path(root)
        self._retention = retention_events
        self._segment_events = segment_events
        self._fsync = fsync
        self._lock = threading.Lock()
        self._segments: list[_Segment] = []
        self._positions: dict[str, int] = {}
        self._next_seq = 0
        self._fh: Any = None
        self.opened = False
        self.torn_tails = 0

    # -- lifecycle -------------------------------------------------------------------------------
    def open(self) -> None:
        """Scan the segments, cut a torn tail off the newest one, restore positions and counts."""
        with self._lock:
            if self.opened:
                return
            private_dirs(self.root, own=True)
            paths = sorted(self.root.glob(f"{_PREFIX}*{_SUFFIX}"))
            for n, path in enumerate(paths):
                data = path.read_bytes()
                frames, clean = read_frames(data)
                good = clean_length(data)
                if not clean:
                    self.torn_tails += 1
                    log.warning(
                        "feedback segment %s: dropping %d torn/corrupt trailing bytes",
                        path.name,
                        len(data) - good,
                    )
                    if n == len(paths) - 1:
                        os.truncate(path, good)  # appends continue after the last whole frame
                seg = _Segment(path, int(path.name[len(_PREFIX) : -len(_SUFFIX)]), size=good)
                for f in frames:
                    if "h" in f:
                        if n == 0:
                            self._positions.update(f["offsets"])
                        continue
                    if "forget" in f:
                        self._positions.pop(_tp_key(*f["forget"]), None)
                        continue
                    seg.records += 1
                    seg.events += f["k"] == EVENT
                    self._positions[_tp_key(*f["tp"])] = int(f["o"]) + 1
                    self._next_seq = max(self._next_seq, int(f["s"]) + 1)
                self._next_seq = max(self._next_seq, seg.first_seq + seg.records)
                self._segments.append(seg)
            self.opened = True

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None

    # -- writing -----------------------------------------------------------------------------------
    def append(self, entries: Iterable[tuple[str, str, int, int, dict[str, Any]]]) -> int:
        """Append (kind, topic, partition, offset, value) entries in order; returns how many.
        Written to the OS at once (survives SIGKILL); fsynced by `flush()` when configured.
        All or nothing: every value is serialised before the first byte is written, so a value
        that cannot be (TypeError/ValueError) leaves the store as it was."""
        # A record at or past its partition's stored position only: one delivered again (the
        # loop retrying a failed batch record by record, a re-read after a crash) is not stored
        # twice, so it is neither trained on nor counted twice.
        with self._lock:
            entries = [e for e in entries if e[3] >= self._positions.get(_tp_key(e[1], e[2]), 0)]
        for kind, *_ in entries:
            if kind not in (EVENT, IMPRESSION):
                raise ValueError(f"unknown feedback kind {kind!r}")
        bodies = [orjson.Fragment(orjson.dumps(value)) for *_, value in entries]
        with self._lock:
            self._require_open()
            n = 0
            for (kind, topic, partition, offset, _), body in zip(entries, bodies):
                seg = self._active()
                data = frame(
                    {
                        "s": self._next_seq,
                        "k": kind,
                        "tp": [topic, partition],
                        "o": offset,
                        "v": body,
                    }
                )
                self._fh.write(data)
                seg.records += 1
                seg.events += kind == EVENT
                seg.size += len(data)
                self._positions[_tp_key(topic, partition)] = offset + 1
                self._next_seq += 1
                n += 1
            if self._fh is not None:
                self._fh.flush()
            self._enforce_retention()
            return n

    def flush(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.flush()
                if self._fsync:
                    os.fsync(self._fh.fileno())

    def log_ids(self) -> dict[tuple[str, int], str]:
        """Which input log each stored position belongs to (Kafka: the topic id), as recorded."""
        path = self.root / _LOG_IDS
        if not path.exists():
            return {}
        stored = orjson.loads(path.read_bytes())
        return {
            (key.rpartition("|")[0], int(key.rpartition("|")[2])): log_id
            for key, log_id in stored.items()
        }

    def set_log_ids(self, log_ids: dict[tuple[str, int], str]) -> None:
        """Record the logs the positions now belong to; call after `flush()` of what was read
        from them (a crash in between re-reads, never skips)."""
        atomic_write(
            self.root / _LOG_IDS, orjson.dumps({_tp_key(*tp): i for tp, i in log_ids.items()})
        )

    def forget(self, topic: str, partition: int) -> None:
        """The input log of (topic, partition) restarted: resume it from wherever Kafka says.
        Durable (a frame in the log), so a reopened store does not bring the old log's
        position back."""
        with self._lock:
            self._require_open()
            self._positions.pop(_tp_key(topic, partition), None)
            seg, data = self._active(), frame({"forget": [topic, partition]})
            self._fh.write(data)
            self._fh.flush()
            if self._fsync:  # before the new log id is recorded (FinetuneHandler.checkpoint)
                os.fsync(self._fh.fileno())
            seg.size += len(data)

    def _active(self) -> _Segment:
        seg = self._segments[-1] if self._segments else None
        if seg is None or seg.events >= self._segment_events:
            if self._fh is not None:
                self._fh.close()
            path = self.root / f"{_PREFIX}{self._next_seq:012d}{_SUFFIX}"
            header = frame({"h": 1, "offsets": dict(self._positions)})
            self._fh = open_private(path, "ab")
            self._fh.write(header)
            seg = _Segment(path, self._next_seq, size=len(header))
            self._segments.append(seg)
        elif self._fh is None:
            self._fh = open_private(seg.path, "ab")
        return seg

    def _enforce_retention(self) -> None:
        # Drop the oldest segment while the others still hold the retained number of events.
        while len(self._segments) > 1:
            total = sum(s.events for s in self._segments)
            oldest = self._segments[0]
            if total - oldest.events < self._retention:
                break
            self._segments.pop(0)
            try:
                oldest.path.unlink()
            except FileNotFoundError:
                pass

    # -- reading -----------------------------------------------------------------------------------
    def positions(self) -> dict[tuple[str, int], int]:
        """Next input offset per partition, as stored: where the consumer resumes."""
        with self._lock:
            self._require_open()
            out = {}
            for key, offset in self._positions.items():
                topic, _, partition = key.rpartition("|")
                out[(topic, int(partition))] = offset
            return out

    def read(
        self, kinds: Sequence[str] = (EVENT, IMPRESSION), since_seq: int = 0
    ) -> list[FeedbackRecord]:
        """Retained records of `kinds` with seq >= since_seq, oldest first. Safe while appending:
        reads each segment up to its size at the time of the call."""
        with self._lock:
            self._require_open()
            if self._fh is not None:
                self._fh.flush()
            snapshot = [
                (s.path, s.size) for s in self._segments if s.first_seq + s.records > since_seq
            ]
        out: list[FeedbackRecord] = []
        for path, size in snapshot:
            try:
                with open(path, "rb") as fh:
                    data = fh.read(size)
            except FileNotFoundError:
                continue  # dropped by retention meanwhile
            frames, _ = read_frames(data)
            for f in frames:
                if "h" in f or "forget" in f or f["k"] not in kinds or f["s"] < since_seq:
                    continue
                out.append(FeedbackRecord(f["s"], f["k"], f["tp"][0], f["tp"][1], f["o"], f["v"]))
        return out

    @property
    def next_seq(self) -> int:
        """The seq the next appended record gets (records ever appended, retained or not)."""
        with self._lock:
            return self._next_seq

    def stats(self) -> dict[str, int]:
        """Retained events, impressions, bytes and segments (for metrics)."""
        with self._lock:
            events = sum(s.events for s in self._segments)
            records = sum(s.records for s in self._segments)
            return {
                "events": events,
                "impressions": records - events,
                "bytes": sum(s.size for s in self._segments),
                "segments": len(self._segments),
            }

    def _require_open(self) -> None:
        if not self.opened:
            raise RuntimeError("FeedbackStore.open() must be called first")

    def __enter__(self) -> FeedbackStore:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
