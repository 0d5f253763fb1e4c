"""Pure state: event-time ordered folding, bounded dedup, the packed histories against a tiny
list-based reference, delta/snapshot equivalence, and refusal of unknown formats."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import StateError
from pipeline.messages import EVENT_TYPES, Event
from pipeline.state import RECORD, Dedup, PartitionState, fold, fold_many


def _ev(i, ts, user="u", item=None, type_="click"):
    return Event(f"e{i}", user, item or f"i{i}", type_, ts)


def reference(stream: list[Event], max_length: int) -> dict[str, list[tuple[str, str, int]]]:
    """The semantics, as plainly as possible: first delivery of each event id, per user sorted by
    (ts, arrival), newest `max_length`."""
    seen, by_user = set(), {}
    for arrival, e in enumerate(stream):
        if e.event_id not in seen:
            seen.add(e.event_id)
            by_user.setdefault(e.user_id, []).append((e.ts, arrival, e))
    return {
        u: [(e.item_id, e.type, e.ts) for _, _, e in sorted(r, key=lambda x: x[:2])][-max_length:]
        for u, r in by_user.items()
    }


def rows(state: PartitionState) -> dict[str, list[tuple[str, str, int]]]:
    out = {}
    for user in state.users():
        h = state.history(user)
        out[user] = [(i, EVENT_TYPES[t], ts) for i, t, ts in zip(h.item_ids, h.types, h.ts)]
    return out


def test_fold_orders_by_event_time_even_when_late():
    history = fold((), [_ev(1, 10), _ev(2, 30)], 50)
    history = fold(history, [_ev(3, 20)], 50)
    assert [h.event_id for h in history] == ["e1", "e3", "e2"]


def test_fold_keeps_arrival_order_on_equal_timestamps_and_truncates_oldest():
    history = fold((), [_ev(i, 5) for i in range(5)], 3)
    assert [h.event_id for h in history] == ["e2", "e3", "e4"]


def test_fold_matches_sorted_reference():
    rnd = random.Random(3)
    events = [_ev(i, rnd.randint(0, 100)) for i in range(200)]
    history = ()
    for i in range(0, 200, 13):
        history = fold(history, events[i : i + 13], 50)
    assert [(h.item_id, h.type, h.ts) for h in history] == reference(events, 50)["u"]


def test_fold_many_folds_each_history_on_its_own():
    def packed(pairs):
        out = np.zeros(len(pairs), RECORD)
        out["ts"], out["item"] = zip(*pairs) if pairs else ((), ())
        return out

    old = [packed([(1, 10), (5, 11)]).tobytes(), b"", packed([(3, 12)]).tobytes()]
    new = packed([(5, 20), (0, 21), (4, 22), (5, 23)])
    got = fold_many(old, np.array([0, 0, 2, 0]), new, 3)
    items = [np.frombuffer(h, RECORD)["item"].tolist() for h in got]
    assert items == [[11, 20, 23], [], [12, 22]]


def test_repeated_item_appears_again():
    state = PartitionState(max_length=50, dedup_capacity=100)
    state.apply([_ev(1, 1, item="x"), _ev(2, 2, item="x")])
    assert state.history("u").item_ids == ["x", "x"] and len(state.items) == 1


def test_dedup_is_bounded_fifo():
    dedup = Dedup(3, ["a", "b", "c"])
    dedup.add("d")
    assert "a" not in dedup and "d" in dedup and len(dedup) == 3
    assert dedup.ids() == ["b", "c", "d"]


def test_partition_state_drops_duplicates_and_reports_trigger_in_arrival_order():
    state = PartitionState(max_length=50, dedup_capacity=100)
    applied = state.apply([_ev(1, 50), _ev(2, 10), _ev(1, 50), _ev(3, 1, user="w")])
    assert applied.duplicates == 1
    assert applied.touched["u"].event_id == "e2"  # last arrival, though oldest in event time
    assert list(applied.touched) == ["u", "w"]  # first-arrival order, as outputs go out
    assert [e.event_id for e in applied.events] == ["e1", "e2", "e3"]
    again = state.apply([_ev(2, 10)])
    assert again.duplicates == 1 and not again.touched and not again.events


def test_history_unpacks_ids_types_and_times():
    state = PartitionState(max_length=50, dedup_capacity=100)
    state.apply([_ev(1, 7, item="a", type_="purchase"), _ev(2, 3, item="b", type_="view")])
    h = state.history("u")
    assert h.item_ids == ["b", "a"] and h.ts == [3, 7]
    assert [EVENT_TYPES[t] for t in h.types] == ["view", "purchase"]
    assert state.history("nobody").item_ids == [] and len(state) == 1


_EVENTS = st.lists(
    st.tuples(
        st.integers(0, 5), st.integers(0, 6), st.sampled_from(EVENT_TYPES), st.integers(0, 30)
    ),
    max_size=80,
)


@settings(max_examples=150, deadline=None)
@given(_EVENTS, st.integers(1, 10), st.randoms(use_true_random=False))
def test_packed_state_equals_the_reference_under_any_micro_batching(events, max_length, rnd):
    stream = [
        _ev(i, ts, user=f"u{user}", item=f"i{item}", type_=type_)
        for i, (user, item, type_, ts) in enumerate(events)
    ]
    stream += rnd.sample(stream, len(stream) // 3)  # redeliveries, in any order
    want = reference(stream, max_length)
    pieces = PartitionState(max_length=max_length, dedup_capacity=1000)
    replayed = PartitionState(max_length=max_length, dedup_capacity=1000)
    i = 0
    while i < len(stream):
        n = rnd.randint(1, 9)
        applied = pieces.apply(stream[i : i + n])
        replayed.apply_delta(pieces.delta(applied))
        i += n
    assert rows(pieces) == want
    assert rows(replayed) == want
    restored = PartitionState.from_snapshot(
        pieces.to_snapshot(), max_length=max_length, dedup_capacity=1000
    )
    assert rows(restored) == want and restored.dedup.ids() == pieces.dedup.ids()
    whole = PartitionState(max_length=max_length, dedup_capacity=1000)
    whole.apply(stream)
    assert rows(whole) == want


@settings(max_examples=80, deadline=None)
@given(_EVENTS, st.integers(1, 10))
def test_list_fold_equals_the_reference(events, max_length):
    stream = [
        _ev(i, ts, user="u", item=f"i{item}", type_=type_)
        for i, (_user, item, type_, ts) in enumerate(events)
    ]
    history = ()
    for i in range(0, len(stream), 7):
        history = fold(history, stream[i : i + 7], max_length)
    want = reference(stream, max_length).get("u", [])
    assert [(h.item_id, h.type, h.ts) for h in history] == want


def test_unknown_formats_fail_clearly():
    with pytest.raises(StateError, match="version 3"):
        PartitionState.from_snapshot({"version": 3}, max_length=5, dedup_capacity=5)
    with pytest.raises(StateError, match="unknown state delta"):
        PartitionState(max_length=5, dedup_capacity=5).apply_delta({"histories": {}})
    good = PartitionState(max_length=5, dedup_capacity=5)
    good.apply([_ev(1, 1)])
    snapshot = good.to_snapshot() | {"records": b""}
    with pytest.raises(StateError, match="do not match"):
        PartitionState.from_snapshot(snapshot, max_length=5, dedup_capacity=5)


@given(max_length=st.integers(1, 60), slide=st.integers(1, 80), count=st.integers(0, 500))
def test_the_window_slides_in_blocks_and_otherwise_grows_by_one(max_length, slide, count):
    from pipeline.state import window_length

    now, after = (
        window_length(count, max_length, slide),
        window_length(count + 1, max_length, slide),
    )
    assert now == min(count, max_length) or count > max_length
    assert min(count, max_length - min(slide, max_length) + 1) <= now <= max_length
    # Either the next event appends to the window, or the window just slid.
    assert after == now + 1 or after == max_length - min(slide, max_length) + 1
    if slide == 1:
        assert now == min(count, max_length)


def test_counts_follow_applied_events_across_snapshots_and_batching():
    events = [_ev(n, n % 7) for n in range(40)]
    one = PartitionState(max_length=5, dedup_capacity=100)
    one.apply(events + events[:3])  # duplicates do not count
    split = PartitionState(max_length=5, dedup_capacity=100)
    for start in range(0, 40, 6):
        split.apply(events[start : start + 6])
    assert one.history("u").count == split.history("u").count == 40
    assert len(one.history("u").item_ids) == 5
    back = PartitionState.from_snapshot(one.to_snapshot(), max_length=5, dedup_capacity=100)
    assert back.history("u").count == 40


def test_window_start_slices_the_encoded_window_out_of_the_kept_history():
    from pipeline.state import window_start

    assert window_start(0, 0, 50, 10) == 0  # nothing kept: not "everything" as [-0:] would be
    assert window_start(30, 30, 50, 10) == 0
    assert window_start(50, 51, 50, 10) == 9  # slid: the newest 41
    assert window_start(50, 60, 50, 10) == 0  # grown back to 50
    assert window_start(256, 300, 50, 10) == 256 - 50  # a longer kept history: its newest 50
