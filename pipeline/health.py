"""Liveness and readiness of one worker, served as /healthz and /readyz on its metrics port.

The metrics HTTP thread answers while the consumer loop is hung, so a probe of the port alone
says nothing; these answers come from what the loop itself last did:
- live: the loop completed a poll within `metrics.liveness_timeout_s` (a hung broker call, a
  deadlocked handler or a stuck batch stops the polls);
- ready: the group assigned this instance its partitions (possibly none: more instances than
  partitions), their state is restored, and the global tables were read to their end.

The decisions are pure functions; `LoopHealth` is what the loop's thread writes and the HTTP
threads read (single attribute writes, no lock needed).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Verdict", "liveness", "readiness", "LoopHealth"]


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    reason: str


def liveness(now: float, last_poll: float, bound_s: float) -> Verdict:
    """Live while the last completed poll is at most `bound_s` old (monotonic seconds)."""
    age = max(0.0, now - last_poll)
    if age > bound_s:
        return Verdict(False, f"no poll completed for {age:.1f} s (bound {bound_s:g} s)")
    return Verdict(True, f"last poll {age:.1f} s ago")


def readiness(*, assigned: bool, restoring: int, primed: bool) -> Verdict:
    """Ready once tables are primed, an assignment arrived and no partition awaits restore."""
    if not primed:
        return Verdict(False, "reading the global tables (catalog, model updates)")
    if not assigned:
        return Verdict(False, "waiting for the consumer group to assign partitions")
    if restoring:
        return Verdict(False, f"restoring the state of {restoring} assigned partitions")
    return Verdict(True, "assigned, restored and serving")


class LoopHealth:
    """The loop's own record of its progress. Start-up counts as a poll: the bound runs from
    the moment the loop exists, so a worker stuck before its first poll is not live either."""

    def __init__(self, bound_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.bound_s = bound_s
        self._clock = clock
        self.last_poll = clock()
        self.assigned = False
        self.restoring = 0
        self.primed = False

    def polled(self) -> None:
        self.last_poll = self._clock()

    def poll_age(self) -> float:
        return max(0.0, self._clock() - self.last_poll)

    def live(self) -> Verdict:
        return liveness(self._clock(), self.last_poll, self.bound_s)

    def ready(self) -> Verdict:
        return readiness(assigned=self.assigned, restoring=self.restoring, primed=self.primed)
