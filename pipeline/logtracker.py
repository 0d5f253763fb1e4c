"""Which log each input partition reads, and when the broker replaced it: the loop's bookkeeping.

Pure (no I/O): the loop tells the tracker what it saw (a partition assigned, the first offset
fetched, a log the source rewound, a high watermark) and the tracker answers with the offset to
resume from and, when a partition's log was replaced, why. The loop then does the I/O of a reset
(log, metric, handler.on_reset). Each replaced log is reported once per instance; state persisted
on the new log ends it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["TP", "Resume", "LogTracker"]

TP = tuple[str, int]


@dataclass(frozen=True, slots=True)
class Resume:
    """Where an assigned partition resumes. `offset` is the stored one unless it points into a
    lost log (`lost`), then 0; `reset` says why the replacement must be handled now (None when
    it is not replaced, or this instance handled it already)."""

    offset: int
    lost: bool = False
    reset: str | None = None


@dataclass
class LogTracker:
    # The next offset each owned partition should fetch: a first record below it is a reset.
    expected: dict[TP, int] = field(default_factory=dict)
    # Replaced logs not persisted on since (an offset stored for them points into the lost log)
    # -> whether this instance has handled (and counted) the reset of that partition yet.
    lost: dict[TP, bool] = field(default_factory=dict)

    def assigned(
        self, tp: TP, stored_offset: int, stored_log: str | None, current_log: str | None
    ) -> Resume:
        """A partition handed to this instance with the offset its state was stored at, the log
        that offset belongs to and the log the partition reads now (None: unknown)."""
        if stored_log and current_log:
            if stored_log == current_log:  # persisted on the new log already: the offset is good
                self.lost.pop(tp, None)
            else:  # replaced while no member of ours read it: never resume mid-way in a new log
                self.lost.setdefault(tp, False)
        if tp not in self.lost:
            self.expected[tp] = stored_offset
            return Resume(stored_offset)
        reset = None if self.lost[tp] else self._reset(tp, "assigned after its log was replaced")
        self.expected[tp] = 0
        return Resume(0, lost=True, reset=reset)

    def first_fetched(self, tp: TP, offset: int) -> str | None:
        """The first offset of `tp` in a batch; a reason when it is below the expected one."""
        expected = self.expected.get(tp)
        if expected is not None and offset < expected:
            return self._reset(tp, f"fetched offset {offset} below expected {expected}")
        return None

    def rewound(self, tp: TP, *, owned: bool) -> str | None:
        """The source found the log of `tp` replaced (and rewound it if owned). One that is not
        ours is handled if a rebalance hands it to us before anyone persisted on the new log."""
        if owned:
            return self._reset(tp, "the source found its log replaced and rewound it")
        self.lost.setdefault(tp, False)
        return None

    def watermark(self, tp: TP, highwater: int, position: int) -> str | None:
        """The lag check's view of an owned partition; a reason when its log ends below what
        this instance already consumed (a reset that left an idle partition behind)."""
        expected = self.expected.get(tp)
        if expected is not None and highwater < expected and position <= highwater:
            return self._reset(tp, f"high watermark {highwater} below expected {expected}")
        return None

    def persisted(self, offsets: Mapping[TP, int]) -> None:
        """State was stored with these next offsets: they are expected, and on the current log."""
        for tp, offset in offsets.items():
            self.lost.pop(tp, None)
            self.expected[tp] = offset

    def revoked(self, tp: TP) -> None:
        self.expected.pop(tp, None)

    def _reset(self, tp: TP, why: str) -> str:
        self.lost[tp] = True
        self.expected.pop(tp, None)
        return why
