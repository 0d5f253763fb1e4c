"""`FetchWait`: raises a consumer's fetch wait when the broker stops answering fetches in time.

Tansu 0.6.0's memory storage lists every stored record batch of a partition inside each fetch
and gives up when the fetch's max wait has passed: once that listing takes longer than
`fetch_max_wait_ms`, a consumer near the end of the partition gets empty fetches (with the
right highwater) forever. Measured on a bare broker, one-record batches: with a 10 ms wait the
fetch starves at ~20,000 batches; at 60,000 batches 10 ms starves while 50 ms answers in
0.12 s and 100 ms in 0.05 s. A longer wait costs latency while logs are short (bench p50 at
1,000 events/s: 143-169 ms at 10 ms, 179 ms at 100, 416 ms at 500), so the configured wait
stays until starvation is seen: records waiting (highwater above the position) and none
delivered for `patience_s`. Then the wait doubles, up to `ceiling_ms`. It never comes back
down, since the logs only grow; a consumer rebuilt after a broker reset starts over.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from pipeline.kafka.client import KafkaConsumer

__all__ = ["FetchWait"]

log = logging.getLogger(__name__)


class FetchWait:
    """The fetch wait one consumer asks for, and when to raise it (pure; see `apply`)."""

    def __init__(self, floor_ms: int, ceiling_ms: int, *, patience_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.floor_ms = floor_ms
        self.ceiling_ms = max(floor_ms, ceiling_ms)
        self.wait_ms = floor_ms
        self._patience_s = patience_s
        self._clock = clock
        self._starved_since: float | None = None

    def observe(self, delivered: bool, waiting: bool) -> int | None:
        """After a poll: did it deliver records, and do records wait beyond the position of
        an unpaused partition? Returns the new wait when it should change, else None."""
        if delivered or not waiting:
            self._starved_since = None
            return None
        now = self._clock()
        if self._starved_since is None:
            self._starved_since = now
            return None
        if now - self._starved_since < self._patience_s or self.wait_ms >= self.ceiling_ms:
            return None
        self._starved_since = now  # give the new wait its own patience
        self.wait_ms = min(self.ceiling_ms, max(1, self.wait_ms) * 2)
        return self.wait_ms

    def reset(self) -> None:
        self.wait_ms, self._starved_since = self.floor_ms, None

    def apply(self, consumer: KafkaConsumer, delivered: bool, owner: str) -> None:
        """Observe `consumer` after a poll and raise its wait where needed. Uses kafka-python's
        fetcher config, which it reads for every fetch request it builds."""
        if delivered:
            self._starved_since = None
            return
        paused = consumer.paused()
        waiting = False
        for part in consumer.assignment():
            if part in paused:
                continue
            high = consumer.highwater(part)
            position = consumer.position(part, timeout_ms=0) if high else None
            if high is not None and position is not None and position < high:
                waiting = True
                break
        raised = self.observe(False, waiting)
        if raised is not None:
            consumer._fetcher.config["fetch_max_wait_ms"] = raised
            log.warning("%s: fetches return nothing although records wait (the broker's "
                        "listing of a long log outlasts the fetch wait); fetch_max_wait_ms "
                        "raised to %d", owner, raised)
