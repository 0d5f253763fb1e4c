"""FetchWait: when a consumer's fetch wait goes up, and that it never goes down by itself."""

from __future__ import annotations

from pipeline.kafka.fetchwait import FetchWait


def test_raises_the_wait_only_after_a_second_of_starvation_and_up_to_the_ceiling():
    now = [0.0]
    wait = FetchWait(10, 50, patience_s=1.0, clock=lambda: now[0])
    assert wait.observe(delivered=False, waiting=True) is None  # starvation starts
    now[0] = 0.9
    assert wait.observe(False, True) is None
    now[0] = 1.0
    assert wait.observe(False, True) == 20
    now[0] = 1.5  # the new wait gets its own second
    assert wait.observe(False, True) is None
    now[0] = 2.0
    assert wait.observe(False, True) == 40
    now[0] = 3.0
    assert wait.observe(False, True) == 50  # capped
    now[0] = 9.0
    assert wait.observe(False, True) is None and wait.wait_ms == 50


def test_records_delivered_or_nothing_waiting_is_no_starvation():
    now = [0.0]
    wait = FetchWait(10, 1000, clock=lambda: now[0])
    for t, delivered, waiting in [(0.0, False, True), (0.8, True, True), (1.2, False, True),
                                  (1.9, False, False), (2.5, False, True), (3.0, False, True)]:
        now[0] = t
        assert wait.observe(delivered, waiting) is None  # every run of starvation < 1 s
    assert wait.wait_ms == 10
    wait.wait_ms = 80
    wait.reset()  # a rebuilt consumer starts from the configured wait
    assert wait.wait_ms == 10


def test_a_ceiling_at_the_floor_turns_it_off():
    now = [0.0]
    wait = FetchWait(10, 10, clock=lambda: now[0])
    for t in range(5):
        now[0] = float(t)
        assert wait.observe(False, True) is None
    assert wait.wait_ms == 10
