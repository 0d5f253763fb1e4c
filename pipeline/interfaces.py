"""The loop's interfaces: what a worker's handler and the I/O adapters provide to ConsumerLoop.

`Handler` is a worker's part (pipeline/loop.py calls its hooks in protocol order); `Source`,
`Sink` and `TableSource` are implemented by pipeline/kafka/ and, for tests, pipeline/memorybus.py.
`Output` is a message to produce, `Rejected` a record the handler cannot apply (a dead letter).
Declarations only: no I/O, nothing runs here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from pipeline.codec import Decoded
from pipeline.errors import InvalidMessage
from pipeline.logtracker import TP
from pipeline.messages import Record

__all__ = ["TP", "Output", "Rejected", "Source", "Sink", "TableSource", "Handler"]


@dataclass(frozen=True, slots=True)
class Output:
    """One message a handler wants produced. `trigger_produced_ms`: when the event it answers
    was produced; the loop observes the end-to-end latency once the broker acknowledged it."""

    topic: str
    key: bytes | None
    value: bytes
    trigger_produced_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Rejected:
    """A record that decoded but that the handler cannot apply (e.g. an unknown model version):
    the loop turns it into a dead letter like any other invalid record."""

    record: Record
    error: InvalidMessage


class Source(Protocol):
    def poll(self, timeout_ms: int, max_records: int) -> list[Record]: ...
    def commit(self, offsets: dict[TP, int]) -> bool:
        """False when the group refused it (this member was rebalanced away)."""

    def seek(self, tp: TP, offset: int) -> None: ...
    def pause(self, partitions: list[TP]) -> None: ...
    def resume(self, partitions: list[TP]) -> None: ...
    def assignment(self) -> set[TP]: ...
    def highwater(self, tp: TP) -> int | None: ...
    def position(self, tp: TP) -> int | None: ...
    def log_id(self, tp: TP) -> str | None:
        """Which log `tp` reads now (Kafka: the topic id), so stored offsets can be matched to
        the log they belong to; None when unknown."""

    def take_rewound(self) -> list[TP]:
        """Partitions whose log was replaced since the last call (a broker that lost its data),
        owned or not; the source has already rewound the owned ones to their beginning."""

    @property
    def fetch_wait_ms(self) -> int | None:
        """The fetch wait the source asks the broker for now (None: it has none to tune)."""

    def close(self) -> None: ...


class Sink(Protocol):
    def send(self, topic: str, key: bytes | None, value: bytes) -> None: ...
    def flush(self, timeout_s: float) -> None: ...
    def close(self) -> None: ...


class TableSource(Protocol):
    """Reads every partition of the global tables (items, model updates) from the beginning."""

    def poll(self, timeout_ms: int, max_records: int) -> list[Record]: ...
    def catch_up(self, timeout_s: float) -> list[Record]: ...
    def close(self) -> None: ...


class Handler(Protocol):
    """What a worker contributes to the loop. A handler subclasses this protocol, so it inherits
    the no-op defaults of the optional hooks (`tick`, `adopt_log_ids`) and declares the rest.
    """

    worker: str

    def kind_of(self, topic: str) -> str:
        """The schema kind of the values on `topic` (see codec.KINDS)."""

    def handle(self, batch: list[Decoded], now_ms: int) -> list[Output | Rejected]:
        """Apply a validated micro-batch (in offset order per partition); return what to produce."""

    def apply_table(self, batch: list[Decoded], now_ms: int) -> list[Output]:
        """Apply global-table records (catalog upserts, model updates)."""

    def on_assign(self, partitions: list[TP]) -> dict[TP, int]:
        """Restore state for new partitions; return the offsets to resume from."""

    def on_revoke(self, partitions: list[TP]) -> None:
        """Forget the state of partitions that moved to another instance."""

    def checkpoint(self, offsets: dict[TP, int]) -> set[TP]:
        """Persist state together with `offsets` (next offset to read); return the partitions
        persisted (a partition whose ownership was lost is left out and not committed)."""

    def on_reset(self, tp: TP) -> None:
        """The input log of `tp` restarted below our offset (the broker lost its data)."""

    def tick(self, now_ms: int) -> list[Output]:
        """Work that needs no input, called every iteration (finished fine-tunes, the paced
        re-scoring after a model swap). Optional: none by default."""
        return []

    def adopt_log_ids(self, current: dict[TP, str | None]) -> dict[TP, str | None]:
        """For a handler that stores offsets durably: persist `current` (which log each
        partition reads now) with its next checkpoints, and return the log ids its restored
        offsets belong to, so offsets of a log replaced while no worker ran are not applied to
        the new one. Optional: by default nothing is stored, so nothing is known ({})."""
        return {}
