"""The real embedded Tansu broker: start, readiness, log tail, and stop escalation."""

from __future__ import annotations

import socket
import struct
import time

import pytest

from pipeline.broker import EmbeddedBroker, _recv_exactly, free_port, wait_for_broker
from pipeline.config import BrokerConfig

pytestmark = pytest.mark.integration


def _metadata_probe_on(client: socket.socket) -> None:
    body = struct.pack(">hhih", 3, 1, 9, 4) + b"test" + struct.pack(">i", 0)
    client.sendall(struct.pack(">i", len(body)) + body)
    size = struct.unpack(">i", _recv_exactly(client, 4))[0]
    _recv_exactly(client, size)


def test_start_answers_metadata_and_stop_is_idempotent() -> None:
    broker = EmbeddedBroker(BrokerConfig(port=free_port()))
    with broker:
        assert broker.running()
        wait_for_broker(broker.bootstrap, timeout_s=1)
        assert any("ready" in line for line in broker.log_tail())
        assert repr(broker).startswith(f"EmbeddedBroker({broker.bootstrap}, pid ")
    assert not broker.running()
    assert broker.stop() is None


def test_stop_kills_a_broker_that_waits_for_a_client_that_never_hangs_up() -> None:
    broker = EmbeddedBroker(BrokerConfig(port=free_port())).start()
    with socket.create_connection(("127.0.0.1", broker.cfg.port)) as client:
        _metadata_probe_on(client)  # a connection that has spoken, then stays open
        started = time.monotonic()
        code = broker.stop(grace_s=0.5)  # Tansu ignores SIGTERM while a connection is open
        assert time.monotonic() - started < 3
    assert code == -9


def test_topics_get_min_3_brokers_replicas_and_a_factor_the_cluster_cannot_hold_fails(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The embedded broker lists one broker: the default factor is 1; asking for 2 fails at
    once naming topics.replication_factor, before any topic is created."""
    from pipeline.config import KafkaConfig, TopicsConfig
    from pipeline.errors import ConfigError
    from pipeline.kafka import ensure_topics
    from pipeline.kafka.admin import admin_client

    with EmbeddedBroker(BrokerConfig(port=free_port())) as broker:
        kafka = KafkaConfig(bootstrap_servers=broker.bootstrap)
        with caplog.at_level("INFO", logger="pipeline.kafka.admin"):
            created = ensure_topics(kafka, broker.bootstrap, TopicsConfig(prefix="rf."))
        assert len(created) == 6
        assert "(2 partitions, replication factor 1)" in caplog.text
        admin = admin_client(kafka, broker.bootstrap, 10)
        try:
            described = admin.describe_topics(list(TopicsConfig(prefix="rf.").all()))
            replicas = {len(p["replica_nodes"]) for t in described for p in t["partitions"]}
            assert replicas == {1}
            with pytest.raises(ConfigError, match=r"topics\.replication_factor: 2 is more"):
                ensure_topics(
                    kafka, broker.bootstrap, TopicsConfig(prefix="rf2.", replication_factor=2)
                )
            assert not any(name.startswith("rf2.") for name in admin.list_topics())
        finally:
            admin.close()
