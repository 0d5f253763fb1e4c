"""`RouteCheck`: counts and logs keyed records that arrived on a partition other than the one
murmur2 gives their key (a producer that does not use the contract's partitioner)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pipeline.partitioning import KeyRouting

__all__ = ["RouteCheck", "MisroutedCallback", "LOG_EVERY_S"]

log = logging.getLogger(__name__)

MisroutedCallback = Callable[[str, int], None]  # (topic, records misrouted in one poll)
LOG_EVERY_S = 60.0


class RouteCheck:
    """Checks every keyed record of `topics` against murmur2(key) % partition count.

    The partition count comes from the consumer's metadata cache (read once per topic and
    poll, so a topic that a broker reset brought back with another count is judged by the new
    one). A misrouted record is still delivered and applied where it arrived: this only
    reports it, through `on_misrouted(topic, count)` (the worker's metric) and a warning
    logged at most once per `log_every_s` with the count since the previous line. Records
    without a key carry no partition promise and are not checked.
    """

    def __init__(
        self,
        topics: Iterable[str],
        on_misrouted: MisroutedCallback | None = None,
        *,
        log_every_s: float = LOG_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._topics = frozenset(topics)
        self._on_misrouted = on_misrouted
        self._routing = KeyRouting()
        self._log_every_s = log_every_s
        self._clock = clock
        self._next_log = float("-inf")
        self._unlogged: dict[str, int] = {}
        self._example: tuple[str, int, int, int] | None = None  # topic, partition, offset, want
        self.total = 0

    def check(self, cluster: Any, batches: Mapping[Any, list[Any]]) -> int:
        """Check one poll's `batches` ({TopicPartition: [ConsumerRecord]}); `cluster` answers
        `partitions_for_topic(topic)` from its cache. Returns the records misrouted."""
        found: dict[str, int] = {}
        counts: dict[str, int] = {}
        for part, messages in batches.items():
            topic = part.topic
            if topic not in self._topics or not messages:
                continue
            count = counts.get(topic)
            if count is None:
                count = counts[topic] = len(cluster.partitions_for_topic(topic) or ())
            if count <= 1:
                continue
            partition, route = part.partition, self._routing.partition_for
            for message in messages:
                key = message.key
                if key is not None and (want := route(key, count)) != partition:
                    found[topic] = found.get(topic, 0) + 1
                    if self._example is None:
                        self._example = (topic, partition, message.offset, want)
        for topic, n in found.items():
            self.total += n
            self._unlogged[topic] = self._unlogged.get(topic, 0) + n
            if self._on_misrouted is not None:
                self._on_misrouted(topic, n)
        if self._unlogged and self._clock() >= self._next_log:
            self._log()
        return sum(found.values())

    def _log(self) -> None:
        self._next_log = self._clock() + self._log_every_s
        unlogged, self._unlogged = self._unlogged, {}
        example, self._example = self._example, None
        where = ""
        if example is not None:
            where = (
                f"; e.g. {example[0]} partition {example[1]} offset {example[2]}, whose key "
                f"belongs on partition {example[3]}"
            )
        log.warning(
            "%s record(s) arrived on a partition other than murmur2(key) gives them (%s)%s. "
            "Their producer does not partition by murmur2 (librdkafka: set "
            "partitioner=murmur2_random): each such user's history is kept on the partition "
            "its events arrive on, so a user split over partitions builds separate histories. "
            "At most one such line per %.0f s.",
            sum(unlogged.values()),
            ", ".join(f"{t}: {n}" for t, n in sorted(unlogged.items())),
            where,
            self._log_every_s,
        )
