"""Crash-loop quarantine: a record that kills its worker twice is dead-lettered, never applied a
third time; per-record isolation dead-letters the record whose handling raises."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.codec import Decoded
from pipeline.crashguard import CrashGuard, GuardState, after_crash
from pipeline.errors import BrokerError
from pipeline.loop import Output
from pipeline.memorybus import MemoryBus, MemorySource, MemoryTable
from pipeline.metrics import WorkerMetrics
from tests.handlers import NoopHandler, memory_loop

NOW_MS = 1_700_000_000_000
TP0 = ("events", 0)


class _Died(BaseException):
    """What a SIGKILL or segfault looks like from inside: nothing the loop may catch."""


class _Handler(NoopHandler):
    """Counts applied events; kills the process on `deadly` ids, raises on `faulty` ones."""

    def __init__(self, deadly=(), faulty=(), fail_batches=False) -> None:
        self.applied: list[str] = []
        self.deadly, self.faulty, self.fail_batches = set(deadly), set(faulty), fail_batches

    def handle(self, batch: list[Decoded], now_ms: int) -> list[Output]:
        ids = [d.message.event_id for d in batch]
        if self.deadly & set(ids):
            raise _Died()
        if self.faulty & set(ids) or (self.fail_batches and len(batch) > 1):
            raise ValueError("cannot apply " + ",".join(sorted(self.faulty & set(ids))))
        self.applied += ids
        return []


def _event(n: int) -> bytes:
    return orjson.dumps(
        {"event_id": f"e{n}", "user_id": "u1", "item_id": "i1", "type": "click", "ts": NOW_MS}
    )


def _bus(n: int = 10) -> MemoryBus:
    bus = MemoryBus(partitions=1)
    for i in range(n):
        bus.produce("events", b"u1", _event(i))
    return bus


def _loop(bus, handler, guard=None, metrics=None, **options):
    def factory(**hooks):
        return MemorySource(bus, "g", ["events"], **hooks)

    return memory_loop(
        bus, handler, factory, lambda: NOW_MS / 1000, metrics, guard=guard, **options
    )


def _processing_errors(metrics, name, topic):
    """The updater's `name` counter for `topic` with reason processing_error."""
    labels = {"worker": "updater", "topic": topic, "reason": "processing_error"}
    return metrics.registry.get_sample_value(name, labels)


def _run_until_dead_or_idle(loop) -> bool:
    """Iterate until the input is drained (False) or the process 'died' (True)."""
    for _ in range(100):
        try:
            if loop.run_once() == 0:
                return False
        except _Died:
            return True
    raise AssertionError("the loop never drained its input")


def _dead_letters(bus):
    return [orjson.loads(r.value) for r in bus.values("dlq")]


def _starts_until_drained(
    tmp_path, bus, deadly, *, fatal: bool
) -> tuple[int, _Handler, CrashGuard]:
    """Start workers on `bus` until one drains it; each death is a fatal signal (faulthandler
    left a traceback) or an unexplained kill. Returns (deaths, last handler, last guard)."""
    for deaths in range(6):
        guard = CrashGuard(tmp_path / "guard").open()
        handler = _Handler(deadly=deadly)
        died = _run_until_dead_or_idle(_loop(bus, handler, guard))
        if fatal and died:
            guard.fatal_path.write_text("Fatal Python error: Segmentation fault\n")
        elif guard.fatal_path.exists():
            guard.fatal_path.write_text("")
        guard.close(clean=not died)  # a dead process never runs its shutdown path
        if not died:
            return deaths, handler, guard
    raise AssertionError("still dying after six starts")


def test_a_record_that_kills_the_worker_twice_is_quarantined_on_the_third_start(tmp_path):
    bus = _bus()
    deaths, handler, guard = _starts_until_drained(tmp_path, bus, {"e5"}, fatal=True)
    assert deaths == 2, "a record may kill its worker twice, never a third time"
    letters = _dead_letters(bus)
    assert [(d["reason"], d["offset"]) for d in letters] == [("quarantined", 5)]
    assert handler.applied == [f"e{i}" for i in range(6, 10)]
    assert guard.state.quarantine == {} and guard.state.singles_until == {}


def test_kills_that_leave_no_trace_quarantine_only_a_record_killed_twice_alone(tmp_path):
    """SIGKILL may come from anyone: only two kills of the same record applied alone convict it."""
    bus = _bus()
    deaths, _, _ = _starts_until_drained(tmp_path, bus, {"e5"}, fatal=False)
    assert deaths == 3
    assert [(d["reason"], d["offset"]) for d in _dead_letters(bus)] == [("quarantined", 5)]


def test_a_worker_leaving_through_its_shutdown_path_leaves_nothing_in_flight(tmp_path):
    bus = _bus()
    guard = CrashGuard(tmp_path / "guard").open()

    class Failing(_Handler):
        def checkpoint(self, offsets):
            raise BrokerError("broker gone mid-batch")

    loop = _loop(bus, Failing(), guard)
    with pytest.raises(BrokerError):
        loop.run()  # closes the loop, and with it the guard, on the way out
    again = CrashGuard(tmp_path / "guard").open()
    assert again.state.crashes == 0 and not again.state.singles_until


def test_a_clean_restart_counts_no_crash(tmp_path):
    bus = _bus()
    for _ in range(2):
        guard = CrashGuard(tmp_path / "guard").open()
        loop = _loop(bus, _Handler(), guard)
        assert not _run_until_dead_or_idle(loop)
        loop.close()
        assert guard.state.crashes == 0 and not guard.state.batch


def test_a_batch_that_raises_is_retried_and_only_the_culprit_is_dead_lettered():
    bus = _bus()
    handler = _Handler(faulty={"e3", "e7"})
    metrics = WorkerMetrics("updater")
    _run_until_dead_or_idle(_loop(bus, handler, metrics=metrics))
    assert handler.applied == [f"e{i}" for i in range(10) if i not in (3, 7)]
    letters = _dead_letters(bus)
    assert [(d["reason"], d["offset"]) for d in letters] == [
        ("processing_error", 3),
        ("processing_error", 7),
    ]
    assert "ValueError: cannot apply e3" in letters[0]["error"]
    assert _processing_errors(metrics, "streamrec_messages_invalid_total", "events") == 2


def test_a_batch_level_failure_is_found_record_by_record():
    """Every record alone succeeds: the batch failure was nobody's fault; all are applied."""
    bus = _bus()
    handler = _Handler(fail_batches=True)
    _run_until_dead_or_idle(_loop(bus, handler))
    assert handler.applied == [f"e{i}" for i in range(10)] and not _dead_letters(bus)


def test_infrastructure_failures_still_stop_the_worker():
    class Broken(_Handler):
        def handle(self, batch, now_ms):
            raise BrokerError("broker gone")

    with pytest.raises(BrokerError):
        _loop(_bus(), Broken()).run_once()


def test_a_table_record_that_raises_is_skipped_not_fatal():
    bus = _bus(0)
    for i in range(3):
        bus.produce("items", b"i", orjson.dumps({"item_id": f"i{i}", "ts": NOW_MS, "title": "t"}))

    class Table(_Handler):
        def __init__(self):
            super().__init__()
            self.items: list[str] = []

        def kind_of(self, topic):
            return "item" if topic == "items" else "event"

        def apply_table(self, batch, now_ms):
            if any(d.message.item_id == "i1" for d in batch):
                raise RecursionError("item i1")
            self.items += [d.message.item_id for d in batch]
            return []

    handler = Table()
    metrics = WorkerMetrics("updater")
    loop = _loop(bus, handler, metrics=metrics, table=MemoryTable(bus, ["items"]))
    assert loop.prime(1.0) == 3
    assert handler.items == ["i0", "i2"]
    assert _processing_errors(metrics, "streamrec_table_records_invalid_total", "items") == 1


# -- the pure rule ---------------------------------------------------------------------------------


def test_a_lone_record_that_died_once_is_applied_alone_and_quarantined_at_its_second_death():
    state, quarantined = after_crash(GuardState(batch={"t|0": [4, 4]}))
    assert not quarantined and state.singles_until == {"t|0": 4}
    state.batch = {"t|0": [4, 4]}
    state, quarantined = after_crash(state)
    assert quarantined == [("t|0", 4)] and state.crashes == 2


def test_a_batch_death_makes_its_partitions_suspect_one_record_at_a_time():
    state, quarantined = after_crash(GuardState(batch={"t|0": [0, 9], "t|1": [3, 3]}))
    assert not quarantined
    assert state.singles_until == {"t|0": 9, "t|1": 3}
    assert state.singles({("t", 1)}) and not state.singles({("t", 2)})
    state.passed({("t", 0): 10, ("t", 1): 2})
    assert state.singles_until == {"t|1": 3}


@settings(max_examples=300, deadline=None)
@given(
    deadly=st.integers(0, 29),
    batch=st.integers(1, 12),
    fatal=st.booleans(),
    kills=st.lists(st.integers(2, 6), max_size=8),
)
def test_any_deadly_record_is_quarantined_and_random_kills_quarantine_nothing(
    deadly, batch, fatal, kills
):
    """Simulated restarts over 30 offsets: a record that always kills costs at most two deaths
    by fatal signal or three unexplained ones, and every other record is applied; kills at the
    n-th batch of a start (n >= 2, as `streamrec chaos` does) never quarantine anything."""
    state = GuardState()
    applied: list[int] = []
    position, deaths, chaos = 0, 0, list(kills)
    while position < 30:
        state, _ = after_crash(state, fatal=fatal)
        kill_at = chaos.pop(0) if chaos else None
        for n in range(1, 10**6):
            size = 1 if state.singles({("t", 0)}) else batch
            records = list(range(position, min(30, position + size)))
            kept = [o for o in records if not state.quarantined(("t", 0), o)]
            state.batch = {"t|0": [records[0], records[-1]]}
            if deadly in kept:
                deaths += 1
                assert deaths <= (2 if fatal else 3)
                break
            if n == kill_at:  # an outside SIGKILL, nothing to do with the records
                state, _ = after_crash(state, fatal=False)
                break
            applied += kept
            position = records[-1] + 1
            state.passed({("t", 0): position})
            state.batch = {}
            if position >= 30:
                break
    assert applied == [o for o in range(30) if o != deadly]
