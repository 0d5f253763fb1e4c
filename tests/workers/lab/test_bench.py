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
                "by_minute": [
                    {"from_s": 0.0, "p50_ms": 21.0, "p99_ms": 80.0},
                    {"from_s": 60.0, "p50_ms": 30.0, "p99_ms": 120.0},
                ],
            },
            "user_encodes": {"incremental": 3, "full": 1},
            "saturation": {
                "events_per_s": 900.0,
                "cpu_seconds_per_1000_events": {"updater": 0.2},
                "mean_batch_records": {"updater": 412.5},
            },
        }
    )
    assert "records per micro-batch, saturation: updater 412.5" in table
    assert "ceiling (consume->parse->produce): 18000.0 msg/s" in table
    assert "by 10 s window, p50/p99 ms: 20/90" in table
    assert "by minute, p50/p99 ms: 21/80, 30/120" in table
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


def test_the_catalog_bench_spreads_its_items_and_checks_recall_over_the_asked_users(
    tmp_path, registry
) -> None:
    """Realistic items are mixtures of real texts, not near-copies of them; the isotropic worst
    case is reported beside them; recall is checked exactly over the users asked for."""
    import numpy as np

    from pipeline.ann import Exclusions
    from pipeline.config import ScorerConfig
    from pipeline.encoder_cache import encode_users, item_vectors
    from tests.handlers import memory_config
    from workers.lab.bench.catalog import _measure, catalog_scale, realistic_items

    loaded = registry.load()
    origins = loaded.catalog().text_vectors
    rng = np.random.default_rng(1)
    items, spread = realistic_items(loaded, origins, 5000, rng)
    assert items.shape == (5000, loaded.seq_config.hidden_size)
    assert spread["text_share_above_0.95_to_nearest_origin"] < 0.5
    assert spread["text_nearest_origin_cosine_mean"] < 0.95

    result = catalog_scale(
        memory_config(tmp_path), n_items=5000, n_users=100, exact_users=100, nprobes=(1, 8)
    )
    assert set(result) == {"realistic", "isotropic"}
    for figures in result.values():
        assert figures["items"] == 5000 and figures["exact_users"] == 100
        default = ScorerConfig().ann_nprobe  # the headline: the scorer's own setting
        assert 0.0 <= figures["recall@10"] <= 1.0 and figures["nlist"] == 565  # 8 x sqrt(5000)
        assert [p["nprobe"] for p in figures["nprobe_curve"]] == [1, 8, min(default, 565)]
        assert figures["nprobe"] == min(default, 565) and figures["build_seconds"] >= 0
        assert figures["spread"]["item_nearest_neighbour_cosine_mean"] < 0.99
    assert "target" in result["realistic"] and "target" not in result["isotropic"]
    table = format_table({"catalog": result})
    assert "catalog realistic 5,000 items" in table and "catalog isotropic 5,000 items" in table
    assert "over 100 users" in table

    # every cell probed: the ANN path is exact, so recall over the 100 users is 1.0
    catalog = loaded.catalog()
    histories = [rng.integers(0, len(catalog), 5).tolist() for _ in range(100)]
    users = encode_users(loaded, histories, [[1] * 5] * 100, item_vectors(loaded, catalog))
    available = np.ones(5000, dtype=bool)
    excluded = [rng.integers(0, 5000, 20) for _ in range(100)]
    full = _measure(
        items, users, Exclusions(available, excluded), excluded, available, 60, [10**6], 32
    )
    assert full["nprobe_curve"][-1]["nprobe"] == full["nlist"]
    assert full["nprobe_curve"][-1]["recall@10"] == 1.0 and full["exact_users"] == 60
