"""/healthz and /readyz: the pure decisions, the loop's record of its progress, and the HTTP
answers on the metrics port."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.broker import free_port
from pipeline.codec import Codec
from pipeline.config import MetricsConfig, ValidationConfig
from pipeline.errors import ConfigError
from pipeline.health import LoopHealth, liveness, readiness
from pipeline.loop import ConsumerLoop
from pipeline.memorybus import MemoryBus, MemorySink, MemorySource, MemoryTable
from pipeline.metrics import WorkerMetrics, serve
from tests.handlers import NoopHandler
from tests.probes import http_get

NOW_MS = 1_700_000_000_000


@given(last=st.floats(0, 1e6), age=st.floats(0, 1e4), bound=st.floats(0.001, 1e4))
def test_live_exactly_while_the_last_poll_is_within_the_bound(last, age, bound):
    now = last + age
    verdict = liveness(now, last, bound)
    assert verdict.ok == (now - last <= bound)
    assert verdict.reason


def test_a_clock_that_went_back_counts_as_a_fresh_poll():
    assert liveness(now=5.0, last_poll=10.0, bound_s=1.0).ok


@pytest.mark.parametrize(
    "assigned, restoring, primed, ready",
    [
        (False, 0, False, False),
        (False, 0, True, False),
        (True, 0, False, False),
        (True, 2, True, False),
        (True, 0, True, True),
    ],
)
def test_ready_only_after_tables_assignment_and_restore(assigned, restoring, primed, ready):
    verdict = readiness(assigned=assigned, restoring=restoring, primed=primed)
    assert verdict.ok is ready
    assert verdict.reason


def test_the_bound_runs_from_the_moment_the_loop_exists():
    now = [100.0]
    health = LoopHealth(bound_s=30.0, clock=lambda: now[0])
    now[0] = 129.0
    assert health.live().ok
    now[0] = 131.0
    assert not health.live().ok and "31.0 s" in health.live().reason
    health.polled()
    assert health.live().ok and health.poll_age() == 0.0


def test_the_bound_is_a_setting_that_fails_fast_when_not_positive():
    assert MetricsConfig().liveness_timeout_s == 60.0
    with pytest.raises(ConfigError, match=r"metrics\.liveness_timeout_s"):
        MetricsConfig(liveness_timeout_s=0)


def _loop(bus: MemoryBus, bound_s: float = 60.0) -> tuple[ConsumerLoop, WorkerMetrics]:
    metrics = WorkerMetrics("updater")
    loop = ConsumerLoop(
        handler=NoopHandler(),
        metrics=metrics,
        sink=MemorySink(bus),
        source_factory=lambda **hooks: MemorySource(bus, "g", ["events"], **hooks),
        codec=Codec(ValidationConfig(), worker="updater"),
        dlq_topic="dlq",
        table=MemoryTable(bus, ["items"]),
        clock=lambda: NOW_MS / 1000,
        liveness_timeout_s=bound_s,
    )
    return loop, metrics


def test_the_loop_is_ready_after_priming_and_its_first_assignment():
    loop, _ = _loop(MemoryBus(partitions=2))
    assert not loop.health.ready().ok
    loop.prime(1.0)
    assert not loop.health.ready().ok  # tables read, no assignment yet
    loop.run_once()  # the memory source assigns on its first poll; the loop restores at once
    assert loop.health.ready().ok
    assert loop.health.assigned and loop.health.restoring == 0


def test_the_metrics_port_answers_healthz_and_readyz_from_the_loop():
    port = free_port()
    now = [0.0]
    health = LoopHealth(bound_s=10.0, clock=lambda: now[0])
    metrics = WorkerMetrics("scorer")
    server = serve(metrics, "127.0.0.1", port, health)
    try:
        assert http_get(port, "/healthz")[0] == 200
        status, body = http_get(port, "/readyz")
        assert status == 503 and "global tables" in body
        health.primed, health.assigned = True, True
        assert http_get(port, "/readyz") == (200, "ok: assigned, restored and serving\n")
        now[0] = 11.0  # the loop stopped polling: the HTTP thread still answers, with a 503
        status, body = http_get(port, "/healthz")
        assert status == 503 and "no poll completed for 11.0 s" in body
        status, page = http_get(port, "/metrics")
        assert status == 200 and 'streamrec_rebalances_total{worker="scorer"}' in page
    finally:
        server.shutdown()
        server.server_close()


def test_without_a_loop_there_is_no_health_endpoint():
    port = free_port()
    server = serve(WorkerMetrics("t"), "127.0.0.1", port)
    try:
        status, page = http_get(port, "/healthz")  # the supervisor: only metrics
        assert status == 200 and "streamrec_build_info" in page
    finally:
        server.shutdown()
        server.server_close()
