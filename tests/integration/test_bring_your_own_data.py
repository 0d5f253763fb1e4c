"""The user's own data on the real broker: `streamrec replay --items --events` produces their
files (items first, then events in time order), `streamrec bootstrap --from-topics` trains on
what the topics hold without joining a group, publishes a model whose item index holds the
produced items and announces it; and the read that feeds it ends even while producers go on."""

from __future__ import annotations

import dataclasses
import threading
import time

import orjson
import pytest

from pipeline.config import Config, ModelConfig, PathsConfig, TrainingConfig
from pipeline.kafka import KafkaSink
from pipeline.kafka.snapshot import read_to_end
from pipeline.registry import ModelRegistry
from tests.integration.support import drain, up_flags, wait_for
from tests.workers.test_bootstrap_own import TINY, write_own_files
from workers.bootstrap import run_own
from workers.replay import run as run_replay

pytestmark = pytest.mark.integration

TINY_MODEL = ModelConfig(hidden_size=16, num_layers=1, num_heads=1, max_length=20)
TINY_TRAINING = TrainingConfig(epochs=2, device="cpu")


def _config(kafka_config, topics, data_dir):
    return Config(
        kafka=kafka_config,
        topics=topics,
        paths=PathsConfig(str(data_dir)),
        model=TINY_MODEL,
        training=TINY_TRAINING,
    )


def test_replay_files_then_bootstrap_from_topics(kafka_config, topic_factory, tmp_path, capsys):
    topics = topic_factory(partitions=2)
    config = _config(kafka_config, topics, tmp_path / "data")
    data, items, events = write_own_files(tmp_path, n_events=600, gz_events=False)

    run_replay(config, dataset="ml-100k", items_path=str(items), events_path=str(events))
    out = capsys.readouterr().out
    assert f"replayed {len(data.events)} events" in out and "2 invalid" in out
    produced = drain(
        kafka_config.bootstrap_servers,
        topics.events,
        lambda vs: len(vs) >= len(data.events),
        timeout_s=60,
    )
    assert len(produced) == len(data.events)
    by_user: dict[str, list[int]] = {}
    for value in produced:  # each user's partition holds their events in time order
        by_user.setdefault(value["user_id"], []).append(value["ts"])
    assert all(ts == sorted(ts) for ts in by_user.values())
    catalog = drain(
        kafka_config.bootstrap_servers,
        topics.items,
        lambda vs: len(vs) >= len(data.items),
        timeout_s=30,
    )
    assert {v["item_id"] for v in catalog} == {i.item_id for i in data.items}

    with KafkaSink(kafka_config, kafka_config.bootstrap_servers) as sink:  # two bad records
        sink.send(topics.events, b"u", b"not json")
        sink.send(topics.items, b"i", orjson.dumps({"item_id": "no-title", "ts": 1}))
        sink.flush(30)

    update = run_own(config, from_topics=True, progress=False)
    out = capsys.readouterr().out
    assert f"{len(data.events)} valid events of {len(data.events) + 1} records" in out
    assert f"{len(data.items)} valid items of {len(data.items) + 1} records" in out
    registry = ModelRegistry(tmp_path / "data" / "models")
    assert registry.current_version() == update.version
    loaded = registry.load()
    assert set(loaded.item_ids) <= {i.item_id for i in data.items}
    assert len(loaded.item_ids) >= 0.9 * len(data.items)
    assert loaded.manifest["trained_on_events"] == len(data.events)
    assert "unmasked_ndcg@10" in loaded.manifest["metrics"]
    announced = drain(
        kafka_config.bootstrap_servers, topics.model_updates, lambda vs: len(vs) >= 1, timeout_s=30
    )
    assert [u["version"] for u in announced] == [update.version]


def test_reading_the_topics_ends_while_producers_go_on(kafka_config, topic_factory):
    topics = topic_factory(partitions=2)
    before = 500
    with KafkaSink(
        dataclasses.replace(kafka_config, linger_ms=20), kafka_config.bootstrap_servers
    ) as sink:
        for n in range(before):
            sink.send(topics.events, f"u{n % 9}".encode(), b'{"n": %d}' % n)
        sink.flush(30)
    stop = threading.Event()
    sent = [before]

    def keep_producing() -> None:
        with KafkaSink(kafka_config, kafka_config.bootstrap_servers) as more:
            while not stop.is_set():
                more.send(topics.events, b"late", b'{"late": true}')
                more.flush(30)
                sent[0] += 1

    producer = threading.Thread(target=keep_producing, daemon=True)
    producer.start()
    try:
        wait_for(lambda: sent[0] >= before + 20, 30, "the producer to get going", interval_s=0.05)
        started = time.monotonic()
        records = read_to_end(
            kafka_config,
            kafka_config.bootstrap_servers,
            [topics.events, topics.items],
            timeout_s=60,
        )
        seconds = time.monotonic() - started
        later = sent[0]
        wait_for(lambda: sent[0] > later, 30, "the producer to go on after the read")
    finally:
        stop.set()
        producer.join(30)
    assert seconds < 30
    assert before + 20 <= len(records) <= later  # what was there at the start, not forever
    assert sent[0] > len(records)
    offsets = {}
    for r in records:
        assert r.offset == offsets.get(r.partition, -1) + 1  # every partition from its start
        offsets[r.partition] = r.offset


def test_up_on_an_empty_registry_serves_the_first_model_bootstrapped_later(tmp_path):
    """`streamrec up` with no model trains nothing, says how to bootstrap and runs the workers;
    the user's files are replayed, `bootstrap --from-topics` publishes and announces a model,
    and the running workers (never restarted) recommend with it."""
    import os
    import signal
    import subprocess
    import sys

    from pipeline.broker import free_port, wait_for_broker

    data, items, events = write_own_files(tmp_path, n_events=600, gz_events=False)
    port = free_port()
    common = [*up_flags(port, tmp_path / "data"), "--topics-prefix", "byod."]
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMREC_")}
    log_path = tmp_path / "up.log"
    with open(log_path, "wb") as log_file:
        up = subprocess.Popen(
            [sys.executable, "-m", "workers", "up", *common, *TINY],
            env=env,
            stderr=log_file,
            stdout=log_file,
        )
    bootstrap = f"127.0.0.1:{port}"
    try:
        wait_for_broker(bootstrap, 60)
        wait_for(
            lambda: log_path.read_text().count(" ready: ") >= 2,
            120,
            "the updater (scoring) and the fine-tune worker ready without a model",
        )
        text = log_path.read_text()
        assert "streamrec bootstrap --items" in text and "--from-topics" in text
        assert "bootstrap ml-100k" not in text and "bootstrapping" not in text

        def cli(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                [sys.executable, "-m", "workers", *args, *common, *TINY],
                env=env,
                timeout=300,
                capture_output=True,
                text=True,
            )

        replay = cli("replay", "--items", str(items), "--events", str(events))
        assert replay.returncode == 0, replay.stderr
        # Before any model, the replayed events are answered with trending items (waited for:
        # a model announced first would answer them itself).
        early = drain(
            bootstrap,
            "byod.recommendations",
            lambda vs: any(v["model_version"] == "trending" and v["items"] for v in vs),
            120,
        )
        assert any(r["model_version"] == "trending" and r["items"] for r in early)
        boot = cli("bootstrap", "--from-topics")
        assert boot.returncode == 0, boot.stderr
        assert "announced v000001" in boot.stdout

        user = data.events[-1].user_id
        with KafkaSink(Config().kafka, bootstrap) as sink:
            sink.send(
                "byod.events",
                user.encode(),
                orjson.dumps(
                    {
                        "event_id": "canary",
                        "user_id": user,
                        "item_id": data.items[0].item_id,
                        "type": "click",
                        "ts": int(time.time() * 1000),
                    }
                ),
            )
            sink.flush(30)
        recs = drain(
            bootstrap,
            "byod.recommendations",
            lambda vs: any(v["trigger_event_id"] == "canary" for v in vs),
            120,
        )
        (canary,) = [r for r in recs if r["trigger_event_id"] == "canary"]
        # v000001, or v000002 when the early first fine-tune (600 events stored, over
        # finetune.first_after_events) was promoted first: a model either way.
        assert canary["model_version"] in ("v000001", "v000002") and canary["items"]
        # Users held before the model came were re-scored under it when it arrived.
        assert any(r.get("trigger") == "model_swap" for r in recs)
        assert "exited with code" not in log_path.read_text()  # no worker restarted
    finally:
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=60) == 0
