"""The real updater and scorer against the real embedded broker, fed by a plain kafka-python
producer (an independent client), including malformed events, a SIGKILL during a replay, and a
SIGTERM drain."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict

import orjson
import pytest
import torch
from kafka import KafkaConsumer, KafkaProducer

from pipeline.config import Config, PathsConfig, ScorerConfig, UpdaterConfig, to_env
from pipeline.items import Catalog, TextEncoder
from pipeline.messages import Item
from pipeline.model import SeqRecConfig, SeqRecModel
from pipeline.registry import ModelRegistry
from workers.runtime import run_worker

pytestmark = pytest.mark.integration

NOW_MS = int(time.time() * 1000)
GENRES = ["Action", "Comedy", "Drama", "Horror", "Romance"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A data dir whose registry holds a small random model over 40 items with real MiniLM text."""
    root = tmp_path_factory.mktemp("data")
    torch.manual_seed(0)
    items = [Item(f"m{i}", NOW_MS - 60_000, title=f"{GENRES[i % 5]} film number {i}",
                  categories=(GENRES[i % 5],)) for i in range(40)]
    encoder = TextEncoder(None, root / "cache" / "text")
    catalog = Catalog()
    catalog.upsert(items, encoder.encode([i.text() for i in items]))
    seq = SeqRecConfig(num_items=40, hidden_size=32, num_layers=1, num_heads=2, max_length=20)
    ModelRegistry(root / "models").publish(SeqRecModel(seq).eval(), seq, [i.item_id for i in items],
                                           catalog.meta(), {}, None, 0,
                                           text_vectors=catalog.text_vectors)
    return root


def _config(kafka_config, topics, data_dir, **sections):
    return Config(kafka=kafka_config, topics=topics, paths=PathsConfig(str(data_dir)),
                  updater=sections.get("updater", UpdaterConfig(metrics_port=0)),
                  scorer=sections.get("scorer", ScorerConfig(metrics_port=0, epsilon=0.1)))


def _producer(bootstrap):
    return KafkaProducer(bootstrap_servers=bootstrap, linger_ms=1)


def _event(i, user, item, ts=None):
    return orjson.dumps({"event_id": f"ev-{i}", "user_id": user, "item_id": item, "type": "click",
                         "ts": ts or NOW_MS - 10_000 + i})


def _drain(bootstrap, topic, until, timeout_s=60.0):
    """Read `topic` from the beginning until `until(values)` is true or the deadline passes."""
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             enable_auto_commit=False, group_id=None, fetch_max_wait_ms=50)
    values = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=200).values():
                values.extend(orjson.loads(r.value) for r in batch)
            if until(values):
                return values
    finally:
        consumer.close()
    return values


class WorkerThreads:
    def __init__(self, config, names=("updater", "scorer")):
        self.stop = threading.Event()
        self.errors = []
        self.threads = [threading.Thread(target=self._run, args=(config, n), daemon=True)
                        for n in names]

    def _run(self, config, name):
        try:
            run_worker(config, name, stop=self.stop)
        except BaseException as exc:  # surfaced by the test
            self.errors.append(exc)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)
        assert not self.errors, self.errors


def test_events_in_recommendations_out_with_dlq(kafka_config, topic_factory, data_dir):
    topics = topic_factory()
    config = _config(kafka_config, topics, data_dir)
    bootstrap = kafka_config.bootstrap_servers
    with WorkerThreads(config):
        producer = _producer(bootstrap)
        producer.send(topics.items, key=b"new-1", value=orjson.dumps(
            {"item_id": "new-1", "title": "Comedy film brand new", "categories": ["Comedy"], "ts": NOW_MS}))
        producer.send(topics.items, key=b"m3", value=orjson.dumps({"item_id": "m3", "available": False, "ts": NOW_MS}))
        producer.flush()
        time.sleep(1.0)
        users = [f"user-{u}" for u in range(6)]
        n = 0
        for round_ in range(3):
            for u in users:
                producer.send(topics.events, key=u.encode(), value=_event(n, u, f"m{(n * 7) % 40}"))
                n += 1
        bad = [b"{truncated", b"[]", b"", orjson.dumps({"event_id": "x", "user_id": "u", "item_id": "m1",
                                                       "type": "like", "ts": NOW_MS}),
               b"\xff\xfe", orjson.dumps({"event_id": "y", "user_id": "u", "item_id": "m1",
                                          "type": "click", "ts": 1_000})]
        for value in bad:
            producer.send(topics.events, key=b"u", value=value)
        producer.send(topics.events, key=b"user-0", value=_event(999, "user-0", "never-seen-item"))
        producer.flush()
        producer.close()
        # user-0's last event is ev-999; the others' are the last round's.
        last_triggers = {f"ev-{n - 6 + i}" for i in range(1, 6)} | {"ev-999"}
        recs = _drain(bootstrap, topics.recommendations,
                      lambda vs: last_triggers <= {v["trigger_event_id"] for v in vs})
        letters = _drain(bootstrap, topics.dlq, lambda vs: len(vs) >= len(bad))
    assert last_triggers <= {r["trigger_event_id"] for r in recs}
    assert sorted(d["reason"] for d in letters) == sorted(
        ["not_json", "not_object", "empty_value", "invalid_value", "not_utf8", "ts_out_of_range"])
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
    return subprocess.Popen([sys.executable, "-m", "workers", worker, "--log-level", "WARNING"],
                            env=env)


def test_sigkill_during_replay_loses_nothing_and_applies_nothing_twice(kafka_config, topic_factory,
                                                                      data_dir, tmp_path):
    topics = topic_factory()
    config = _config(kafka_config, topics, data_dir).replace(
        paths=PathsConfig(str(tmp_path)),
        updater=UpdaterConfig(metrics_port=0, history_length=1000, batch_max_records=50))
    # The worker gets its own copy of the registry so its state dir is private.
    import shutil

    shutil.copytree(data_dir / "models", tmp_path / "models")
    bootstrap = kafka_config.bootstrap_servers
    producer = _producer(bootstrap)
    expected = defaultdict(list)
    total = 3000
    updater = _spawn(config, "updater")
    kills = 0
    try:
        for i in range(total):
            user = f"u{i % 25}"
            producer.send(topics.events, key=user.encode(), value=_event(i, user, f"m{i % 40}"))
            expected[user].append(f"m{i % 40}")
            if i % 200 == 199:
                producer.flush()
                time.sleep(0.1)
            if i in (700, 1500, 2300):
                time.sleep(1.0)
                updater.send_signal(signal.SIGKILL)
                updater.wait()
                kills += 1
                updater = _spawn(config, "updater")
        producer.flush()
        last = {f"u{u}": f"ev-{max(i for i in range(total) if i % 25 == u)}" for u in range(25)}
        vectors = _drain(bootstrap, topics.user_vectors,
                         lambda vs: set(last.values()) <= {v["trigger_event_id"] for v in vs},
                         timeout_s=90)
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


def test_sigterm_drains_and_exits_quickly(kafka_config, topic_factory, data_dir, tmp_path):
    topics = topic_factory()
    import shutil

    shutil.copytree(data_dir / "models", tmp_path / "models")
    config = _config(kafka_config, topics, tmp_path)
    worker = _spawn(config, "updater")
    producer = _producer(kafka_config.bootstrap_servers)
    for i in range(200):
        producer.send(topics.events, key=b"u", value=_event(i, "u", "m1"))
    producer.flush()
    producer.close()
    vectors = _drain(kafka_config.bootstrap_servers, topics.user_vectors,
                     lambda vs: any(v["trigger_event_id"] == "ev-199" for v in vs))
    assert vectors
    started = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=15) == 0
    assert time.monotonic() - started < 5.0
