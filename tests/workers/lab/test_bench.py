"""streamrec bench's pure parts: matching recommendations to events, percentiles, windows, the
table a user reads."""

from __future__ import annotations

from workers.lab.bench import Freshness, format_table, percentiles


def test_an_event_is_answered_by_its_own_or_a_later_recommendation_of_its_user() -> None:
    fresh = Freshness()
    fresh.sent("e1", "u1", 1, at=100.0)
    fresh.sent("e2", "u1", 2, at=100.5)  # same micro-batch: answered together with e1
    fresh.sent("e3", "u2", 3, at=101.0)
    fresh.received("e2", at=100.6)
    assert sorted(round(x) for x in fresh.latencies_ms) == [100, 600]
    assert fresh.unanswered() == 1
    fresh.received("unknown-trigger", at=101.2)  # a model-swap re-score: counted, matches nothing
    fresh.received("e3", at=101.05)
    assert fresh.unanswered() == 0 and fresh.recommendations == 3


def test_latency_by_window_follows_the_produce_time() -> None:
    fresh = Freshness()
    for n, (sent, latency_s) in enumerate([(0.5, 0.010), (3.0, 0.020), (12.0, 0.200)]):
        fresh.sent(f"e{n}", f"u{n}", n, at=1000.0 + sent)
        fresh.received(f"e{n}", at=1000.0 + sent + latency_s)
    windows = fresh.by_window(1000.0, 10.0)
    assert [w["from_s"] for w in windows] == [0.0, 10.0]
    assert windows[1]["p50_ms"] == 200.0 and windows[0]["p99_ms"] < 21
    fresh.clear()
    assert fresh.by_window(1000.0, 10.0) == [] and fresh.latencies_ms == []


def test_percentiles_and_the_table() -> None:
    stats = percentiles([float(x) for x in range(1, 101)])
    assert stats["count"] == 100 and stats["max_ms"] == 100.0 and 50 <= stats["p50_ms"] <= 51
    assert percentiles([]) == {}
    table = format_table(
        {
            "config": {"rate": 1000.0},
            "ceiling": {"msgs_per_s": 18000.0},
            "offered": {
                **stats,
                "unanswered": 0,
                "broker_cpu_share": 0.5,
                "by_10s_window": [{"from_s": 0.0, "p50_ms": 20.0, "p99_ms": 90.0}],
            },
            "user_encodes": {"incremental": 3, "full": 1},
        }
    )
    assert "ceiling (consume->parse->produce): 18000.0 msg/s" in table
    assert "by 10 s window, p50/p99 ms: 20/90" in table
    assert "50% of a core" in table
    assert "3 incremental, 1 full re-encodes (75% incremental)" in table


class _SlowSink:
    """Each flush takes 20 ms of a hand-advanced clock (a busy broker's round trip)."""

    def __init__(self, now: list[float]) -> None:
        self.now, self.sent, self.flushes = now, 0, 0

    def send(self, topic, key, value) -> None:
        self.sent += 1

    def flush(self, timeout_s) -> None:
        self.flushes += 1
        self.now[0] += 0.020


class _Events:
    def __init__(self) -> None:
        self.seq = 0

    def batch(self, n):
        out = [(f"e{self.seq + i}", "u", b"{}", self.seq + i) for i in range(n)]
        self.seq += n
        return out


def test_the_offered_rate_holds_when_flushes_are_slower_than_the_slices() -> None:
    """1,000 events/s in 5 ms slices, but every flush takes 20 ms: slices grow instead of the
    run stretching to 4x its length (which offered 250 events/s while reporting 1,000)."""
    from workers.lab.bench.load import produce_paced

    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    sink = _SlowSink(now)
    sent, took, behind_ms = produce_paced(
        sink, "events", _Events(), Freshness(), 1000.0, 1.0, clock=lambda: now[0], sleep=sleep
    )
    assert sent == sink.sent == 1000
    assert took <= 1.05 and sink.flushes <= 55
    assert 19.0 <= behind_ms <= 21.0  # each slice starts one 20 ms flush late, no later
