"""The updater across a consumer-group rebalance and across a broker that lost its data."""

from __future__ import annotations

import shutil
import threading
import time
from collections import defaultdict

import pytest
from kafka import KafkaProducer

from pipeline.config import KafkaConfig, PathsConfig, UpdaterConfig
from pipeline.kafka import ensure_topics
from tests.integration.support import config_for, drain, event_value
from workers import updater
from workers.runtime import build_loop

pytestmark = pytest.mark.integration


class UpdaterThread:
    """One updater instance in a thread, with its handler and metrics reachable by the test."""

    def __init__(self, config):
        self.stop = threading.Event()
        built = build_loop(config, updater.SPEC, stop=self.stop)
        self.loop, self.handler, self.metrics = built.loop, built.handler, built.metrics
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def broker_resets(self):
        """As a scrape reads it: through the metrics' public registry."""
        value = self.metrics.registry.get_sample_value(
            "streamrec_broker_resets_total", {"worker": "updater"}
        )
        return value or 0.0

    def _run(self):
        try:
            self.loop.prime(30)
            self.loop.run()
        except BaseException as exc:
            self.error = exc
        finally:
            self.handler.close()

    def close(self):
        self.stop.set()
        self.thread.join(timeout=30)
        assert self.error is None, self.error


def _send(producer, topics, expected, start, n, users=12):
    for i in range(start, start + n):
        user = f"u{i % users}"
        producer.send(topics.events, key=user.encode(), value=event_value(i, user, f"m{i % 40}"))
        expected[user].append(f"m{i % 40}")
    producer.flush()


def _final_histories(bootstrap, topics, last_ids, timeout_s=60):
    vectors = drain(
        bootstrap,
        topics.user_vectors,
        lambda vs: set(last_ids.values()) <= {v["trigger_event_id"] for v in vs},
        timeout_s=timeout_s,
    )
    return {
        v["user_id"]: v["history"]
        for v in vectors
        if v["trigger_event_id"] == last_ids.get(v["user_id"])
    }


def _latest_histories(bootstrap, topics, expected, timeout_s=60):
    """Each user's newest user vector's history, once it holds as many entries as expected.

    After a broker loss a user's last event can be applied before earlier ones that the rewind
    re-reads (records fetched before the client saw the new topic id), so the vector that the
    last event triggered may predate the full history; the newest vector has it."""

    def newest(values):
        return {v["user_id"]: v["history"] for v in values}  # one partition per user: in order

    def complete(values):
        got = newest(values)
        return all(len(got.get(user, ())) >= len(h) for user, h in expected.items())

    vectors = drain(bootstrap, topics.user_vectors, complete, timeout_s=timeout_s)
    return newest(vectors)


def _last_ids(total, users=12):
    return {f"u{u}": f"ev-{max(i for i in range(total) if i % users == u)}" for u in range(users)}


def test_rebalance_moves_partitions_and_their_state(
    kafka_config, topic_factory, data_dir, tmp_path
):
    topics = topic_factory()
    shutil.copytree(data_dir / "models", tmp_path / "models")
    config = config_for(kafka_config, topics, tmp_path).replace(
        updater=UpdaterConfig(metrics_port=0, history_length=500, batch_max_records=20)
    )
    producer = KafkaProducer(bootstrap_servers=kafka_config.bootstrap_servers, linger_ms=1)
    expected = defaultdict(list)
    first = UpdaterThread(config)
    try:
        _send(producer, topics, expected, 0, 300)
        second = UpdaterThread(config)  # joins: partitions split between the two
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (second.handler.states and first.handler.states):
            _send(producer, topics, expected, sum(map(len, expected.values())), 12)
            time.sleep(0.5)
        assert second.handler.states and first.handler.states, "partitions were not split"
        _send(producer, topics, expected, sum(map(len, expected.values())), 300)
        first.close()  # leaves: its partitions (and their stored state) move to the second
        total = sum(map(len, expected.values()))
        _send(producer, topics, expected, total, 300)
        total += 300
        histories = _final_histories(kafka_config.bootstrap_servers, topics, _last_ids(total))
        assert histories == dict(expected)
        assert len(second.handler.states) == topics.partitions
    finally:
        producer.close()
        for worker in (first, locals().get("second")):
            if worker is not None and worker.thread.is_alive():
                worker.close()


def _own_broker(broker_factory, data_dir, tmp_path, prefix, partitions):
    """A broker of the test's own (it will be killed), its topics, and an updater config."""
    from pipeline.config import TopicsConfig

    broker = broker_factory()
    kafka = KafkaConfig(
        bootstrap_servers=broker.bootstrap,
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
        request_timeout_ms=10_000,
    )
    shutil.copytree(data_dir / "models", tmp_path / "models")
    topics = TopicsConfig(prefix=prefix, partitions=partitions)
    ensure_topics(kafka, broker.bootstrap, topics)
    config = config_for(kafka, topics, tmp_path).replace(
        paths=PathsConfig(str(tmp_path)), updater=UpdaterConfig(metrics_port=0, history_length=500)
    )
    return broker, kafka, topics, config


def _send_and_apply(bootstrap, topics, expected, n):
    """Events 0..n-1 to the broker at `bootstrap`, then until the updater has applied them all."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=1)
    _send(producer, topics, expected, 0, n)
    _final_histories(bootstrap, topics, _last_ids(n))
    producer.close()


def _lose_data(broker_factory, broker, kafka, topics):
    """Kill `broker` and start an empty one on its port, with the topics created again."""
    port = int(broker.bootstrap.rsplit(":", 1)[1])
    broker.kill()
    restarted = broker_factory(port=port)  # comes back empty
    ensure_topics(kafka, restarted.bootstrap, topics)
    return restarted


def test_broker_that_lost_its_data_is_detected_and_user_state_kept(
    broker_factory, data_dir, tmp_path
):
    # 4 partitions: what Tansu gives a topic that a reconnecting consumer's metadata request
    # recreates before ensure_topics runs (a known, documented race this test is not about).
    broker, kafka, topics, config = _own_broker(broker_factory, data_dir, tmp_path, "reset.", 4)
    worker = UpdaterThread(config)
    expected = defaultdict(list)
    try:
        _send_and_apply(broker.bootstrap, topics, expected, 240)
        restarted = _lose_data(broker_factory, broker, kafka, topics)
        producer = KafkaProducer(bootstrap_servers=restarted.bootstrap, linger_ms=1)
        # The new log grows past the old offsets (~60 per partition) before the updater is
        # likely back: resuming from those offsets would skip the first records of each one.
        _send(producer, topics, expected, 240, 600)
        deadline = time.monotonic() + 30
        while worker.broker_resets() == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert worker.broker_resets() >= 1
        histories = _latest_histories(restarted.bootstrap, topics, expected)
        producer.close()
        # State from before the loss is kept; everything produced after it is applied once.
        assert histories == dict(expected)
    finally:
        worker.close()


def test_a_log_lost_while_the_updater_was_down_is_read_from_its_start(
    broker_factory, data_dir, tmp_path
):
    """The broker loses its data while no updater runs, and the new log grows past the stored
    offsets before one comes back: the topic id stored with the offsets no longer matches, so
    the new log is read from 0 and nothing produced after the loss is skipped."""
    broker, kafka, topics, config = _own_broker(broker_factory, data_dir, tmp_path, "away.", 2)
    expected = defaultdict(list)
    worker = UpdaterThread(config)
    try:
        _send_and_apply(broker.bootstrap, topics, expected, 120)
    finally:
        worker.close()
    restarted = _lose_data(broker_factory, broker, kafka, topics)  # while no updater runs
    producer = KafkaProducer(bootstrap_servers=restarted.bootstrap, linger_ms=1)
    _send(producer, topics, expected, 120, 400)  # ~200 per partition, past the stored ~60
    producer.close()
    worker = UpdaterThread(config)
    try:
        histories = _latest_histories(restarted.bootstrap, topics, expected)
        assert histories == dict(expected)
        assert worker.broker_resets() >= 1
    finally:
        worker.close()
