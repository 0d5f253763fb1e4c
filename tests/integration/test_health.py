"""/healthz and /readyz of real workers against the real embedded broker: ready only once
assigned and restored, not live while the loop is stuck though the HTTP thread still answers,
and a worker started with Kubernetes' service-link variables in its environment (every Service
of the namespace injects them into every pod) starts, serves and is ready."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading

import pytest

from pipeline.broker import free_port
from pipeline.config import MetricsConfig, PathsConfig, UpdaterConfig, to_env
from pipeline.metrics import serve
from tests.integration.support import config_for, event_value, http_get, producer_for, wait_for
from workers.runtime import build_loop
from workers.updater import SPEC as UPDATER

pytestmark = pytest.mark.integration


def test_a_stuck_loop_fails_healthz_while_its_metrics_still_answer(
    kafka_config, topic_factory, data_dir, tmp_path
):
    topics = topic_factory(partitions=2)
    shutil.copytree(data_dir / "models", tmp_path / "models")
    config = config_for(kafka_config, topics, tmp_path).replace(
        metrics=MetricsConfig(liveness_timeout_s=2.0)
    )
    built = build_loop(config, UPDATER)
    loop, handler, metrics = built.loop, built.handler, built.metrics
    port = free_port()
    server = serve(metrics, "127.0.0.1", port, loop.health)
    release = threading.Event()
    handle = handler.handle

    def handle_or_hang(batch, now_ms):  # a handler deadlocked on one record
        if any(getattr(d.message, "event_id", None) == "ev-1" for d in batch):
            release.wait(60)
        return handle(batch, now_ms)

    handler.handle = handle_or_hang
    runner = threading.Thread(target=loop.run, daemon=True)
    try:
        status, body = http_get(port, "/readyz")
        assert status == 503 and "global tables" in body
        loop.prime(timeout_s=30)
        runner.start()
        wait_for(lambda: http_get(port, "/readyz")[0] == 200, 60, "the updater to be assigned")
        assert http_get(port, "/healthz")[0] == 200
        producer = producer_for(kafka_config.bootstrap_servers)
        producer.send(topics.events, key=b"u1", value=event_value(0, "u1", "m1"))
        producer.send(topics.events, key=b"u1", value=event_value(1, "u1", "m2"))
        producer.flush()
        status, body = wait_for(
            lambda: (lambda r: r if r[0] == 503 else None)(http_get(port, "/healthz")),
            30,
            "/healthz to fail while the loop hangs",
        )
        assert "no poll completed" in body
        status, page = http_get(port, "/metrics")
        assert status == 200 and 'streamrec_rebalances_total{worker="updater"} 1.0' in page
        release.set()
        wait_for(lambda: http_get(port, "/healthz")[0] == 200, 30, "/healthz to recover")
    finally:
        release.set()
        loop.stop.set()
        runner.join(timeout=30) if runner.is_alive() else loop.close()
        server.shutdown()
        server.server_close()
        if hasattr(handler, "close"):
            handler.close()


# What a pod in a namespace with Services named streamrec-updater and streamrec-scorer gets.
SERVICE_LINKS = {
    "STREAMREC_UPDATER_SERVICE_HOST": "10.96.0.11",
    "STREAMREC_UPDATER_SERVICE_PORT": "9101",
    "STREAMREC_UPDATER_SERVICE_PORT_METRICS": "9101",
    "STREAMREC_UPDATER_PORT": "tcp://10.96.0.11:9101",
    "STREAMREC_UPDATER_PORT_9101_TCP": "tcp://10.96.0.11:9101",
    "STREAMREC_UPDATER_PORT_9101_TCP_PROTO": "tcp",
    "STREAMREC_UPDATER_PORT_9101_TCP_PORT": "9101",
    "STREAMREC_UPDATER_PORT_9101_TCP_ADDR": "10.96.0.11",
    "STREAMREC_SCORER_SERVICE_HOST": "10.96.0.12",
    "STREAMREC_SCORER_PORT": "tcp://10.96.0.12:9102",
}


def test_a_worker_with_kubernetes_service_links_in_its_environment_starts_and_is_ready(
    kafka_config, topic_factory, data_dir, tmp_path
):
    topics = topic_factory(partitions=2)
    shutil.copytree(data_dir / "models", tmp_path / "models")
    port = free_port()
    config = config_for(kafka_config, topics, tmp_path).replace(
        paths=PathsConfig(str(tmp_path)), updater=UpdaterConfig(metrics_port=port)
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMREC_")}
    env.update(to_env(config))
    env.update(SERVICE_LINKS)
    log = tmp_path / "updater.log"
    with open(log, "wb") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "workers", "updater"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(
            lambda: worker.poll() is not None or http_get(port, "/readyz")[0] == 200,
            120,
            "the updater to be ready",
        )
        assert worker.poll() is None, log.read_text()
        assert http_get(port, "/healthz")[0] == 200
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0, log.read_text()
    text = log.read_text()
    assert "unknown environment variable" not in text
    assert not any(name in text for name in SERVICE_LINKS)
