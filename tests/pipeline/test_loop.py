"""ConsumerLoop commits: only persisted offsets, batched by commit_interval_s, and never lost on
revoke or close."""

from __future__ import annotations

from typing import ClassVar

import pytest

from pipeline.codec import Decoded
from pipeline.loop import TP, ConsumerLoop, Output
from pipeline.memorybus import MemoryBus, MemorySource
from pipeline.metrics import WorkerMetrics
from tests.handlers import NoopHandler, memory_loop

NOW_MS = 1_700_000_000_000


class _CountingHandler(NoopHandler):
    """Applies events by counting them; persists every partition it is asked to."""

    def __init__(self) -> None:
        self.applied = 0
        self.unpersisted: set[TP] = set()  # partitions whose state "failed" to persist
        self.resets: list[TP] = []

    def handle(self, batch: list[Decoded], now_ms: int) -> list[Output]:
        self.applied += len(batch)
        return []

    def checkpoint(self, offsets: dict[TP, int]) -> set[TP]:
        return set(offsets) - self.unpersisted

    def on_reset(self, tp: TP) -> None:
        self.resets.append(tp)


def _event(n: int) -> bytes:
    return (
        f'{{"event_id": "e{n}", "user_id": "u{n % 6}", "item_id": "i1", "type": "click", '
        f'"ts": {NOW_MS}}}'
    ).encode()


def _loop(
    bus: MemoryBus,
    interval_s: float,
    handler: _CountingHandler | None = None,
    now: list[float] | None = None,
) -> tuple[ConsumerLoop, list[MemorySource]]:
    """A loop on `bus` whose clock reads `now[0]` (seconds; fixed unless the test moves it)."""
    now = now if now is not None else [NOW_MS / 1000]
    sources: list[MemorySource] = []

    def factory(**hooks):  # type: ignore[no-untyped-def]
        sources.append(MemorySource(bus, "g", ["events"], **hooks))
        return sources[-1]

    loop = memory_loop(
        bus, handler or _CountingHandler(), factory, lambda: now[0], commit_interval_s=interval_s
    )
    return loop, sources


def _committed(bus: MemoryBus) -> int:
    return sum(offset for (group, _), offset in bus.committed.items() if group == "g")


@pytest.fixture
def bus() -> MemoryBus:
    bus = MemoryBus(partitions=2)
    for n in range(10):
        bus.produce("events", f"u{n % 6}".encode(), _event(n))
    return bus


def test_interval_zero_commits_every_batch(bus: MemoryBus) -> None:
    loop, _ = _loop(bus, 0.0)
    loop.run_once()
    assert _committed(bus) == 10


def test_a_long_interval_holds_commits_until_close(bus: MemoryBus) -> None:
    loop, _ = _loop(bus, 3600.0)
    loop.run_once()  # the first batch commits (no commit yet), starting the interval
    assert _committed(bus) == 10
    for n in range(10, 15):
        bus.produce("events", f"u{n % 6}".encode(), _event(n))
    loop.run_once()
    assert _committed(bus) == 10  # applied and persisted, not yet committed
    loop.close()
    assert _committed(bus) == 15


def test_revoke_commits_what_this_instance_applied(bus: MemoryBus) -> None:
    loop, sources = _loop(bus, 3600.0)
    loop.run_once()
    for n in range(10, 16):
        bus.produce("events", f"u{n % 6}".encode(), _event(n))
    loop.run_once()
    sources[0].revoke_all()
    assert _committed(bus) == 16


def _by_partition(bus: MemoryBus) -> dict[int, int]:
    return {tp[1]: offset for (group, tp), offset in bus.committed.items() if group == "g"}


def test_a_partition_that_was_not_persisted_is_never_committed(bus: MemoryBus) -> None:
    handler = _CountingHandler()
    loop, _ = _loop(bus, 3600.0, handler)
    loop.run_once()
    handler.unpersisted = {("events", 0)}
    before = _by_partition(bus)
    for n in range(10, 20):
        bus.produce("events", f"u{n % 6}".encode(), _event(n))
    loop.run_once()
    loop.close()
    after = _by_partition(bus)
    assert after[0] == before[0] and after[1] > before[1]


def test_offsets_of_a_lost_partition_or_a_lost_log_are_not_committed(bus: MemoryBus) -> None:
    handler = _CountingHandler()
    now = [NOW_MS / 1000]
    loop, sources = _loop(bus, 3600.0, handler, now)
    loop.run_once()
    for n in range(10, 20):
        bus.produce("events", f"u{n % 6}".encode(), _event(n))
    loop.run_once()  # applied and persisted, not yet committed
    committed = _by_partition(bus)
    sources[0]._positions.pop(("events", 1))  # lost without a revoke (another member has it)
    bus.logs[("events", 0)].clear()  # the broker lost partition 0's log
    now[0] += 1.0  # the once-a-second lag check sees partition 0's log end below our offset
    loop.run_once()
    assert handler.resets == [("events", 0)]
    loop.close()
    assert _by_partition(bus) == committed  # neither old offset landed anywhere


class _StoringHandler(_CountingHandler):
    """Keeps the applied event ids and the persisted offsets, as a worker's local store does."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.stored: dict[TP, int] = {}

    def handle(self, batch: list[Decoded], now_ms: int) -> list[Output]:
        self.ids += [d.message.event_id for d in batch]
        return super().handle(batch, now_ms)

    def on_assign(self, partitions: list[TP]) -> dict[TP, int]:
        return {tp: self.stored[tp] for tp in partitions if tp in self.stored}

    def checkpoint(self, offsets: dict[TP, int]) -> set[TP]:
        self.stored.update(offsets)
        return set(offsets)


@pytest.mark.parametrize("rejoin", [False, True])
def test_a_replaced_log_that_outgrew_the_old_offset_is_read_from_its_start(
    bus: MemoryBus, rejoin: bool
) -> None:
    handler = _StoringHandler()
    loop, sources = _loop(bus, 0.0, handler)
    for n in range(20):
        bus.produce("events", f"u{n % 6}".encode(), _event(n))
    while loop.run_once():
        pass
    before = len(handler.ids)
    bus.reset()  # the broker lost everything; the new log grows past the old offsets at once
    for n in range(100, 160):
        bus.produce("events", f"u{n % 6}".encode(), _event(n))
    if rejoin:  # the group forgot us too: on_assign hands back offsets into the lost log
        sources[0].revoke_all()
    while loop.run_once():
        pass
    assert sorted(handler.ids[before:]) == sorted(f"e{n}" for n in range(100, 160))
    assert sorted(handler.resets) == [("events", p) for p in range(bus.partitions)]
    assert handler.stored == {
        ("events", p): len(bus.logs[("events", p)]) for p in range(bus.partitions)
    }


class _Member(MemorySource):
    """A group member that owns only `owned` of the partitions (the rest: another member)."""

    owned: ClassVar[set[TP]] = set()

    def poll(self, timeout_ms: int, max_records: int) -> list:
        if not self._assigned:
            self._assigned = True
            self._positions = {
                tp: self._bus.committed.get((self._group, tp), 0) for tp in sorted(self.owned)
            }
            self._on_assign(sorted(self.owned))
        return super().poll(timeout_ms, max_records)


def _member_loop(bus: MemoryBus, handler: _StoringHandler) -> tuple[ConsumerLoop, list[_Member]]:
    sources: list[_Member] = []

    def factory(**hooks):  # type: ignore[no-untyped-def]
        sources.append(_Member(bus, "g", ["events"], **hooks))
        return sources[-1]

    loop = memory_loop(bus, handler, factory, lambda: NOW_MS / 1000)
    return loop, sources


def _ids_in(bus: MemoryBus, tp: TP) -> set[str]:
    return {r.value.split(b'"event_id": "')[1].split(b'"')[0].decode() for r in bus.logs[tp]}


def test_a_partition_handed_over_after_the_reset_is_read_from_its_start_too(bus: MemoryBus) -> None:
    _Member.owned = {("events", 0)}
    handler = _StoringHandler()  # one store for both members, as on one host
    loop, sources = _member_loop(bus, handler)
    while loop.run_once():
        pass
    handler.stored[("events", 1)] = len(bus.logs[("events", 1)])  # the other member's offset
    bus.reset()
    for n in range(100, 160):
        bus.produce("events", f"u{n % 6}".encode(), _event(n))
    loop.run_once()  # sees the new log while it owns partition 0 only
    _Member.owned = {("events", 1)}
    sources[0].revoke_all()  # the rejoin hands it partition 1 with the lost log's offset
    before = len(handler.ids)
    while loop.run_once():
        pass
    assert _ids_in(bus, ("events", 1)) <= set(handler.ids[before:])
    assert handler.resets == [("events", 0), ("events", 1)]  # each counted by who handled it


def test_a_rejoin_after_persisting_on_the_new_log_resumes_at_the_stored_offset(
    bus: MemoryBus,
) -> None:
    handler = _StoringHandler()
    loop, sources = _loop(bus, 0.0, handler)
    while loop.run_once():
        pass
    bus.reset()
    for n in range(100, 160):
        bus.produce("events", f"u{n % 6}".encode(), _event(n))
    while loop.run_once():
        pass
    applied = len(handler.ids)
    sources[0].revoke_all()  # persisted on the new log since: nothing is read twice
    while loop.run_once():
        pass
    assert len(handler.ids) == applied


# -- rebalance and commit-failure counters ---------------------------------------------------------


class _RefusingSource(MemorySource):
    """A member the group rebalanced away: every commit is refused."""

    def commit(self, offsets: dict[TP, int]) -> bool:
        return False


def _counter(loop: ConsumerLoop, name: str) -> float | None:
    return loop._metrics.registry.get_sample_value(name, {"worker": "updater"})


def test_each_assignment_counts_as_a_rebalance(bus: MemoryBus) -> None:
    loop, sources = _loop(bus, 0.0)
    loop.run_once()
    assert _counter(loop, "streamrec_rebalances_total") == 1
    sources[0].revoke_all()
    loop.run_once()  # the source is assigned again on its next poll
    assert _counter(loop, "streamrec_rebalances_total") == 2
    assert _counter(loop, "streamrec_commit_failures_total") == 0


def test_a_refused_commit_counts_as_a_commit_failure(bus: MemoryBus) -> None:
    loop = memory_loop(
        bus,
        _CountingHandler(),
        lambda **hooks: _RefusingSource(bus, "g", ["events"], **hooks),
        lambda: NOW_MS / 1000,
    )
    loop.run_once()
    assert _committed(bus) == 0
    assert _counter(loop, "streamrec_commit_failures_total") == 1


def test_dead_letter_lines_are_rate_limited_and_summarised_by_reason(caplog) -> None:
    """30 bad records with 3 lines allowed per minute: 3 lines, then one summary with the other
    27 by reason once the minute is over; every record still reaches the DLQ."""
    from pipeline.ratelimit import LogLimiter

    bus = MemoryBus(partitions=1)
    for _ in range(20):
        bus.produce("events", b"u", b"not json")
    for _ in range(10):
        bus.produce("events", b"u", b'{"event_id": "e"}')
    now = [NOW_MS / 1000]
    loop = memory_loop(
        bus,
        _CountingHandler(),
        lambda **h: MemorySource(bus, "g", ["events"], **h),
        lambda: now[0],
        dead_letter_log=LogLimiter(3, 60.0),
    )
    with caplog.at_level("WARNING", logger="pipeline.loop"):
        loop.run_once()
        now[0] += 59.0
        loop.run_once()  # still inside the minute: no summary yet
        lines = [r for r in caplog.records if r.name == "pipeline.loop"]
        assert [r.getMessage().split(":")[0] for r in lines] == [
            "dead letter events[0]@0",
            "dead letter events[0]@1",
            "dead letter events[0]@2",
        ]
        assert lines[0].reason == "not_json" and lines[0].offset == 0
        now[0] += 1.0
        loop.run_once()
    summaries = [r for r in caplog.records if "not logged one by one" in r.getMessage()]
    assert len(summaries) == 1
    assert summaries[0].suppressed_dead_letters == {"not_json": 17, "missing_field": 10}
    assert "27 more dead letters" in summaries[0].getMessage()
    assert len(bus.values("dlq")) == 30


class _AnsweringHandler(_CountingHandler):
    """Answers each batch with one output per event, produced `work_s` after the batch began,
    the first carrying the produce time of the event it answers."""

    def __init__(self, now: list[float], work_s: float) -> None:
        super().__init__()
        self._now, self._work_s = now, work_s

    def handle(self, batch: list[Decoded], now_ms: int) -> list[Output]:
        self._now[0] += self._work_s  # the handler's own time, after the poll
        return [
            Output("recs", None, b"{}", trigger_produced_ms=now_ms - 40 if i == 0 else None)
            for i, _ in enumerate(batch)
        ]


def test_end_to_end_latency_runs_to_the_acknowledged_answer(bus: MemoryBus) -> None:
    """From the event's produce time to the moment the broker acknowledged the answer, on the
    loop's clock: the handler's work counts; outputs that answer no event are not observed."""
    now = [NOW_MS / 1000]
    metrics = WorkerMetrics("updater")
    sources: list[MemorySource] = []

    def factory(**hooks):  # type: ignore[no-untyped-def]
        sources.append(MemorySource(bus, "g", ["events"], **hooks))
        return sources[-1]

    loop = memory_loop(bus, _AnsweringHandler(now, work_s=0.05), factory, lambda: now[0], metrics)
    assert loop.run_once() == 10
    labels = {"worker": "updater"}
    name = "streamrec_end_to_end_latency_seconds"
    assert metrics.registry.get_sample_value(f"{name}_count", labels) == 1
    assert metrics.registry.get_sample_value(f"{name}_sum", labels) == pytest.approx(0.09)
