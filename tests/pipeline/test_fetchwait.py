"""FetchWait: when a consumer's fetch wait goes up, per partition, and only on evidence."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pipeline.kafka.fetchwait import FetchWait


def _clocked(floor=10, ceiling=50, **kw):
    now = [0.0]
    return FetchWait(floor, ceiling, clock=lambda: now[0], **kw), now


def test_a_partition_stuck_below_its_highwater_for_a_second_and_three_polls_doubles_it():
    wait, now = _clocked()
    for t in (0.0, 0.5, 0.9):
        now[0] = t
        assert wait.observe({"p0": (100, 500)}) is None
    now[0] = 1.0
    assert wait.observe({"p0": (100, 500)}) == 20
    now[0] = 1.5  # the new wait gets its own patience
    assert wait.observe({"p0": (100, 500)}) is None
    for t in (1.8, 2.1, 2.6):
        now[0] = t
        raised = wait.observe({"p0": (100, 500)})
    assert raised == 40
    for t in (3.0, 3.5, 4.0, 5.0, 6.0, 7.0, 8.0):
        now[0] = t
        wait.observe({"p0": (100, 500)})
    assert wait.wait_ms == 50  # capped at the ceiling


def test_a_busy_partition_does_not_hide_a_starving_one():
    wait, now = _clocked()
    raised = None
    for n, t in enumerate((0.0, 0.4, 0.8, 1.2)):
        now[0] = t
        raised = wait.observe({"busy": (n * 100, 10_000), "starving": (7, 90)})
    assert raised == 20


def test_moving_caught_up_or_a_single_long_gap_is_no_starvation():
    wait, now = _clocked()
    for t, position in ((0.0, 1), (0.6, 2), (1.2, 3), (1.8, 4)):  # slow but moving
        now[0] = t
        assert wait.observe({"p": (position, 100)}) is None
    for t in (2.0, 3.0, 4.0):  # caught up
        now[0] = t
        assert wait.observe({"p": (100, 100)}) is None
    now[0] = 5.0
    assert wait.observe({"p": (100, 200)}) is None
    now[0] = 9.0  # descheduled for 4 s: two observations are not enough
    assert wait.observe({"p": (100, 200)}) is None
    assert wait.wait_ms == 10


def test_a_full_poll_is_a_backlog_not_starvation():
    """With a backlog the client hands out one partition's buffered records at a time; the
    other partitions wait their turn without moving. Polls that came back full say so."""
    wait, now = _clocked()
    for n, t in enumerate((0.0, 0.4, 0.8, 1.2, 1.6, 2.0)):
        now[0] = t
        assert (
            wait.observe({"served": (n * 500, 50_000), "waiting": (0, 50_000)}, full=True) is None
        )
    for t in (2.2, 2.6, 3.0, 3.4):  # then polls come back short while "waiting" stays put
        now[0] = t
        raised = wait.observe({"waiting": (0, 50_000)})
    assert raised == 20


def test_reset_and_a_ceiling_at_the_floor():
    wait, now = _clocked(10, 10)
    for t in range(6):
        now[0] = float(t)
        assert wait.observe({"p": (0, 9)}) is None
    raised, _ = _clocked(10, 1000)
    raised.wait_ms = 80
    raised.reset()
    assert raised.wait_ms == 10


@given(st.lists(st.tuples(st.floats(0.0, 2.0), st.integers(0, 3), st.integers(0, 3)), max_size=80))
def test_the_wait_stays_within_floor_and_ceiling_and_only_rises(steps):
    wait, now = _clocked(5, 300)
    previous = wait.wait_ms
    for gap, position, lag in steps:
        now[0] += gap
        wait.observe({"p": (position, position + lag)})
        assert 5 <= wait.wait_ms <= 300 and wait.wait_ms >= previous
        previous = wait.wait_ms
