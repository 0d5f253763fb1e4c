"""Continual learning on the real broker: the fine-tune worker promotes a version, the updater and
scorer hot-swap to it under traffic from an independent kafka-python producer, and
`streamrec model rollback` brings every running worker back."""

from __future__ import annotations

import shutil

import pytest

from pipeline.config import FinetuneConfig, ScorerConfig, TrainingConfig
from tests.integration.support import WITH_FINETUNE, WorkerThreads, config_for
from tests.integration.support import drain as _drain
from tests.integration.support import event_value as _event
from tests.integration.support import producer_for as _producer
from workers.cli import main

pytestmark = pytest.mark.integration


def test_promote_swap_under_traffic_then_roll_back(kafka_config, topic_factory, data_dir, tmp_path):
    data_dir = shutil.copytree(data_dir, tmp_path / "data")  # this test publishes and rolls back
    topics = topic_factory(partitions=2)
    config = config_for(
        kafka_config,
        topics,
        data_dir,
        scorer=ScorerConfig(metrics_port=0),
        finetune=FinetuneConfig(
            metrics_port=0, every_events=60, every_seconds=1e6, promote_tolerance=1.0, epochs=1
        ),
        training=TrainingConfig(device="cpu", batch_size=32),
    )
    bootstrap = kafka_config.bootstrap_servers
    producer = _producer(bootstrap)

    def send(start, n):
        for i in range(start, start + n):
            producer.send(
                topics.events,
                key=f"u{i % 8}".encode(),
                value=_event(i, f"u{i % 8}", f"m{(i * 7) % 40}"),
            )
        producer.flush()

    def answer_to(event_id):
        """The recommendation triggered by `event_id`, once it is on the topic."""
        recs = _drain(
            bootstrap,
            topics.recommendations,
            lambda vs: any(v["trigger_event_id"] == event_id for v in vs),
        )
        return next(r for r in recs if r["trigger_event_id"] == event_id)

    with WorkerThreads(config, WITH_FINETUNE):
        send(0, 8)  # every worker has joined its group once these are recommended on
        _drain(
            bootstrap,
            topics.recommendations,
            lambda vs: any(v["trigger_event_id"] == "ev-7" for v in vs),
        )
        send(8, 62)
        updates = _drain(
            bootstrap,
            topics.model_updates,
            lambda vs: any(v["version"] == "v000002" for v in vs),
            timeout_s=40,
        )
        assert any(v["version"] == "v000002" and v["parent_version"] == "v000001" for v in updates)
        recs = _drain(
            bootstrap,
            topics.recommendations,
            lambda vs: any(v.get("trigger") == "model_swap" for v in vs),
        )
        swapped = [r for r in recs if r.get("trigger") == "model_swap"]
        assert swapped and all(
            r["model_version"] == "v000002" and r["trigger_event_id"] is None for r in swapped
        )
        send(70, 8)
        assert answer_to("ev-77")["model_version"] == "v000002"
        argv = [
            "model",
            "rollback",
            "v000001",
            "--paths-data-dir",
            str(data_dir),
            "--kafka-bootstrap-servers",
            bootstrap,
            "--topics-prefix",
            topics.prefix,
        ]
        assert main(argv) == 0
        # Both workers have swapped back once a re-scored user's recommendation is under v1.
        _drain(
            bootstrap,
            topics.recommendations,
            lambda vs: any(
                v.get("trigger") == "model_swap" and v["model_version"] == "v000001" for v in vs
            ),
        )
        send(78, 4)
        assert answer_to("ev-81")["model_version"] == "v000001"
    producer.close()
