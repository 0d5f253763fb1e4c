"""`TableReader`: every partition of the global tables (items, model updates) from the
beginning, without a group, so every worker instance sees all of them."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

from pipeline.config import KafkaConfig
from pipeline.errors import BrokerError
from pipeline.kafka.client import (
    END_CHECK_S,
    REVOKE_COMMIT_TIMEOUT_MS,
    TP,
    ClosingClient,
    KafkaConsumer,
    TopicPartition,
    flatten,
    kafka_errors,
    wrap_error,
)
from pipeline.kafka.fetchwait import FetchWait
from pipeline.kafka.resets import EndGuard, TopicIds
from pipeline.kafka.settings import consumer_settings
from pipeline.messages import Record

__all__ = ["TableReader"]

log = logging.getLogger(__name__)

_TABLE_REFRESH_S = 5.0


class TableReader(ClosingClient):
    """Every partition of `topics` from the beginning, no group, no commits (a global table).

    Every worker instance reads the whole catalog and every model update. Partitions (and
    topics) that appear later are picked up within `refresh_s` and read from their beginning.
    `from_end=True` (for tailing) starts the partitions known at the first call at their end
    instead; on Tansu 0.6.0 that end may fall inside the last multi-record batch, so a few
    old records can show up. Created lazily on first use.
    """

    def __init__(
        self,
        cfg: KafkaConfig,
        bootstrap: str,
        topics: Iterable[str],
        *,
        client_id: str | None = None,
        refresh_s: float = _TABLE_REFRESH_S,
        from_end: bool = False,
    ) -> None:
        self._from_end = from_end
        self._first_assignment = True
        self._to_skip: set[TopicPartition] = set()
        self._cfg = cfg
        self._bootstrap = bootstrap
        self._topics = tuple(topics)
        self._client_id = client_id
        self._refresh_s = refresh_s
        self._consumer: KafkaConsumer | None = None
        self._next_refresh = 0.0
        self._topic_ids = TopicIds()
        self._fetch_wait = FetchWait(cfg.fetch_max_wait_ms, cfg.fetch_wait_ceiling_ms)
        # After a replaced log (broker reset) the long logs are gone: back to the set wait.
        self._end_guard = EndGuard(self._topics, on_replaced=self._fetch_wait.reset)

    def _client(self) -> KafkaConsumer:
        if self._consumer is None:
            try:
                self._consumer = KafkaConsumer(
                    **consumer_settings(self._cfg, self._bootstrap, self._client_id), group_id=None
                )
            except kafka_errors.KafkaError as exc:
                raise wrap_error(f"connecting a table reader to {self._bootstrap}", exc) from exc
            self._next_refresh = 0.0
            self._fetch_wait.reset()  # a new consumer asks for the configured wait again
        if time.monotonic() >= self._next_refresh:
            self._refresh_assignment(self._consumer)
        return self._consumer

    def _refresh_assignment(self, consumer: KafkaConsumer) -> None:
        self._next_refresh = time.monotonic() + self._refresh_s
        try:
            consumer.topics()  # refreshes cluster metadata for every topic
        except kafka_errors.KafkaError as exc:
            if not getattr(exc, "retriable", False):
                raise wrap_error(f"reading metadata from {self._bootstrap}", exc) from exc
            # A stalled or restarting broker: keep reading what is assigned, try again soon.
            log.warning(
                "table reader: metadata from %s not available (%s); retrying", self._bootstrap, exc
            )
            self._next_refresh = time.monotonic() + END_CHECK_S
            return
        wanted = {
            TopicPartition(topic, p)
            for topic in self._topics
            for p in consumer.partitions_for_topic(topic) or ()
        }
        current = consumer.assignment()
        if wanted - current:
            consumer.assign(sorted(wanted | current))  # keeps positions of kept partitions
            added = sorted(wanted - current)
            if self._from_end and self._first_assignment:
                consumer.seek_to_end(*added)  # approximate on Tansu; see _skip_old
                self._to_skip.update(added)
            else:  # partitions that appear later are read in full
                consumer.seek_to_beginning(*added)
        self._first_assignment = False

    def assignment(self) -> set[TP]:
        return {(tp.topic, tp.partition) for tp in self._client().assignment()}

    def poll(self, timeout_ms: int, max_records: int) -> list[Record]:
        """Up to `max_records` records, grouped by partition in (topic, partition) order; none
        for `max_records` <= 0, without asking kafka-python (which raises ValueError for it)."""
        if max_records <= 0:
            return []
        consumer = self._client()
        if not consumer.assignment():
            time.sleep(timeout_ms / 1000)  # nothing to read yet; honour the caller's timeout
            return []
        try:
            batches = consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        except kafka_errors.KafkaError as exc:
            raise wrap_error(f"polling table {list(self._topics)}", exc) from exc
        batches = self._end_guard.check(consumer, "table reader", batches)
        full = sum(len(b) for b in batches.values()) >= max_records
        self._fetch_wait.apply(consumer, f"table reader {list(self._topics)}", full)
        if self._to_skip:
            batches = self._skip_old(consumer, batches)
        return flatten(batches)

    def wait_at_end(self, timeout_s: float) -> bool:
        """from_end: read until every partition's true end is known, so that nothing produced
        after this returns is skipped. What is read meanwhile is dropped: call it before
        producing anything to be read. False when `timeout_s` passed first."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.poll(100, 10_000)
            if self._consumer is not None and self._consumer.assignment() and not self._to_skip:
                return True
        return False

    def _skip_old(
        self, consumer: KafkaConsumer, batches: Mapping[TopicPartition, list[Any]]
    ) -> dict[TopicPartition, list[Any]]:
        """from_end: drop what lies below the first highwater a fetch reports (the true end;
        Tansu's ListOffsets end can fall inside the last batch), then read on from there."""
        kept = dict(batches)
        for part in list(self._to_skip):
            high = consumer.highwater(part)
            if high is None:
                kept.pop(part, None)
                continue
            kept[part] = [m for m in kept.get(part, []) if m.offset >= high]
            if (pos := consumer.position(part, timeout_ms=0)) is not None and pos < high:
                consumer.seek(part, high)
            self._to_skip.discard(part)
        return kept

    def take_rewound(self) -> list[TP]:
        """Partitions re-read from their beginning since the last call (see KafkaSource)."""
        return self._end_guard.take()

    def lag(self) -> dict[TP, int | None]:
        """Records not yet read per partition; None until a fetch reported its highwater."""
        consumer = self._client()
        out: dict[TP, int | None] = {}
        for part in consumer.assignment():
            high = consumer.highwater(part)
            pos = consumer.position(part, timeout_ms=0)
            out[(part.topic, part.partition)] = (
                None if high is None or pos is None else max(0, high - pos)
            )
        return out

    def _behind(self) -> dict[TP, tuple[int | None, int | None]]:
        consumer = self._client()
        out = {}
        for part in consumer.assignment():
            high, pos = consumer.highwater(part), consumer.position(part, timeout_ms=0)
            if high is None or pos is None or pos != high:  # pos > high: rewound on next poll
                out[(part.topic, part.partition)] = (pos, high)
        return out

    def catch_up(self, timeout_s: float, *, max_records: int = 10_000) -> list[Record]:
        """Read until every partition's position reaches its highwater; return what was read.

        Topics that do not exist yet count as empty. Raises BrokerError naming the partitions
        still behind after `timeout_s`.
        """
        deadline = time.monotonic() + timeout_s
        self._next_refresh = 0.0
        records: list[Record] = []
        while True:
            records.extend(self.poll(timeout_ms=50, max_records=max_records))
            behind = self._behind()
            if not behind:
                return records
            if time.monotonic() >= deadline:
                raise BrokerError(
                    f"table {list(self._topics)} not caught up after "
                    f"{timeout_s:.1f}s; (position, highwater) behind: {behind}"
                )

    def check_topics(self) -> tuple[set[str], set[str]]:
        """(missing, recreated) table topics; see KafkaSource.check_topics."""
        return self._topic_ids.check(self._client(), self._topics)

    def recreate(self) -> None:
        """Drop the consumer; the next call builds a fresh one reading from the beginning."""
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            try:
                consumer.close(autocommit=False, timeout_ms=REVOKE_COMMIT_TIMEOUT_MS)
            except Exception as exc:
                log.warning("closing table reader after broker loss: %s", exc)

    def close(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            consumer.close(autocommit=False, timeout_ms=self._cfg.request_timeout_ms)

    def __repr__(self) -> str:
        return f"TableReader(topics={list(self._topics)})"
