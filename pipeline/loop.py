"""THE consumer loop every worker runs.

One iteration: poll a micro-batch, decode (bad records become dead letters), let the worker's
handler apply it, produce every output, persist the handler's state with the offsets that produced
it, then commit. A record therefore ends applied, recognised as a duplicate, or in the DLQ before
its offset is committed; a crash at any step re-delivers it to a state that has not seen it.
Commits may cover several batches (`commit_interval_s`): a synchronous commit per batch is a
broker round trip on the latency path, and a later commit covers the earlier offsets; pending
offsets are committed on revoke and on close.

The loop knows nothing about Kafka: `Source`/`Sink`/`TableSource` (pipeline/interfaces.py, with
the `Handler` a worker contributes; re-exported here) are implemented by pipeline/kafka/ for
real brokers and by pipeline/memorybus.py for tests. Which log each partition reads, and when
the broker replaced it, is pipeline/logtracker.py's bookkeeping.

Size: the iteration, the rebalance hooks and the per-record isolation (decode, apply,
dead-letter) are one protocol whose order is the guarantee; split apart they would be read
together anyway.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence

from pipeline.codec import DLQ_KEY_BYTES, Codec, Decoded, encode
from pipeline.config import LoggingConfig
from pipeline.crashguard import CrashGuard
from pipeline.errors import BrokerError, InvalidMessage, RegistryError, StateError, StreamrecError
from pipeline.health import LoopHealth
from pipeline.interfaces import TP, Handler, Output, Rejected, Sink, Source, TableSource
from pipeline.logtracker import LogTracker
from pipeline.messages import Record
from pipeline.metrics import WorkerMetrics
from pipeline.ratelimit import LogLimiter

__all__ = [
    "TP",
    "Output",
    "Rejected",
    "Source",
    "Sink",
    "TableSource",
    "Handler",
    "ConsumerLoop",
    "INFRASTRUCTURE_ERRORS",
    "processing_error",
]

log = logging.getLogger(__name__)

# Failures that are not about the record in hand stop the worker: the broker, the disk or the
# state store, a registry that cannot load a model, memory. Anything else raised while records
# are applied is the fault of one of them: the batch is retried record by record and the
# culprit dead-lettered (processing_error), as Kafka Streams' exception handlers do.
INFRASTRUCTURE_ERRORS: tuple[type[BaseException], ...] = (
    BrokerError,
    StateError,
    RegistryError,
    OSError,
    MemoryError,
)


def processing_error(exc: Exception) -> InvalidMessage:
    """The dead-letter reason of a record whose handling raised `exc`."""
    return InvalidMessage("processing_error", f"{type(exc).__name__}: {exc}"[:512])


def _no_fault(point: str) -> None:
    """Fault-injection hook (`streamrec chaos`): called at named points of a batch."""


class ConsumerLoop:
    """Runs a Handler over a Source until `stop` is set. See the module docstring for the order.

    `clock` (seconds since the epoch) is the loop's only time source: `now_ms` for the handler,
    the commit interval and the once-a-second lag check."""

    def __init__(
        self,
        *,
        handler: Handler,
        source_factory: Callable[..., Source],
        sink: Sink,
        codec: Codec,
        metrics: WorkerMetrics,
        dlq_topic: str,
        table: TableSource | None = None,
        max_records: int = 1000,
        poll_timeout_ms: int = 20,
        clock: Callable[[], float] = time.time,
        stop: threading.Event | None = None,
        fault: Callable[[str], None] | None = None,
        dead_letters: bool = True,
        commit_interval_s: float = 0.0,
        milestone: Callable[[str], None] | None = None,
        guard: CrashGuard | None = None,
        liveness_timeout_s: float = 60.0,
        dead_letter_log: LogLimiter | None = None,
    ) -> None:
        self._handler = handler
        # What /healthz and /readyz answer from (pipeline/health.py).
        self.health = LoopHealth(liveness_timeout_s)
        metrics.poll_age.set_function(self.health.poll_age)
        if dead_letter_log is None:
            defaults = LoggingConfig()
            dead_letter_log = LogLimiter(
                defaults.dead_letter_lines, defaults.dead_letter_interval_s
            )
        self._dead_letter_log = dead_letter_log
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
        self._logs = LogTracker()
        self._last_lag_check = float("-inf")
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
        self._metrics.rebalances.inc()
        self._pending_assign.extend(tp for tp in partitions if tp not in self._pending_assign)
        self.health.restoring = len(self._pending_assign)
        self.health.assigned = True

    def _restore_assigned(self) -> None:
        """Restore state for newly assigned partitions, seek to their stored offsets, resume."""
        partitions, self._pending_assign = self._pending_assign, []
        stored_offsets = self._handler.on_assign(partitions)
        current = {tp: self._source.log_id(tp) for tp in partitions}
        stored_logs = self._handler.adopt_log_ids(current) if current else {}
        for tp, offset in stored_offsets.items():
            resume = self._logs.assigned(tp, offset, stored_logs.get(tp), current.get(tp))
            if resume.reset is not None:
                self._handle_reset(tp, resume.reset)
            if resume.lost:
                log.warning(
                    "%s[%d]: stored offset %d belongs to the lost log; reading the new log from 0",
                    tp[0],
                    tp[1],
                    offset,
                )
            self._source.seek(tp, resume.offset)
        self._source.resume(partitions)
        self.health.restoring = len(self._pending_assign)
        self._metrics.partitions.set(len(self._source.assignment()))
        self._reached("restored")

    def _reached(self, milestone: str) -> None:
        if milestone in self._milestones_left:
            self._milestones_left.discard(milestone)
            assert self._milestone is not None
            self._milestone(milestone)

    def _on_revoke(self, partitions: list[TP]) -> None:
        self._pending_assign = [tp for tp in self._pending_assign if tp not in partitions]
        self.health.restoring = len(self._pending_assign)
        leaving = {tp: self._uncommitted.pop(tp) for tp in partitions if tp in self._uncommitted}
        if leaving and not self._source.commit(leaving):  # so the next owner does not re-read
            self._metrics.commit_failures.inc()
        self._handler.on_revoke(partitions)
        for tp in partitions:
            self._logs.revoked(tp)
            try:  # a partition that moved away must not keep adding its last lag
                self._metrics.lag.remove(tp[0], str(tp[1]))
            except KeyError:
                pass

    # -- the loop ------------------------------------------------------------------------------
    def prime(self, timeout_s: float) -> int:
        """Read the global tables to their end before serving, so the first batch already knows
        the whole catalog and the newest model. Returns the number of table records applied."""
        if self._table is None:
            self.health.primed = True
            return 0
        now_ms = int(self._clock() * 1000)
        records = self._table.catch_up(timeout_s)
        self._produce(self._apply_table(self._decode_table(records, now_ms), now_ms))
        self.health.primed = True
        self.health.polled()
        return len(records)

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.run_once()
        finally:
            self.close()

    def run_once(self) -> int:
        """One micro-batch. Returns the number of input records consumed."""
        started = time.perf_counter()  # measures the batch for a histogram; decides nothing
        now_ms = int(self._clock() * 1000)
        self._summarize_dead_letters(now_ms / 1000)
        # 1. Global tables first, so this batch already sees the newest catalog and model; then
        #    the handler's work that needs no input (finished fine-tunes, paced re-scoring).
        outputs = self._poll_tables(now_ms) + self._handler.tick(now_ms)
        # 2. Poll the partitions this instance owns (restoring those assigned during the poll).
        records = self._poll()
        self._check_lag()
        if not records:
            self._produce(outputs)
            self._commit(force=False)
            return 0
        self._metrics.batch_size.observe(len(records))
        if self._guard is not None:
            self._guard.begin(_offset_ranges(records))
        # 3. Validate: every record becomes either a Decoded or a dead letter.
        with self._metrics.time_stage("validate"):
            good, dead = self._decode(records, now_ms)
        # 4. Apply; a record whose handling raises is dead-lettered, the rest go on.
        outputs += dead + self._apply(good, now_ms)
        self._fault("after_state_update")
        # 5. Produce everything and wait for the broker's acknowledgement.
        self._produce(outputs)
        self._reached("first_batch")
        self._fault("after_produce")
        # 6. Persist state with the offsets that produced it.
        self._persist(_next_offsets(records))
        # 7. Commit the persisted offsets (at most once per commit_interval_s).
        self._commit(force=False)
        self._metrics.batch_seconds.observe(time.perf_counter() - started)
        return len(records)

    def _poll_tables(self, now_ms: int) -> list[Output]:
        if self._table is None:
            return []
        records = self._table.poll(0, self._max_records)
        return self._apply_table(self._decode_table(records, now_ms), now_ms) if records else []

    def _poll(self) -> list[Record]:
        """One poll, one record at a time where a record may have killed the previous process;
        partitions assigned during it are restored and read in the same batch."""
        max_records = self._batch_limit()
        with self._metrics.time_stage("poll"):
            records = self._source.poll(self._poll_timeout_ms, max_records)
            self._take_rewound()
            if self._pending_assign:
                self._restore_assigned()
                max_records = self._batch_limit()
                if len(records) < max_records:
                    records += self._source.poll(0, max_records - len(records))
        self.health.polled()
        return records

    def _persist(self, offsets: dict[TP, int]) -> None:
        """handler.checkpoint; only the partitions it persisted are committed later."""
        with self._metrics.time_stage("persist"):
            stored = self._handler.checkpoint(offsets)
        persisted = {tp: o for tp, o in offsets.items() if tp in stored}
        self._fault("before_commit")
        self._uncommitted.update(persisted)
        self._logs.persisted(persisted)
        if self._guard is not None:
            self._guard.end(persisted)

    def _batch_limit(self) -> int:
        """One record per batch while a partition that may hold a deadly record is assigned."""
        guard = self._guard
        if (
            guard is not None
            and guard.state.singles_until
            and guard.state.singles(self._source.assignment())
        ):
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
                log.error(
                    "%s[%d]@%d could not be processed (%s: %s); dead-lettering it",
                    record.topic,
                    record.partition,
                    record.offset,
                    type(exc).__name__,
                    exc,
                    exc_info=exc,
                )
                return [self._reject(Rejected(record, processing_error(exc)), now_ms)]
            log.warning(
                "a micro-batch of %d records failed (%s: %s); retrying it record by "
                "record to find the culprit",
                len(batch),
                type(exc).__name__,
                exc,
            )
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
            log.error(
                "table record %s[%d]@%d could not be applied (%s: %s); skipping it",
                record.topic,
                record.partition,
                record.offset,
                type(exc).__name__,
                exc,
            )
            self._metrics.skipped_table_records.labels(
                topic=record.topic, reason="processing_error"
            ).inc()
            return []

    def _commit(self, *, force: bool) -> None:
        """Commit the persisted offsets once `commit_interval_s` has passed (or now, if forced)."""
        now = self._clock()
        elapsed = now - self._last_commit  # negative: the clock stepped back; commit now
        if not self._uncommitted or (not force and 0 <= elapsed < self._commit_interval_s):
            return
        owned = self._source.assignment()  # never a partition a rebalance gave to someone else
        with self._metrics.time_stage("commit"):
            try:
                accepted = self._source.commit(
                    {tp: o for tp, o in self._uncommitted.items() if tp in owned}
                )
            except StreamrecError:
                self._metrics.commit_failures.inc()
                raise
        if not accepted:
            self._metrics.commit_failures.inc()
        # Refused (rebalanced away): keep the offsets of partitions still ours for the next try.
        self._uncommitted = (
            {} if accepted else {tp: o for tp, o in self._uncommitted.items() if tp in owned}
        )
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
        acknowledged_ms = self._clock() * 1000
        for out in outputs:
            if out.trigger_produced_ms:
                self._metrics.end_to_end_seconds.observe(
                    max(0.0, (acknowledged_ms - out.trigger_produced_ms) / 1000)
                )

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
                why = self._logs.first_fetched(tp, record.offset)
                if why is not None:
                    self._handle_reset(tp, why)
            try:
                if (
                    self._guard is not None
                    and self._guard.state.quarantine
                    and self._guard.state.quarantined(tp, record.offset)
                ):
                    self._metrics.quarantined.labels(topic=record.topic).inc()
                    raise InvalidMessage(
                        "quarantined",
                        "the worker died twice while this record was being "
                        "applied; dead-lettered instead of applied a third time",
                    )
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
        self._summarize_dead_letters(now_ms / 1000)
        if self._dead_letter_log.admit(exc.reason, now_ms / 1000):
            log.warning(
                "dead letter %s[%d]@%d: %s",
                record.topic,
                record.partition,
                record.offset,
                exc,
                extra={
                    "topic": record.topic,
                    "partition": record.partition,
                    "offset": record.offset,
                    "reason": exc.reason,
                },
            )
        letter = self._codec.dead_letter(record, exc, now_ms)
        key = record.key[:DLQ_KEY_BYTES] if record.key is not None else None
        return Output(self._dlq_topic, key, encode(letter))

    def _summarize_dead_letters(self, now_s: float) -> None:
        """One line for the dead letters the last window did not log (pipeline/ratelimit.py)."""
        suppressed = self._dead_letter_log.due(now_s)
        if suppressed:
            limiter = self._dead_letter_log
            by_reason = ", ".join(f"{reason} {n}" for reason, n in sorted(suppressed.items()))
            log.warning(
                "%d more dead letters in the last %g s not logged one by one (at most %d "
                "lines per %g s): %s",
                sum(suppressed.values()),
                limiter.interval_s,
                limiter.max_lines,
                limiter.interval_s,
                by_reason,
                extra={"suppressed_dead_letters": suppressed},
            )

    def _decode_one(self, record: Record, now_ms: int) -> Decoded:
        """codec.decode, whose only exception is InvalidMessage, with that promise enforced."""
        try:
            return self._codec.decode(record, self._handler.kind_of(record.topic), now_ms)
        except InvalidMessage:
            raise
        except INFRASTRUCTURE_ERRORS:
            raise
        except Exception as exc:
            log.error(
                "decoding %s[%d]@%d raised %s: %s",
                record.topic,
                record.partition,
                record.offset,
                type(exc).__name__,
                exc,
            )
            raise processing_error(exc) from exc

    def _decode_table(self, records: list[Record], now_ms: int) -> list[Decoded]:
        good = []
        for record in records:
            try:
                good.append(self._decode_one(record, now_ms))
            except InvalidMessage as exc:
                self._metrics.skipped_table_records.labels(
                    topic=record.topic, reason=exc.reason
                ).inc()
        return good

    def _take_rewound(self) -> None:
        """Partitions a rebalance may hand us later resume at 0 too (their stored offset, maybe
        written by another member, belongs to the lost log); owned ones count as a reset now."""
        rewound = self._source.take_rewound()
        if not rewound:
            return
        owned = self._source.assignment()
        for tp in rewound:
            why = self._logs.rewound(tp, owned=tp in owned)
            if why is not None:
                self._handle_reset(tp, why)

    def _handle_reset(self, tp: TP, why: str) -> None:
        """The I/O of a replaced log the tracker reported: nothing of the lost log survives."""
        log.warning(
            "input log of %s[%d] restarted (%s): the broker lost its data; carrying on "
            "from the new log",
            tp[0],
            tp[1],
            why,
        )
        self._metrics.broker_resets.inc()
        self._uncommitted.pop(tp, None)  # an offset into the lost log must not land on the new one
        if self._guard is not None:
            self._guard.forget(tp)
        self._handler.on_reset(tp)
        self._handler.adopt_log_ids({tp: self._source.log_id(tp)})

    def _check_lag(self) -> None:
        """Once a second: export lag, and catch resets that leave an idle partition behind."""
        now = self._clock()
        if 0 <= now - self._last_lag_check < 1.0:  # a clock stepped back checks at once
            return
        self._last_lag_check = now
        wait_ms = self._source.fetch_wait_ms
        if wait_ms is not None:
            self._metrics.fetch_wait_seconds.set(wait_ms / 1000)
        for tp in self._source.assignment():
            highwater = self._source.highwater(tp)
            position = self._source.position(tp)
            if highwater is None or position is None:
                continue
            self._metrics.lag.labels(topic=tp[0], partition=str(tp[1])).set(
                max(0, highwater - position)
            )
            why = self._logs.watermark(tp, highwater, position)
            if why is not None:
                self._handle_reset(tp, why)

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


def _next_offsets(records: list[Record]) -> dict[TP, int]:
    """The next offset to read of each partition in a micro-batch (offset order per partition)."""
    return {(record.topic, record.partition): record.offset + 1 for record in records}


def _offset_ranges(records: list[Record]) -> dict[TP, tuple[int, int]]:
    """First and last offset of each partition in a micro-batch (offset order per partition)."""
    ranges: dict[TP, tuple[int, int]] = {}
    for record in records:
        tp = (record.topic, record.partition)
        first = ranges[tp][0] if tp in ranges else record.offset
        ranges[tp] = (first, record.offset)
    return ranges
