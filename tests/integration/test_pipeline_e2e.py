"""The real updater and scorer against the real embedded broker, fed by a plain kafka-python
producer (an independent client), including malformed events, a SIGKILL during a replay, and a
SIGTERM drain."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import defaultdict

import orjson
import pytest

from pipeline.config import PathsConfig, UpdaterConfig, to_env
from tests.integration.support import (
    NOW_MS,
    WARM_UP_USER,
    WorkerThreads,
    config_for,
    drain,
    event_value,
    producer_for,
    tiny_bench,
    wait_until_serving,
)
from workers.scorer import SPEC as SCORER
from workers.updater import SPEC as UPDATER

pytestmark = pytest.mark.integration


# The serving topologies: updater + scorer, and the updater scoring alone (updater.score).
TOPOLOGIES = {
    "separate": (UpdaterConfig(metrics_port=0, score=False), (UPDATER, SCORER)),
    "colocated": (UpdaterConfig(metrics_port=0, score=True), (UPDATER,)),
}


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_events_in_recommendations_out_with_dlq(kafka_config, topic_factory, data_dir, topology):
    topics = topic_factory()
    updater, workers = TOPOLOGIES[topology]
    config = config_for(kafka_config, topics, data_dir, updater=updater)
    bootstrap = kafka_config.bootstrap_servers
    producer = producer_for(bootstrap)
    # The catalog changes go first: each worker reads the tables to their end before it serves,
    # so every recommendation below already knows m3 is retired.
    producer.send(
        topics.items,
        key=b"new-1",
        value=orjson.dumps(
            {
                "item_id": "new-1",
                "title": "Comedy film brand new",
                "categories": ["Comedy"],
                "ts": NOW_MS,
            }
        ),
    )
    producer.send(
        topics.items,
        key=b"m3",
        value=orjson.dumps({"item_id": "m3", "available": False, "ts": NOW_MS}),
    )
    producer.flush()
    with WorkerThreads(config, workers):
        users = [f"user-{u}" for u in range(6)]
        n = 0
        for _round in range(3):
            for u in users:
                producer.send(
                    topics.events, key=u.encode(), value=event_value(n, u, f"m{(n * 7) % 40}")
                )
                n += 1
        bad = [
            b"{truncated",
            b"[]",
            b"",
            orjson.dumps(
                {"event_id": "x", "user_id": "u", "item_id": "m1", "type": "like", "ts": NOW_MS}
            ),
            b"\xff\xfe",
            orjson.dumps(
                {"event_id": "y", "user_id": "u", "item_id": "m1", "type": "click", "ts": 1_000}
            ),
        ]
        for value in bad:
            producer.send(topics.events, key=b"u", value=value)
        producer.send(
            topics.events, key=b"user-0", value=event_value(999, "user-0", "never-seen-item")
        )
        producer.flush()
        producer.close()
        # user-0's last event is ev-999; the others' are the last round's.
        last_triggers = {f"ev-{n - 6 + i}" for i in range(1, 6)} | {"ev-999"}
        recs = drain(
            bootstrap,
            topics.recommendations,
            lambda vs: last_triggers <= {v["trigger_event_id"] for v in vs},
        )
        letters = drain(bootstrap, topics.dlq, lambda vs: len(vs) >= len(bad))
    assert last_triggers <= {r["trigger_event_id"] for r in recs}
    assert sorted(d["reason"] for d in letters) == sorted(
        ["not_json", "not_object", "empty_value", "invalid_value", "not_utf8", "ts_out_of_range"]
    )
    latest = {}
    for r in recs:
        latest[r["user_id"]] = r
        ids = [i["item_id"] for i in r["items"]]
        assert "m3" not in ids and len(ids) == len(set(ids)) == 10
        assert all(i["reason"]["text"] for i in r["items"])
    assert set(latest) == {f"user-{u}" for u in range(6)}


def _spawn(config, worker):
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMREC_")}
    env.update(to_env(config))
    return subprocess.Popen(
        [sys.executable, "-m", "workers", worker, "--log-level", "WARNING"], env=env
    )


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_sigkill_during_replay_loses_nothing_and_applies_nothing_twice(
    kafka_config, topic_factory, data_dir, tmp_path, topology
):
    topics = topic_factory()
    config = config_for(kafka_config, topics, data_dir).replace(
        paths=PathsConfig(str(tmp_path)),
        updater=UpdaterConfig(
            metrics_port=0, history_length=1000, batch_max_records=50, score=topology == "colocated"
        ),
    )
    # The worker gets its own copy of the registry so its state dir is private.
    import shutil

    shutil.copytree(data_dir / "models", tmp_path / "models")
    bootstrap = kafka_config.bootstrap_servers
    producer = producer_for(bootstrap)
    expected = defaultdict(list)
    total = 3000
    updater = _spawn(config, "updater")
    kills, started_at = 0, 0  # the first event produced since the running updater started

    def answered_since(first):
        """The running updater has published a vector for an event it was not started with."""
        vectors = drain(
            bootstrap,
            topics.user_vectors,
            lambda vs: any(int(v["trigger_event_id"].removeprefix("ev-")) >= first for v in vs),
            timeout_s=90,
        )
        return any(int(v["trigger_event_id"].removeprefix("ev-")) >= first for v in vectors)

    try:
        for i in range(total):
            user = f"u{i % 25}"
            producer.send(
                topics.events, key=user.encode(), value=event_value(i, user, f"m{i % 40}")
            )
            expected[user].append(f"m{i % 40}")
            if i % 200 == 199:
                producer.flush()
                time.sleep(0.1)  # pacing, not synchronising: the kills land mid-stream
            if i in (700, 1500, 2300):
                producer.flush()
                # Kill a worker that is working, not one still starting up.
                assert answered_since(started_at), (
                    f"the updater answered nothing since {started_at}"
                )
                updater.send_signal(signal.SIGKILL)
                updater.wait()
                kills += 1
                updater, started_at = _spawn(config, "updater"), i + 1
        producer.flush()
        last = {f"u{u}": f"ev-{max(i for i in range(total) if i % 25 == u)}" for u in range(25)}
        vectors = drain(
            bootstrap,
            topics.user_vectors,
            lambda vs: set(last.values()) <= {v["trigger_event_id"] for v in vs},
            timeout_s=90,
        )
        recs = (
            drain(
                bootstrap,
                topics.recommendations,
                lambda vs: set(last.values()) <= {v["trigger_event_id"] for v in vs},
            )
            if config.updater.score
            else []
        )
    finally:
        updater.send_signal(signal.SIGTERM)
        updater.wait(timeout=20)
        producer.close()
    assert kills == 3
    final = {}
    for v in vectors:
        if v["trigger_event_id"] == last[v["user_id"]]:
            final[v["user_id"]] = v["history"]
    assert final == dict(expected)  # every event applied exactly once, in order
    if config.updater.score:  # a recommendation produced again is the same one
        assert set(last.values()) <= {r["trigger_event_id"] for r in recs}
        first: dict[str, dict] = {}
        for rec in recs:
            again = first.setdefault(rec["rec_id"], rec)
            assert again["trigger_event_id"] == rec["trigger_event_id"]
            assert [i["item_id"] for i in again["items"]] == [i["item_id"] for i in rec["items"]]


def test_sigterm_drains_and_exits_quickly(kafka_config, topic_factory, data_dir, tmp_path):
    topics = topic_factory()
    import shutil

    shutil.copytree(data_dir / "models", tmp_path / "models")
    config = config_for(kafka_config, topics, tmp_path)
    worker = _spawn(config, "updater")
    producer = producer_for(kafka_config.bootstrap_servers)
    for i in range(200):
        producer.send(topics.events, key=b"u", value=event_value(i, "u", "m1"))
    producer.flush()
    producer.close()
    vectors = drain(
        kafka_config.bootstrap_servers,
        topics.user_vectors,
        lambda vs: any(v["trigger_event_id"] == "ev-199" for v in vs),
    )
    assert vectors
    started = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=15) == 0
    assert time.monotonic() - started < 10.0  # 5 s on a quiet machine; CI boxes are noisy


def test_bench_probe_times_a_running_deployment_from_outside(kafka_config, topic_factory, data_dir):
    """`streamrec bench --mode probe`: events at a fixed rate into the deployment's own topic,
    every one answered by a recommendation, under probe user ids and the registry's items."""
    from workers.lab.bench import probe

    topics = topic_factory()
    config = config_for(kafka_config, topics, data_dir)
    with WorkerThreads(config):
        wait_until_serving(kafka_config.bootstrap_servers, topics)
        result = probe(config, rate=100, duration_s=2, users=20, items=40)
        vectors = [
            v
            for v in drain(
                kafka_config.bootstrap_servers, topics.user_vectors, lambda vs: len(vs) >= 2
            )
            if v["user_id"] != WARM_UP_USER
        ]
    offered = result["offered"]
    assert offered["events"] == 200 and offered["unanswered"] == 0
    assert 0 < offered["p50_ms"] <= offered["p99_ms"] <= offered["max_ms"] < 30_000
    assert result["config"]["item_ids"] == "registry"
    assert all(v["user_id"].startswith("probe-u") for v in vectors)
    assert {h for v in vectors for h in v["history"]} <= {f"m{i}" for i in range(40)}


def test_bench_runs_the_real_workers_and_reports_every_figure(kafka_config, data_dir, tmp_path):
    """`streamrec bench` end to end at a tiny scale: the ceiling, the offered load (latency,
    recommendations/s, consumer lag when producing stopped), saturation with CPU per worker,
    time per stage, and the table a user reads."""
    from workers.lab.bench import format_table

    result = tiny_bench(kafka_config, data_dir, tmp_path, saturation_events=300, ceiling_events=300)
    assert result["config"]["catalog_items"] == 40 and result["config"]["model_version"]
    assert result["ceiling"]["messages"] == 300 and result["ceiling"]["msgs_per_s"] > 0
    offered = result["offered"]
    assert offered["events"] == 200 and offered["unanswered"] == 0
    assert 0 < offered["p50_ms"] <= offered["p99_ms"] <= offered["max_ms"]
    assert offered["recommendations_per_s"] > 0
    assert set(offered["consumer_lag_at_end"]) == {"updater", "scorer"}
    assert all(n >= 0 for n in offered["consumer_lag_at_end"].values())
    saturation = result["saturation"]
    assert saturation["unanswered"] == 0 and saturation["events_per_s"] > 0
    assert saturation["ratio_to_ceiling"] > 0
    assert set(saturation["cpu_seconds_per_1000_events"]) == {"updater", "scorer"}
    for phase in (result["offered"], saturation):  # read from the workers' batch_size metric
        assert set(phase["mean_batch_records"]) == {"updater", "scorer"}
        assert all(n >= 1 for n in phase["mean_batch_records"].values())
    assert {"poll", "encode", "produce"} <= set(result["stage_seconds"]["updater"])
    assert {"poll", "score", "produce"} <= set(result["stage_seconds"]["scorer"])
    table = format_table(result)
    assert "recommendations consumed:" in table and "consumer lag when producing stopped" in table
    assert "saturation:" in table and "ratio to ceiling" in table
