"""In-memory doubles of the loop's Source, Sink and TableSource, for tests: topics as lists.

MemoryBus partitions by key and keeps committed offsets per group like Kafka, and `reset()` does
what an embedded broker restart does. Serving code never imports this module
(tests/test_architecture.py); the Kafka-backed implementations live in pipeline/kafka/.
"""

from __future__ import annotations

import collections
import time
import zlib
from collections.abc import Callable, Sequence

from pipeline.logtracker import TP
from pipeline.messages import Record

__all__ = ["MemoryBus", "MemorySource", "MemorySink", "MemoryTable"]


class MemoryBus:
    """Topics as lists of records, partitioned by key like Kafka (deterministic hash)."""

    def __init__(self, partitions: int = 4) -> None:
        self.partitions = partitions
        self.logs: dict[TP, list[Record]] = collections.defaultdict(list)
        self.committed: dict[tuple[str, TP], int] = {}
        self.incarnation = 0  # bumped by reset(): every topic is new (its id changes on Kafka)

    def partition_for(self, key: bytes | None) -> int:
        return zlib.crc32(key or b"") % self.partitions

    def produce(
        self, topic: str, key: bytes | None, value: bytes | None, timestamp_ms: int = 0
    ) -> Record:
        tp = (topic, self.partition_for(key))
        log_ = self.logs[tp]
        record = Record(topic, tp[1], len(log_), key, value, timestamp_ms)
        log_.append(record)
        return record

    def values(self, topic: str) -> list[Record]:
        out = []
        for p in range(self.partitions):
            out.extend(self.logs.get((topic, p), []))
        return out

    def reset(self) -> None:
        """What an embedded broker restart does: every topic and committed offset is gone."""
        self.logs.clear()
        self.committed.clear()
        self.incarnation += 1


class MemorySource:
    """A consumer that owns all partitions of its topics (one group member)."""

    def __init__(
        self,
        bus: MemoryBus,
        group: str,
        topics: Sequence[str],
        *,
        on_assign: Callable[[list[TP]], None],
        on_revoke: Callable[[list[TP]], None],
    ) -> None:
        self._bus = bus
        self._group = group
        self._topics = list(topics)
        self._on_assign = on_assign
        self._on_revoke = on_revoke
        self._positions: dict[TP, int] = {}
        self._paused: set[TP] = set()
        self._assigned = False
        self._incarnation = bus.incarnation
        self._rewound: list[TP] = []
        self.closed = False

    def pause(self, partitions: list[TP]) -> None:
        self._paused.update(partitions)

    def resume(self, partitions: list[TP]) -> None:
        self._paused.difference_update(partitions)

    def poll(self, timeout_ms: int, max_records: int) -> list[Record]:
        if not self._assigned:
            self._assigned = True
            tps = [(t, p) for t in self._topics for p in range(self._bus.partitions)]
            for tp in tps:
                self._positions[tp] = self._bus.committed.get((self._group, tp), 0)
            self._on_assign(tps)
        if self._incarnation != self._bus.incarnation:  # recreated topics: read them anew
            self._incarnation = self._bus.incarnation
            self._rewound.extend((t, p) for t in self._topics for p in range(self._bus.partitions))
            self._positions = dict.fromkeys(self._positions, 0)
        out: list[Record] = []
        for tp, position in self._positions.items():
            if tp in self._paused or max_records <= len(out):
                continue
            log_ = self._bus.logs.get(tp, [])
            if position > len(log_):  # out of range: reset to earliest, as auto_offset_reset does
                position = 0
            take = log_[position : position + max_records - len(out)]
            out.extend(take)
            self._positions[tp] = position + len(take)
            if len(out) >= max_records:
                break
        return out

    def commit(self, offsets: dict[TP, int]) -> bool:
        for tp, offset in offsets.items():
            self._bus.committed[(self._group, tp)] = offset
        return True

    def seek(self, tp: TP, offset: int) -> None:
        self._positions[tp] = offset

    def assignment(self) -> set[TP]:
        return set(self._positions)

    def highwater(self, tp: TP) -> int | None:
        return len(self._bus.logs.get(tp, []))

    def position(self, tp: TP) -> int | None:
        return self._positions.get(tp)

    def take_rewound(self) -> list[TP]:
        rewound, self._rewound = self._rewound, []
        return rewound

    def log_id(self, tp: TP) -> str | None:
        return f"{tp[0]}#{self._bus.incarnation}"

    @property
    def fetch_wait_ms(self) -> int | None:
        return None

    def revoke_all(self) -> None:
        self._on_revoke(list(self._positions))
        self._positions.clear()
        self._assigned = False

    def close(self) -> None:
        self.closed = True


class MemorySink:
    def __init__(self, bus: MemoryBus, clock: Callable[[], float] = time.time) -> None:
        self._bus = bus
        self._clock = clock
        self.closed = False

    def send(self, topic: str, key: bytes | None, value: bytes) -> None:
        self._bus.produce(topic, key, value, int(self._clock() * 1000))

    def flush(self, timeout_s: float) -> None:
        return None

    def close(self) -> None:
        self.closed = True


class MemoryTable:
    """Reads every partition of the given topics from the beginning, no group, no commits."""

    def __init__(self, bus: MemoryBus, topics: Sequence[str]) -> None:
        self._bus = bus
        self._topics = list(topics)
        self._positions: dict[TP, int] = collections.defaultdict(int)
        self._incarnation = bus.incarnation

    def catch_up(self, timeout_s: float) -> list[Record]:
        return self.poll(0, 1 << 30)

    def poll(self, timeout_ms: int, max_records: int) -> list[Record]:
        if self._incarnation != self._bus.incarnation:
            self._incarnation = self._bus.incarnation
            self._positions.clear()
        out: list[Record] = []
        for topic in self._topics:
            for p in range(self._bus.partitions):
                tp = (topic, p)
                log_ = self._bus.logs.get(tp, [])
                take = log_[self._positions[tp] :]
                out.extend(take)
                self._positions[tp] += len(take)
        return out

    def close(self) -> None:
        return None
