"""Pure state: event-time ordered folding, bounded dedup, delta/snapshot equivalence."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.messages import Event
from pipeline.state import Dedup, PartitionState, fold


def _ev(i, ts, user="u", item=None, type_="click"):
    return Event(f"e{i}", user, item or f"i{i}", type_, ts)


def test_fold_orders_by_event_time_even_when_late():
    history = fold((), [_ev(1, 10), _ev(2, 30)], 50)
    history = fold(history, [_ev(3, 20)], 50)
    assert [h.event_id for h in history] == ["e1", "e3", "e2"]


def test_fold_keeps_arrival_order_on_equal_timestamps_and_truncates_oldest():
    history = fold((), [_ev(i, 5) for i in range(5)], 3)
    assert [h.event_id for h in history] == ["e2", "e3", "e4"]


def test_repeated_item_appears_again():
    history = fold((), [_ev(1, 1, item="x"), _ev(2, 2, item="x")], 50)
    assert [h.item_id for h in history] == ["x", "x"]


def test_dedup_is_bounded_fifo():
    dedup = Dedup(3, ["a", "b", "c"])
    dedup.add("d")
    assert "a" not in dedup and "d" in dedup and len(dedup) == 3


def test_partition_state_drops_duplicates_and_reports_trigger_in_arrival_order():
    state = PartitionState(max_length=50, dedup_capacity=100)
    applied = state.apply([_ev(1, 50), _ev(2, 10), _ev(1, 50)])
    assert applied.duplicates == 1
    assert applied.touched["u"].event_id == "e2"  # last arrival, though oldest in event time
    again = state.apply([_ev(2, 10)])
    assert again.duplicates == 1 and not again.touched


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 30)), max_size=60),
       st.integers(1, 10), st.randoms(use_true_random=False))
def test_any_micro_batching_gives_the_same_state(events, max_length, rnd):
    stream = [_ev(i, ts, user=f"u{user}") for i, (user, ts) in enumerate(events)]
    stream += stream[: len(stream) // 3]  # redeliveries
    whole = PartitionState(max_length=max_length, dedup_capacity=1000)
    whole.apply(stream)
    pieces = PartitionState(max_length=max_length, dedup_capacity=1000)
    replayed = PartitionState(max_length=max_length, dedup_capacity=1000)
    i = 0
    while i < len(stream):
        n = rnd.randint(1, 7)
        applied = pieces.apply(stream[i:i + n])
        replayed.apply_delta(pieces.delta(applied))
        i += n
    assert pieces.histories == whole.histories
    assert replayed.histories == whole.histories
    restored = PartitionState.from_snapshot(pieces.to_snapshot(), max_length=max_length,
                                            dedup_capacity=1000)
    assert restored.histories == whole.histories


def test_fold_matches_sorted_reference():
    rnd = random.Random(3)
    events = [_ev(i, rnd.randint(0, 100)) for i in range(200)]
    history = ()
    for i in range(0, 200, 13):
        history = fold(history, events[i:i + 13], 50)
    reference = sorted(enumerate(events), key=lambda p: (p[1].ts, p[0]))[-50:]
    assert [h.event_id for h in history] == [e.event_id for _, e in reference]
