"""`FetchWait`: raises a consumer's fetch wait when the broker stops answering fetches in time.

Tansu 0.6.0's memory storage lists every stored record batch of a partition inside each fetch
and gives up when the fetch's max wait has passed: once that listing takes longer than
`fetch_max_wait_ms`, a consumer near the end of the partition gets empty fetches (with the
right highwater) forever. Measured on a bare broker, one-record batches: with a 10 ms wait the
fetch starves at ~20,000 batches; at 60,000 batches 10 ms starves while 50 ms answers in
0.12 s and 100 ms in 0.05 s. A longer wait costs latency while logs are short (bench p50 at
1,000 events/s: 143-169 ms at 10 ms, 179 ms at 100, 416 ms at 500), so the configured wait
stays until a partition is seen starving: records waiting (highwater above the position) and
the position not moving for `patience_s`. Then the wait doubles, up to `ceiling_ms`. It does
not come back down while the logs only grow; after a broker reset (logs lost) or with a new
consumer it starts over. A broker that is paused while a consumer lags looks the same and
raises the wait too (until such a reset or a restart).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable

from pipeline.kafka.client import KafkaConsumer, kafka_errors

__all__ = ["FetchWait"]

log = logging.getLogger(__name__)


class FetchWait:
    """The fetch wait one consumer asks for, and when to raise it (pure; see `apply`).

    A partition is starving while its position stays below its highwater without moving: for
    `patience_s` and over at least `min_polls` polls (one long gap between two polls, the
    process descheduled on a busy machine, is not evidence). Each partition is watched on its
    own, so a busy partition does not hide a starving one next to it; but a poll that came back
    full is no evidence (a backlog: the client hands out one partition's buffered records
    while the others wait their turn, measured to raise the wait four times in a bench's
    saturation run)."""

    def __init__(
        self,
        floor_ms: int,
        ceiling_ms: int,
        *,
        patience_s: float = 1.0,
        min_polls: int = 3,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.floor_ms = floor_ms
        self.ceiling_ms = max(floor_ms, ceiling_ms)
        self.wait_ms = floor_ms
        self._patience_s = patience_s
        self._min_polls = min_polls
        self._clock = clock
        self._stuck: dict[Hashable, tuple[int, float, int]] = {}  # part -> (position, since, polls)

    def observe(self, progress: dict[Hashable, tuple[int, int]], full: bool = False) -> int | None:
        """After a poll: (position, highwater) of each unpaused partition where both are known,
        and whether the poll returned as many records as it could. Returns the new wait when
        it should go up, else None."""
        if full:
            self._stuck = {}
            return None
        now = self._clock()
        stuck: dict[Hashable, tuple[int, float, int]] = {}
        starving = False
        for part, (position, high) in progress.items():
            if position >= high:
                continue
            before = self._stuck.get(part)
            if before is None or before[0] != position:
                stuck[part] = (position, now, 1)
                continue
            _, since, polls = before
            stuck[part] = (position, since, polls + 1)
            starving |= polls + 1 >= self._min_polls and now - since >= self._patience_s
        self._stuck = stuck
        if not starving or self.wait_ms >= self.ceiling_ms:
            return None
        self._stuck = {}  # the new wait gets its own patience
        self.wait_ms = min(self.ceiling_ms, max(1, self.wait_ms) * 2)
        return self.wait_ms

    def reset(self, consumer: KafkaConsumer | None = None) -> None:
        """Back to the configured wait (also for `consumer`): a new consumer, or the broker
        lost its logs."""
        self.wait_ms, self._stuck = self.floor_ms, {}
        if consumer is not None:
            _set_wait(consumer, self.wait_ms)

    def apply(self, consumer: KafkaConsumer, owner: str, full: bool) -> None:
        """Observe `consumer` after a poll (`full`: it returned max_records) and raise its wait
        where needed. Uses kafka-python's fetcher config, read for every fetch request."""
        if full:
            self.observe({}, full=True)
            return
        paused = consumer.paused()
        progress: dict[Hashable, tuple[int, int]] = {}
        for part in consumer.assignment():
            high = consumer.highwater(part)
            if part in paused or high is None:
                continue
            try:
                position = consumer.position(part, timeout_ms=0)  # known: no request is sent
            except kafka_errors.KafkaError:
                continue  # the next poll raises it where the caller handles it
            if position is not None:
                progress[part] = (position, high)
        raised = self.observe(progress)
        if raised is not None:
            _set_wait(consumer, raised)
            log.warning(
                "%s: fetches return nothing although records wait (the broker's "
                "listing of a long log outlasts the fetch wait); fetch_max_wait_ms "
                "raised to %d",
                owner,
                raised,
            )


def _set_wait(consumer: KafkaConsumer, wait_ms: int) -> None:
    consumer._fetcher.config["fetch_max_wait_ms"] = wait_ms  # read for every fetch request
