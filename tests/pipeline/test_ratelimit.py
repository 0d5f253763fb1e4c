"""LogLimiter: at most max_lines per window, the rest counted by reason and summarised once."""

from __future__ import annotations

import collections

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.ratelimit import LogLimiter


def test_the_first_lines_pass_the_rest_are_counted_and_summarised_once_the_window_ends():
    limiter = LogLimiter(max_lines=2, interval_s=60.0)
    verdicts = [
        limiter.admit(reason, 100.0 + i)
        for i, reason in enumerate(
            ["not_json", "not_json", "not_json", "missing_field", "not_json"]
        )
    ]
    assert verdicts == [True, True, False, False, False]
    assert limiter.due(159.9) is None  # the window opened at 100.0 is still open
    assert limiter.due(160.0) == {"not_json": 2, "missing_field": 1}
    assert limiter.due(500.0) is None  # one summary per window
    assert limiter.admit("not_json", 500.0)  # a new window opens with a fresh budget


def test_a_window_with_nothing_suppressed_has_no_summary():
    limiter = LogLimiter(max_lines=5, interval_s=10.0)
    assert limiter.admit("not_json", 0.0)
    assert limiter.due(20.0) is None


def test_zero_lines_means_summaries_only():
    limiter = LogLimiter(max_lines=0, interval_s=1.0)
    assert not limiter.admit("empty", 0.0)
    assert limiter.due(1.0) == {"empty": 1}


@pytest.mark.parametrize(("lines", "interval"), [(-1, 1.0), (1, 0.0)])
def test_bad_limits_are_refused(lines, interval):
    with pytest.raises(ValueError):
        LogLimiter(lines, interval)


_REASONS = st.sampled_from(["not_json", "missing_field", "ts_out_of_range"])


@given(
    max_lines=st.integers(0, 5),
    interval=st.floats(0.5, 30.0),
    steps=st.lists(st.tuples(st.floats(0.0, 20.0), _REASONS), max_size=80),
)
def test_against_a_plain_reference(max_lines, interval, steps):
    """Driven as the loop drives it (due, then admit, at a clock that never goes back): every
    offered event is either admitted or in exactly one summary, no window admits more than
    max_lines, and a summary comes only after its window's full interval."""
    limiter = LogLimiter(max_lines, interval)
    now = 0.0
    window_start: float | None = None
    admitted_in_window = 0
    expected_suppressed: collections.Counter[str] = collections.Counter()
    total_admitted = 0
    summarised: collections.Counter[str] = collections.Counter()
    for dt, reason in steps:
        now += dt
        summary = limiter.due(now)
        if window_start is not None and now - window_start >= interval:
            assert summary == (dict(expected_suppressed) or None)
            window_start, admitted_in_window = None, 0
            expected_suppressed.clear()
        else:
            assert summary is None
        summarised.update(summary or {})
        if window_start is None:
            window_start = now
        ok = limiter.admit(reason, now)
        assert ok == (admitted_in_window < max_lines)
        if ok:
            admitted_in_window += 1
            total_admitted += 1
        else:
            expected_suppressed[reason] += 1
    final = limiter.due(now + 2 * interval) or {}  # past the last window, float error aside
    summarised.update(final)
    assert total_admitted + sum(summarised.values()) == len(steps)
