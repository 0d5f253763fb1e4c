"""`streamrec up`'s supervisor: a child that keeps dying is restarted with a doubling back-off,
logged as a crash loop, and counted; a child that ran long enough starts counting afresh."""

from __future__ import annotations

import logging

from pipeline.config import Config
from pipeline.metrics import SupervisorMetrics
from workers.up import Supervisor


class _Child:
    def __init__(self) -> None:
        self.code: int | None = None

    def poll(self) -> int | None:
        return self.code


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _Supervisor(Supervisor):
    def __init__(self, clock: _Clock, metrics: SupervisorMetrics) -> None:
        super().__init__(
            Config(),
            workers=["updater"],
            restart_delay_s=1.0,
            max_restart_delay_s=8.0,
            stable_s=60.0,
            metrics=metrics,
            clock=clock,
        )
        self.spawned: list[_Child] = []

    def _spawn(self, name):  # type: ignore[no-untyped-def]
        self._started_at[name] = self._clock()
        self.spawned.append(_Child())
        return self.spawned[-1]


def _restarts(metrics: SupervisorMetrics) -> float:
    return (
        metrics.registry.get_sample_value(
            "streamrec_up_child_restarts_total", {"worker": "updater"}
        )
        or 0.0
    )


def test_a_crash_looping_child_backs_off_exponentially_and_is_counted(caplog):
    clock, metrics = _Clock(), SupervisorMetrics()
    sup = _Supervisor(clock, metrics)
    sup.start()
    delays = []
    with caplog.at_level(logging.WARNING, logger="workers.up"):
        for _ in range(6):
            sup.spawned[-1].code = 2
            sup.check()  # notices the exit, schedules the restart
            spawned = len(sup.spawned)
            waited = 0.0
            while len(sup.spawned) == spawned:
                clock.now += 0.5
                waited += 0.5
                sup.check()
            delays.append(waited)
    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert _restarts(metrics) == 6 and sup.restarts == 6
    assert "crash-looping" in caplog.text and "exited 3 times in a row" in caplog.text


def test_a_child_that_ran_long_enough_restarts_after_the_base_delay():
    clock, metrics = _Clock(), SupervisorMetrics()
    sup = _Supervisor(clock, metrics)
    sup.start()
    for _ in range(3):
        sup.spawned[-1].code = 1
        sup.check()
        clock.now += 10
        sup.check()
    assert sup.failures["updater"] == 3
    clock.now += 120  # the current child has been up for two minutes
    sup.spawned[-1].code = 1
    sup.check()
    assert sup.failures["updater"] == 1


def test_waiting_for_one_restart_never_blocks_the_others():
    clock, metrics = _Clock(), SupervisorMetrics()
    sup = _Supervisor(clock, metrics)
    sup.start()
    sup.spawned[-1].code = 1
    sup.check()
    assert len(sup.spawned) == 1  # scheduled, not slept on
    assert (
        metrics.registry.get_sample_value("streamrec_up_child_running", {"worker": "updater"}) == 0
    )
