"""Session fixtures for integration tests against a real embedded Tansu broker.

`broker` (one per session), `kafka_config`, `topic_factory` (fresh topic prefix per call) and
`broker_factory` (private brokers a test may kill and restart). Tests own their ports, wait
on deadlines, and leave no process behind.
"""

from __future__ import annotations

import gc
import uuid
import warnings
from collections.abc import Callable, Iterator

import pytest

from pipeline.broker import EmbeddedBroker, free_port
from pipeline.config import BrokerConfig, KafkaConfig, TopicsConfig
from pipeline.kafka import ensure_topics

# Group joins take ~3 s on Tansu with these; kafka-python defaults take ~20 s.
_FAST_GROUP = {
    "session_timeout_ms": 6000,
    "heartbeat_interval_ms": 1000,
    "max_poll_interval_ms": 30_000,
    "request_timeout_ms": 10_000,
}
# Tansu waits on SIGTERM for clients that never hung up; its memory holds nothing worth a wait.
_STOP_GRACE_S = 1.0


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap address of a session-wide embedded broker on a free port."""
    log_path = tmp_path_factory.mktemp("broker") / "tansu.log"
    running = EmbeddedBroker(BrokerConfig(port=free_port()), log_path=log_path).start()
    try:
        yield running.bootstrap
    finally:
        running.stop(grace_s=_STOP_GRACE_S)


@pytest.fixture(scope="session")
def kafka_config(broker: str) -> KafkaConfig:
    return KafkaConfig(bootstrap_servers=broker, client_id="streamrec-test", **_FAST_GROUP)


@pytest.fixture
def topic_factory(kafka_config: KafkaConfig) -> Callable[..., TopicsConfig]:
    """Call it to get a TopicsConfig with a unique prefix whose six topics exist."""

    def make(partitions: int = 4, *, create: bool = True) -> TopicsConfig:
        topics = TopicsConfig(prefix=f"t{uuid.uuid4().hex[:10]}.", partitions=partitions)
        if create:
            ensure_topics(kafka_config, kafka_config.bootstrap_servers, topics)
        return topics

    return make


@pytest.fixture
def broker_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., EmbeddedBroker]]:
    """Start private brokers (`broker_factory(port=None)`); all are stopped at teardown."""
    started: list[EmbeddedBroker] = []

    def make(port: int | None = None) -> EmbeddedBroker:
        log_path = tmp_path_factory.mktemp("broker") / "tansu.log"
        running = EmbeddedBroker(BrokerConfig(port=port or free_port()), log_path=log_path)
        started.append(running)
        return running.start()

    yield make
    for running in started:
        running.stop(grace_s=_STOP_GRACE_S)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> object:
    """After a test that stopped brokers under live clients, close leaked sockets quietly.

    kafka-python 3.0.12 leaks the socket of every refused connect (kafka/net/inet.py); the
    captured log records keep them alive until the test is over, so collect here.
    """
    result = yield
    if "broker_factory" in getattr(item, "fixturenames", ()):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "unclosed <socket.socket", ResourceWarning)
            gc.collect()
    return result


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory):
    """A data dir whose registry holds a small random model over 40 items with MiniLM text."""
    from tests.integration.support import make_data_dir

    return make_data_dir(tmp_path_factory.mktemp("data"))
