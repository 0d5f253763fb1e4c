"""How many log lines a stream of like events (dead letters) may write: at most `max_lines` per
interval, the rest counted by reason and reported in one summary when the interval is over.

Pure: the caller passes the clock's reading in; nothing here logs or sleeps. The consumer loop
(pipeline/loop.py) is the shell that writes the lines.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

__all__ = ["LogLimiter"]


@dataclass
class LogLimiter:
    """Fixed windows of `interval_s` seconds, each opened by the first event after the last one
    closed. Within a window the first `max_lines` events may be logged (`admit` says True);
    later ones are counted by reason. `due(now_s)` closes a window that has run its length and
    returns what it suppressed (None when nothing was), so each window yields one summary at
    most. Invariant: admitted + suppressed = offered, admitted <= max_lines, per window.
    """

    max_lines: int
    interval_s: float
    window_start_s: float | None = None
    lines: int = 0
    suppressed: collections.Counter[str] = field(default_factory=collections.Counter)

    def __post_init__(self) -> None:
        if self.max_lines < 0 or self.interval_s <= 0:
            raise ValueError(
                f"max_lines {self.max_lines} must be >= 0 and interval_s {self.interval_s} > 0"
            )

    def admit(self, reason: str, now_s: float) -> bool:
        """Whether the event with `reason`, happening at `now_s`, may be logged. Call `due`
        first, so an event after the end of a window opens a new one."""
        if self.window_start_s is None:
            self.window_start_s = now_s
        if self.lines < self.max_lines:
            self.lines += 1
            return True
        self.suppressed[reason] += 1
        return False

    def due(self, now_s: float) -> dict[str, int] | None:
        """Close the window if `interval_s` has passed since it opened: the counts by reason of
        what it suppressed, or None when nothing was suppressed (or the window is still open)."""
        if self.window_start_s is None or now_s - self.window_start_s < self.interval_s:
            return None
        counts = dict(self.suppressed) or None
        self.window_start_s, self.lines = None, 0
        self.suppressed.clear()
        return counts
