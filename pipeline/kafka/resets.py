"""Noticing that the broker lost its data (steps 5 of the package docstring): a log that restarted
below our position, or a topic that came back under a new id."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pipeline.kafka.client import END_CHECK_S, TP, KafkaConsumer, TopicPartition

__all__ = ["TopicIds", "EndGuard"]

log = logging.getLogger(__name__)


class TopicIds:
    """Remembers each topic's id (KIP-516) to notice a topic deleted and created again."""

    def __init__(self) -> None:
        self._seen: dict[str, Any] = {}

    def check(self, consumer: KafkaConsumer, topics: Iterable[str]) -> tuple[set[str], set[str]]:
        """(missing, recreated since the last check) among `topics`, from cached metadata."""
        cluster = consumer._cluster  # kafka-python exposes topic ids only on its metadata cache
        known = cluster.topics(exclude_internal_topics=True)
        missing, recreated = set(), set()
        for topic in topics:
            if topic not in known:
                missing.add(topic)
                continue
            topic_id = cluster.topic_id(topic)
            if topic_id is None:
                continue
            previous = self._seen.get(topic)
            if previous is not None and previous != topic_id:
                recreated.add(topic)
            self._seen[topic] = topic_id
        return missing, recreated


class EndGuard:
    """Rewinds partitions whose log is no longer the one their position points into (a broker
    reset on Tansu), in two ways:

    - the topic was recreated (its id changed): checked after every poll against the client's
      metadata, and the records that poll fetched from those topics are dropped (read again
      from the new log's beginning), so no new record is skipped however long the new log grew
      before we reconnected. Records fetched before the metadata showed the new id are passed
      on; the rewind then reads the ones below them too (late, not lost) and again themselves
      (duplicates, which the updater's dedup drops). Every partition of such a
      topic is reported, owned or not: a rebalance may hand one over later;
    - the position is beyond the log end (checked once a second): real Kafka answers such a
      fetch with OFFSET_OUT_OF_RANGE and kafka-python applies `auto_offset_reset`; Tansu 0.6.0
      answers with no records and a lower highwater. This catches a reset this process did not
      see the old topic id of (it started after the loss).
    """

    def __init__(
        self, topics: Iterable[str], *, on_replaced: Callable[[KafkaConsumer], None] | None = None
    ) -> None:
        self._topics = tuple(topics)
        self._ids = TopicIds()
        self._next_check = 0.0
        self._rewound: list[TP] = []
        self._on_replaced = on_replaced  # called with the consumer after a rewind

    def check(
        self, consumer: KafkaConsumer, name: str, batches: Mapping[TopicPartition, list[Any]]
    ) -> Mapping[TopicPartition, list[Any]]:
        """`batches` less what was fetched from a recreated topic."""
        _, recreated = self._ids.check(consumer, self._topics)
        if recreated:
            parts = [p for p in consumer.assignment() if p.topic in recreated]
            log.warning(
                "%s: topic(s) %s were recreated (new topic id; broker reset?); reading "
                "%d partition(s) again from the beginning",
                name,
                sorted(recreated),
                len(parts),
            )
            self._rewind(consumer, parts)
            if not parts and self._on_replaced is not None:  # none of them ours: still a reset
                self._on_replaced(consumer)
            owned = set(parts)
            self._rewound.extend(
                (t, p)
                for t in sorted(recreated)
                for p in sorted(consumer.partitions_for_topic(t) or ())
                if TopicPartition(t, p) not in owned
            )
            batches = {tp: m for tp, m in batches.items() if tp.topic not in recreated}
        now = time.monotonic()
        if now < self._next_check:
            return batches
        self._next_check = now + END_CHECK_S
        stale = []
        for part in consumer.assignment():
            high = consumer.highwater(part)
            pos = consumer.position(part, timeout_ms=0) if high is not None else None
            if high is not None and pos is not None and pos > high:
                log.warning(
                    "%s: %s[%d] position %d is beyond the log end %d (broker reset?); "
                    "reading it again from the beginning",
                    name,
                    part.topic,
                    part.partition,
                    pos,
                    high,
                )
                stale.append(part)
        self._rewind(consumer, stale)
        return batches

    def _rewind(self, consumer: KafkaConsumer, parts: list[TopicPartition]) -> None:
        if parts:
            consumer.seek_to_beginning(*parts)
            self._rewound.extend((part.topic, part.partition) for part in parts)
            if self._on_replaced is not None:
                self._on_replaced(consumer)

    def take(self) -> list[TP]:
        rewound, self._rewound = self._rewound, []
        return rewound
