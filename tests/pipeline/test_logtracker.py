"""LogTracker: the loop's pure bookkeeping of which log each partition reads and when the broker
replaced it (where to resume, and when a reset must be handled)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pipeline.logtracker import TP, LogTracker, Resume

TP0: TP = ("events", 0)
TP1: TP = ("events", 1)


def test_an_offset_stored_on_the_current_log_resumes_where_it_stopped() -> None:
    logs = LogTracker()
    assert logs.assigned(TP0, 42, "log-a", "log-a") == Resume(42)
    assert logs.expected == {TP0: 42} and not logs.lost


def test_unknown_logs_resume_at_the_stored_offset() -> None:
    assert LogTracker().assigned(TP0, 7, None, "log-a") == Resume(7)
    assert LogTracker().assigned(TP0, 7, "log-a", None) == Resume(7)


def test_a_log_replaced_while_no_worker_ran_is_read_from_its_start_and_reset_once() -> None:
    logs = LogTracker()
    first = logs.assigned(TP0, 42, "log-a", "log-b")
    assert first.offset == 0 and first.lost and first.reset is not None
    again = logs.assigned(TP0, 42, "log-a", "log-b")  # re-assigned before persisting on log-b
    assert again == Resume(0, lost=True, reset=None)
    logs.persisted({TP0: 5})
    assert logs.assigned(TP0, 5, "log-b", "log-b") == Resume(5)


def test_a_rewound_partition_owned_by_another_member_is_reset_by_whoever_gets_it() -> None:
    logs = LogTracker()
    assert logs.rewound(TP1, owned=False) is None
    resume = logs.assigned(TP1, 30, None, None)  # the lost log's offset, from the other member
    assert resume.offset == 0 and resume.reset is not None
    assert logs.assigned(TP1, 30, None, None).reset is None  # counted once


def test_an_owned_rewound_partition_is_reset_every_time_its_log_is_replaced() -> None:
    logs = LogTracker()
    logs.persisted({TP0: 10})
    assert logs.rewound(TP0, owned=True) is not None
    assert TP0 not in logs.expected
    assert logs.rewound(TP0, owned=True) is not None  # a second broker restart


def test_persisting_on_the_new_log_ends_a_lost_log() -> None:
    logs = LogTracker()
    logs.rewound(TP0, owned=False)
    logs.persisted({TP0: 3})
    assert logs.assigned(TP0, 3, None, None) == Resume(3)


def test_revoked_partitions_expect_nothing() -> None:
    logs = LogTracker()
    logs.persisted({TP0: 10, TP1: 4})
    logs.revoked(TP0)
    assert logs.first_fetched(TP0, 0) is None
    assert logs.expected == {TP1: 4}


@given(expected=st.integers(0, 1000), first=st.integers(0, 1000))
def test_a_first_offset_below_the_expected_one_is_a_reset(expected: int, first: int) -> None:
    logs = LogTracker()
    logs.persisted({TP0: expected})
    why = logs.first_fetched(TP0, first)
    assert (why is not None) == (first < expected)
    assert (TP0 in logs.expected) == (why is None)
    assert logs.first_fetched(TP0, first) is None  # expects nothing until persisted again


@given(expected=st.integers(0, 1000), highwater=st.integers(0, 1000), position=st.integers(0, 1000))
def test_a_log_that_ends_below_what_we_consumed_is_a_reset(
    expected: int, highwater: int, position: int
) -> None:
    logs = LogTracker()
    logs.persisted({TP0: expected})
    why = logs.watermark(TP0, highwater, position)
    # position > highwater: the consumer is ahead of a stale watermark, not on a shorter log.
    assert (why is not None) == (highwater < expected and position <= highwater)


_LOG = st.sampled_from([None, "log-a", "log-b"])
_OP = st.one_of(
    st.tuples(st.just("assigned"), st.sampled_from([TP0, TP1]), st.integers(0, 50), _LOG, _LOG),
    st.tuples(st.just("first_fetched"), st.sampled_from([TP0, TP1]), st.integers(0, 50)),
    st.tuples(st.just("rewound"), st.sampled_from([TP0, TP1]), st.booleans()),
    st.tuples(
        st.just("watermark"), st.sampled_from([TP0, TP1]), st.integers(0, 50), st.integers(0, 50)
    ),
    st.tuples(st.just("persisted"), st.sampled_from([TP0, TP1]), st.integers(0, 50)),
    st.tuples(st.just("revoked"), st.sampled_from([TP0, TP1])),
)


@given(st.lists(_OP, max_size=40))
def test_any_sequence_keeps_the_resume_rules(ops: list[tuple]) -> None:  # type: ignore[type-arg]
    """Against a plain reference: a partition whose log was seen replaced, and not persisted on
    since, resumes at 0 and is reset exactly once by this instance; any other resumes where it
    was stored. A reset always forgets the expected offset (no second reset from stale data)."""
    logs = LogTracker()
    replaced: set[TP] = set()  # seen replaced, not persisted on since
    handled: set[TP] = set()  # ... and reset by this instance
    for op, tp, *args in ops:
        if op == "assigned":
            offset, stored, current = args
            if stored and current and stored == current:
                replaced.discard(tp)
                handled.discard(tp)
            elif stored and current:
                replaced.add(tp)
            resume = logs.assigned(tp, offset, stored, current)
            if tp in replaced:
                assert resume.offset == 0 and resume.lost
                assert (resume.reset is not None) == (tp not in handled)
                handled.add(tp)
            else:
                assert resume == Resume(offset)
            assert logs.expected[tp] == resume.offset
            continue
        if op == "persisted":
            logs.persisted({tp: args[0]})
            replaced.discard(tp)
            handled.discard(tp)
            continue
        if op == "revoked":
            logs.revoked(tp)
            assert tp not in logs.expected
            continue
        if op == "rewound":
            why = logs.rewound(tp, owned=args[0])
            assert (why is not None) == args[0]
        elif op == "first_fetched":
            why = logs.first_fetched(tp, args[0])
        else:
            why = logs.watermark(tp, args[0], args[1])
        replaced |= {tp} if op == "rewound" else set()
        if why is not None:
            replaced.add(tp)
            handled.add(tp)
            assert tp not in logs.expected
