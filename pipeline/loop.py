"""THE consumer loop every worker runs, and the in-memory bus the unit tests run it on.

One iteration: poll a micro-batch, decode (bad records become dead letters), let the worker's
handler apply it, produce every output, persist the handler's state with the offsets that produced
it, then commit. A record therefore ends applied, recognised as a duplicate, or in the DLQ before
its offset is committed; a crash at any step re-delivers it to a state that has not seen it.
Commits may cover several batches (`commit_interval_s`): a synchronous commit per batch is a
broker round trip on the latency path, and a later commit covers the earlier offsets; pending
offsets are committed on revoke and on close.

The loop knows nothing about Kafka: `Source`/`Sink`/`TableSource` are implemented by
pipeline/kafka/ for real brokers and by `MemoryBus` here for tests.

Size: over 400 lines while it holds the loop, the reset/log-id bookkeeping and the in-memory
doubles; issue 20 splits those apart.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from pipeline.codec import DLQ_KEY_BYTES, Codec, Decoded, encode
from pipeline.crashguard import CrashGuard
from pipeline.errors import (BrokerError, InvalidMessage, RegistryError, StateError,
                             StreamrecError)
from pipeline.messages import Record
from pipeline.metrics import WorkerMetrics

__all__ = [
    "TP",
    "Output",
    "Rejected",
    "Source",
    "Sink",
    "TableSource",
    "Handler",
    "ConsumerLoop",
    "MemoryBus",
    "MemorySource",
    "MemorySink",
    "MemoryTable",
]

log = logging.getLogger(__name__)

TP = tuple[str, int]

# Failures that are not about the record in hand stop the worker: the broker, the disk or the
# state store, a registry that cannot load a model, memory. Anything else raised while records
# are applied is the fault of one of them: the batch is retried record by record and the
# culprit dead-lettered (processing_error), as Kafka Streams' exception handlers do.
INFRASTRUCTURE_ERRORS: tuple[type[BaseException], ...] = (
    BrokerError, StateError, RegistryError, OSError, MemoryError)


def processing_error(exc: Exception) -> InvalidMessage:
    """The dead-letter reason of a record whose handling raised `exc`."""
    return InvalidMessage("processing_error", f"{type(exc).__name__}: {exc}"[:512])


@dataclass(frozen=True, slots=True)
class Output:
    """One message a handler wants produced."""

    topic: str
    key: bytes | None
    value: bytes


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
    """What a worker contributes to the loop.

    Optional, looked up with getattr: `tick(now_ms) -> list[Output]`, called every iteration for
    work that needs no input (finished fine-tunes, the paced re-scoring after a model swap); and
    `adopt_log_ids(current: dict[TP, str | None]) -> dict[TP, str | None]` for a handler that
    stores offsets durably: persist `current` (which log each partition reads now) with its
    next checkpoints, and return the log ids its restored offsets belong to, so offsets of a
    log that was replaced while no worker ran are not applied to the new one.
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


def _no_fault(point: str) -> None:
    """Fault-injection hook (`streamrec chaos`): called at named points of a batch."""


@dataclass
class _Positions:
    expected: dict[TP, int] = field(default_factory=dict)
    # Replaced logs not persisted on since (an offset restored for them points into the lost
    # log) -> whether this instance has counted and handled the reset of that partition yet.
    lost_log: dict[TP, bool] = field(default_factory=dict)


class ConsumerLoop:
    """Runs a Handler over a Source until `stop` is set. See the module docstring for the order."""

    def __init__(self, *, handler: Handler, source_factory: Callable[..., Source], sink: Sink,
                 codec: Codec, metrics: WorkerMetrics, dlq_topic: str,
                 table: TableSource | None = None,
                 max_records: int = 1000, poll_timeout_ms: int = 20,
                 clock: Callable[[], float] = time.time,
                 stop: threading.Event | None = None,
                 fault: Callable[[str], None] | None = None,
                 dead_letters: bool = True,
                 commit_interval_s: float = 0.0,
                 milestone: Callable[[str], None] | None = None,
                 guard: CrashGuard | None = None) -> None:
        self._handler = handler
        # Which records are being applied, so a record that kills the process twice is
        # quarantined by the next start (pipeline/crashguard.py).
        self._guard = guard
        # Start-up milestones ("restored", "first_batch"), each reported once (runtime logs them).
        self._milestone = milestone
        self._milestones_left = {"restored", "first_batch"} if milestone is not None else set()
        self._dead_letters = dead_letters  # False: another worker owns this topic's DLQ
        self._fault = fault or _no_fault
        self._sink = sink
        self._codec = codec
        self._metrics = metrics
        self._table = table
        self._dlq_topic = dlq_topic
        self._max_records = max_records
        self._poll_timeout_ms = poll_timeout_ms
        self._clock = clock
        self.stop = stop or threading.Event()
        self._positions = _Positions()
        self._last_lag_check = 0.0
        self._commit_interval_s = commit_interval_s
        self._last_commit = float("-inf")
        self._uncommitted: dict[TP, int] = {}  # persisted, not yet committed (next offsets)
        self._pending_assign: list[TP] = []
        self._source = source_factory(on_assign=self._on_assign, on_revoke=self._on_revoke)

    # -- rebalance hooks (called by the source from inside poll) -----------------------------
    def _on_assign(self, partitions: list[TP]) -> None:
        # Runs inside poll (on kafka-python's IO thread): restoring state here can outlast the
        # session timeout and expire the member, so only pause the partitions; the loop's own
        # thread restores them right after poll returns (`_restore_assigned`).
        self._source.pause(partitions)
        self._pending_assign.extend(tp for tp in partitions if tp not in self._pending_assign)

    def _restore_assigned(self) -> None:
        """Restore state for newly assigned partitions, seek to their stored offsets, resume."""
        partitions, self._pending_assign = self._pending_assign, []
        resume = self._handler.on_assign(partitions)
        current = {tp: self._source.log_id(tp) for tp in partitions}
        stored = self._adopt_log_ids(current)
        for tp, offset in resume.items():
            if stored.get(tp) and current.get(tp):
                if stored[tp] == current[tp]:
                    # Persisted on the new log already (by the member that held it since):
                    # the stored offset is good, nothing to re-read.
                    self._positions.lost_log.pop(tp, None)
                elif tp not in self._positions.lost_log:
                    # Replaced while no member of ours was reading it (a broker that lost its
                    # data while this worker was down): a new log longer than the stored offset
                    # would otherwise be read from the middle.
                    self._positions.lost_log[tp] = False
            if tp in self._positions.lost_log:
                if not self._positions.lost_log[tp]:
                    self._broker_reset(tp, "assigned after its log was replaced")
                log.warning("%s[%d]: stored offset %d belongs to the lost log; reading the new "
                            "log from 0", tp[0], tp[1], offset)
                offset = 0
            self._source.seek(tp, offset)
            self._positions.expected[tp] = offset
        self._source.resume(partitions)
        self._metrics.partitions.set(len(self._source.assignment()))
        self._reached("restored")

    def _reached(self, milestone: str) -> None:
        if milestone in self._milestones_left:
            self._milestones_left.discard(milestone)
            assert self._milestone is not None
            self._milestone(milestone)

    def _on_revoke(self, partitions: list[TP]) -> None:
        self._pending_assign = [tp for tp in self._pending_assign if tp not in partitions]
        leaving = {tp: self._uncommitted.pop(tp) for tp in partitions if tp in self._uncommitted}
        if leaving:  # what this instance applied, so the next owner does not re-read it
            self._source.commit(leaving)
        self._handler.on_revoke(partitions)
        for tp in partitions:
            self._positions.expected.pop(tp, None)
            try:  # a partition that moved away must not keep adding its last lag
                self._metrics.lag.remove(tp[0], str(tp[1]))
            except KeyError:
                pass

    # -- the loop ------------------------------------------------------------------------------
    def prime(self, timeout_s: float) -> int:
        """Read the global tables to their end before serving, so the first batch already knows
        the whole catalog and the newest model. Returns the number of table records applied."""
        if self._table is None:
            return 0
        now_ms = int(self._clock() * 1000)
        records = self._table.catch_up(timeout_s)
        self._produce(self._apply_table(self._decode_table(records, now_ms), now_ms))
        return len(records)

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.run_once()
        finally:
            self.close()

    def run_once(self) -> int:
        """One micro-batch. Returns the number of input records consumed."""
        m = self._metrics
        started = time.perf_counter()
        now_ms = int(self._clock() * 1000)
        outputs: list[Output] = []
        # 1. Global tables first, so this batch already sees the newest catalog and model.
        if self._table is not None:
            table_records = self._table.poll(0, self._max_records)
            if table_records:
                outputs += self._apply_table(self._decode_table(table_records, now_ms), now_ms)
        # 1b. Periodic work that needs no input (the fine-tune worker emits finished runs).
        tick = getattr(self._handler, "tick", None)
        if tick is not None:
            outputs += tick(now_ms)
        # 2. Poll the partitions this instance owns (one record at a time where a record may
        # have killed the previous process).
        guard = self._guard
        max_records = self._batch_limit()
        with m.time_stage("poll"):
            records = self._source.poll(self._poll_timeout_ms, max_records)
            self._take_rewound()
            if self._pending_assign:  # assigned during that poll: restore, then read them too
                self._restore_assigned()
                max_records = self._batch_limit()
                if len(records) < max_records:
                    records += self._source.poll(0, max_records - len(records))
        self._check_lag()
        if not records:
            self._produce(outputs)
            self._commit(force=False)
            return 0
        m.batch_size.observe(len(records))
        if guard is not None:
            guard.begin(_offset_ranges(records))
        # 3. Validate: every record becomes either a Decoded or a dead letter.
        with m.time_stage("validate"):
            good, dead = self._decode(records, now_ms)
        outputs += dead
        # 4. Apply; a record whose handling raises is dead-lettered, the rest go on.
        outputs += self._apply(good, now_ms)
        self._fault("after_state_update")
        # 5. Produce everything and wait for the broker's acknowledgement.
        self._produce(outputs)
        if self._milestones_left:
            self._reached("first_batch")
        self._fault("after_produce")
        # 6. Persist state with the offsets that produced it, then 7. commit those offsets.
        offsets = {}
        for record in records:
            offsets[(record.topic, record.partition)] = record.offset + 1
        with m.time_stage("persist"):
            persisted = self._handler.checkpoint(offsets)
        self._fault("before_commit")
        self._uncommitted.update({tp: o for tp, o in offsets.items() if tp in persisted})
        for tp in persisted:
            self._positions.lost_log.pop(tp, None)
        if guard is not None:
            guard.end({tp: o for tp, o in offsets.items() if tp in persisted})
        self._commit(force=False)
        self._positions.expected.update({tp: o for tp, o in offsets.items() if tp in persisted})
        m.batch_seconds.observe(time.perf_counter() - started)
        return len(records)

    def _batch_limit(self) -> int:
        """One record per batch while a partition that may hold a deadly record is assigned."""
        guard = self._guard
        if guard is not None and guard.state.singles_until \
                and guard.state.singles(self._source.assignment()):
            return 1
        return self._max_records

    def _apply(self, batch: list[Decoded], now_ms: int) -> list[Output]:
        """handler.handle(batch), with each record's failure kept to that record: a batch that
        raises is retried one record at a time (handlers tolerate a record seen twice: the
        updater's dedup window, the fine-tune store's all-or-nothing append)."""
        try:
            results = self._handler.handle(batch, now_ms) if batch else []
        except INFRASTRUCTURE_ERRORS:
            raise
        except Exception as exc:
            if len(batch) == 1:
                record = batch[0].record
                log.error("%s[%d]@%d could not be processed (%s: %s); dead-lettering it",
                          record.topic, record.partition, record.offset, type(exc).__name__, exc,
                          exc_info=exc)
                return [self._reject(Rejected(record, processing_error(exc)), now_ms)]
            log.warning("a micro-batch of %d records failed (%s: %s); retrying it record by "
                        "record to find the culprit", len(batch), type(exc).__name__, exc)
            return [out for decoded in batch for out in self._apply([decoded], now_ms)]
        return [self._reject(out, now_ms) if isinstance(out, Rejected) else out for out in results]

    def _apply_table(self, batch: list[Decoded], now_ms: int) -> list[Output]:
        """handler.apply_table, isolated per record like `_apply`: the tables are read from
        their beginning at every start, so a record that raised would raise forever. A failing
        record is skipped and counted; the group that consumes its topic dead-letters it."""
        try:
            return self._handler.apply_table(batch, now_ms) if batch else []
        except INFRASTRUCTURE_ERRORS:
            raise
        except Exception as exc:
            if len(batch) > 1:
                return [out for decoded in batch for out in self._apply_table([decoded], now_ms)]
            record = batch[0].record
            log.error("table record %s[%d]@%d could not be applied (%s: %s); skipping it",
                      record.topic, record.partition, record.offset, type(exc).__name__, exc)
            self._metrics.skipped_table_records.labels(topic=record.topic,
                                                       reason="processing_error").inc()
            return []

    def _commit(self, *, force: bool) -> None:
        """Commit the persisted offsets once `commit_interval_s` has passed (or now, if forced)."""
        now = time.monotonic()
        if not self._uncommitted or (not force and now - self._last_commit < self._commit_interval_s):
            return
        owned = self._source.assignment()  # never a partition a rebalance gave to someone else
        with self._metrics.time_stage("commit"):
            accepted = self._source.commit({tp: o for tp, o in self._uncommitted.items()
                                            if tp in owned})
        # Refused (rebalanced away): keep the offsets of partitions still ours for the next try.
        self._uncommitted = {} if accepted else {tp: o for tp, o in self._uncommitted.items()
                                                 if tp in owned}
        self._last_commit = now

    def _produce(self, outputs: Sequence[Output]) -> None:
        if not outputs:
            return
        with self._metrics.time_stage("produce"):
            counts: collections.Counter[str] = collections.Counter()
            for out in outputs:
                self._sink.send(out.topic, out.key, out.value)
                counts[out.topic] += 1
            self._sink.flush(30.0)
        for topic, n in counts.items():
            self._metrics.produced.labels(topic=topic).inc(n)

    def _decode(self, records: list[Record], now_ms: int) -> tuple[list[Decoded], list[Output]]:
        good: list[Decoded] = []
        dead: list[Output] = []
        counts: collections.Counter[str] = collections.Counter()
        first_seen: set[TP] = set()
        for record in records:
            tp = (record.topic, record.partition)
            counts[record.topic] += 1
            if tp not in first_seen:
                first_seen.add(tp)
                self._detect_reset(tp, record.offset)
            try:
                if self._guard is not None and self._guard.state.quarantine \
                        and self._guard.state.quarantined(tp, record.offset):
                    self._metrics.quarantined.labels(topic=record.topic).inc()
                    raise InvalidMessage(
                        "quarantined", "the worker died twice while this record was being "
                        "applied; dead-lettered instead of applied a third time")
                decoded = self._decode_one(record, now_ms)
            except InvalidMessage as exc:
                if self._dead_letters:
                    dead.append(self._reject(Rejected(record, exc), now_ms))
                else:
                    self._metrics.invalid.labels(topic=record.topic, reason=exc.reason).inc()
                continue
            if decoded.key_mismatch:
                self._metrics.key_mismatch.labels(topic=record.topic).inc()
            good.append(decoded)
        for topic, n in counts.items():
            self._metrics.consumed.labels(topic=topic).inc(n)
        return good, dead

    def _reject(self, rejected: Rejected, now_ms: int) -> Output:
        record, exc = rejected.record, rejected.error
        self._metrics.invalid.labels(topic=record.topic, reason=exc.reason).inc()
        log.warning("dead letter %s[%d]@%d: %s", record.topic, record.partition, record.offset, exc)
        letter = self._codec.dead_letter(record, exc, now_ms)
        key = record.key[:DLQ_KEY_BYTES] if record.key is not None else None
        return Output(self._dlq_topic, key, encode(letter))

    def _decode_one(self, record: Record, now_ms: int) -> Decoded:
        """codec.decode, whose only exception is InvalidMessage, with that promise enforced."""
        try:
            return self._codec.decode(record, self._handler.kind_of(record.topic), now_ms)
        except (InvalidMessage, *INFRASTRUCTURE_ERRORS):
            raise
        except Exception as exc:
            log.error("decoding %s[%d]@%d raised %s: %s", record.topic, record.partition,
                      record.offset, type(exc).__name__, exc)
            raise processing_error(exc) from exc

    def _decode_table(self, records: list[Record], now_ms: int) -> list[Decoded]:
        good = []
        for record in records:
            try:
                good.append(self._decode_one(record, now_ms))
            except InvalidMessage as exc:
                self._metrics.skipped_table_records.labels(topic=record.topic,
                                                           reason=exc.reason).inc()
        return good

    def _detect_reset(self, tp: TP, first_offset: int) -> None:
        expected = self._positions.expected.get(tp)
        if expected is not None and first_offset < expected:
            self._broker_reset(tp, f"fetched offset {first_offset} below expected {expected}")

    def _take_rewound(self) -> None:
        """Partitions a rebalance may hand us later resume at 0 too (their stored offset, maybe
        written by another member, belongs to the lost log); owned ones count as a reset now."""
        rewound = self._source.take_rewound()
        if not rewound:
            return
        owned = self._source.assignment()
        for tp in rewound:
            if tp in owned:
                self._broker_reset(tp, "the source found its log replaced and rewound it")
            else:  # handled (and counted) if a rebalance hands it to us before it is persisted
                self._positions.lost_log.setdefault(tp, False)

    def _broker_reset(self, tp: TP, why: str) -> None:
        self._positions.lost_log[tp] = True
        log.warning("input log of %s[%d] restarted (%s): the broker lost its data; carrying on "
                    "from the new log", tp[0], tp[1], why)
        self._metrics.broker_resets.inc()
        self._positions.expected.pop(tp, None)
        self._uncommitted.pop(tp, None)  # an offset into the lost log must not land on the new one
        if self._guard is not None:
            self._guard.forget(tp)
        self._handler.on_reset(tp)
        self._adopt_log_ids({tp: self._source.log_id(tp)})

    def _adopt_log_ids(self, current: dict[TP, str | None]) -> dict[TP, str | None]:
        adopt = getattr(self._handler, "adopt_log_ids", None)
        return adopt(current) if adopt is not None and current else {}

    def _check_lag(self) -> None:
        """Once a second: export lag, and catch resets that leave an idle partition behind."""
        now = time.monotonic()
        if now - self._last_lag_check < 1.0:
            return
        self._last_lag_check = now
        wait_ms = getattr(self._source, "fetch_wait_ms", None)  # Kafka sources only
        if wait_ms is not None:
            self._metrics.fetch_wait_seconds.set(wait_ms / 1000)
        for tp in self._source.assignment():
            highwater = self._source.highwater(tp)
            position = self._source.position(tp)
            if highwater is None or position is None:
                continue
            self._metrics.lag.labels(topic=tp[0], partition=str(tp[1])).set(max(0, highwater - position))
            expected = self._positions.expected.get(tp)
            if expected is not None and highwater < expected and position <= highwater:
                self._broker_reset(tp, f"high watermark {highwater} below expected {expected}")

    def close(self) -> None:
        try:
            self._commit(force=True)
        except StreamrecError as exc:  # the broker is gone: the next owner re-reads (at-least-once)
            log.warning("final commit failed: %s", exc)
        self._source.close()
        if self._table is not None:
            self._table.close()
        self._sink.close()
        if self._guard is not None:
            self._guard.close()


def _offset_ranges(records: list[Record]) -> dict[TP, tuple[int, int]]:
    """First and last offset of each partition in a micro-batch (offset order per partition)."""
    ranges: dict[TP, tuple[int, int]] = {}
    for record in records:
        tp = (record.topic, record.partition)
        first = ranges[tp][0] if tp in ranges else record.offset
        ranges[tp] = (first, record.offset)
    return ranges


# -- the in-memory bus ---------------------------------------------------------------------------


class MemoryBus:
    """Topics as lists of records, partitioned by key like Kafka (deterministic hash)."""

    def __init__(self, partitions: int = 4) -> None:
        self.partitions = partitions
        self.logs: dict[TP, list[Record]] = collections.defaultdict(list)
        self.committed: dict[tuple[str, TP], int] = {}
        self.incarnation = 0  # bumped by reset(): every topic is new (its id changes on Kafka)

    def partition_for(self, key: bytes | None) -> int:
        return zlib.crc32(key or b"") % self.partitions

    def produce(self, topic: str, key: bytes | None, value: bytes | None,
                timestamp_ms: int = 0) -> Record:
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

    def __init__(self, bus: MemoryBus, group: str, topics: Sequence[str], *,
                 on_assign: Callable[[list[TP]], None], on_revoke: Callable[[list[TP]], None]) -> None:
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
            take = log_[position: position + max_records - len(out)]
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
                take = log_[self._positions[tp]:]
                out.extend(take)
                self._positions[tp] += len(take)
        return out

    def close(self) -> None:
        return None
