"""Security basics (issue 7): one client-security config reaches every Kafka client; SASL over
plaintext needs an opt-in; a sentinel secret never shows in logs (DEBUG), metrics, dead letters,
exceptions or config dumps; metrics bind to 127.0.0.1 and never label series with ids."""

from __future__ import annotations

import logging
from typing import ClassVar

import orjson
import pytest
from prometheus_client import generate_latest

import pipeline.kafka as kafka_adapter
from pipeline.codec import Codec, encode
from pipeline.config import Config, KafkaConfig, ValidationConfig, load
from pipeline.errors import ConfigError, InvalidMessage, StreamrecError
from pipeline.loop import ConsumerLoop, Output
from pipeline.memorybus import MemoryBus, MemorySink, MemorySource
from pipeline.messages import Record
from pipeline.metrics import WorkerMetrics
from tests.handlers import NoopHandler
from tests.pipeline.conftest import sasl_plaintext_config, sasl_ssl_config

SENTINEL_SASL = "sentinel-sasl-Zq81"
SENTINEL_SSL = "sentinel-ssl-Kp42"
_SECURITY_KEYS = (
    "security_protocol",
    "sasl_mechanism",
    "sasl_plain_username",
    "sasl_plain_password",
    "ssl_cafile",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_password",
    "ssl_check_hostname",
)


def _secure() -> KafkaConfig:
    return sasl_ssl_config(SENTINEL_SASL, SENTINEL_SSL, bootstrap_servers="b1:9093")


class _FakeClient:
    """Stands in for a kafka-python client: records its kwargs and logs them at DEBUG, as
    kafka-python does on construction."""

    made: ClassVar[list[tuple[str, dict]]] = []

    def __init__(self, *topics, **kwargs):
        _FakeClient.made.append((type(self).__name__, kwargs))
        logging.getLogger("kafka.fake").debug("Starting with configuration: %s", kwargs)

    def __getattr__(self, name):
        return lambda *a, **k: set()


class FakeProducer(_FakeClient):
    pass


class FakeConsumer(_FakeClient):
    pass


class FakeAdmin(_FakeClient):
    pass


@pytest.fixture
def fake_clients(monkeypatch):
    _FakeClient.made = []
    for module, name, fake in [
        (kafka_adapter.sink, "KafkaProducer", FakeProducer),
        (kafka_adapter.source, "KafkaConsumer", FakeConsumer),
        (kafka_adapter.table, "KafkaConsumer", FakeConsumer),
        (kafka_adapter.admin, "KafkaAdminClient", FakeAdmin),
    ]:
        monkeypatch.setattr(module, name, fake)
    return _FakeClient.made


def test_one_security_config_reaches_every_producer_consumer_and_admin(fake_clients, caplog):
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="kafka")  # the CLI raises it to WARNING in-process
    cfg = _secure()
    kafka_adapter.KafkaSink(cfg, "b1:9093", client_id="p")._client()
    kafka_adapter.KafkaSource(cfg, "b1:9093", "g", ["t"], client_id="c")._client()
    kafka_adapter.TableReader(cfg, "b1:9093", ["t"], client_id="r")._client()
    kafka_adapter.admin.admin_client(cfg, "b1:9093", 1.0)
    kinds = [kind for kind, _ in fake_clients]
    assert sorted(kinds) == ["FakeAdmin", "FakeConsumer", "FakeConsumer", "FakeProducer"]
    expected = {
        k: v
        for k, v in kafka_adapter.client_settings(cfg, "b1:9093").items()
        if k in _SECURITY_KEYS
    }
    assert expected["sasl_plain_password"] == SENTINEL_SASL
    for kind, kwargs in fake_clients:
        assert {k: kwargs.get(k) for k in expected} == expected, kind
    assert all(
        kw.get("allow_auto_create_topics") is False
        for kind, kw in fake_clients
        if kind == "FakeConsumer"
    )
    assert [kw.get("compression_type") for kind, kw in fake_clients if kind == "FakeProducer"] == [
        kafka_adapter.sink.producer_compression(cfg.compression_type)
    ]
    # ...and kafka-python's DEBUG line with those kwargs shows no secret.
    text = caplog.text
    assert SENTINEL_SASL not in text and SENTINEL_SSL not in text and "***" in text


def test_passthrough_settings_reach_every_client_that_knows_them(fake_clients):
    cfg = load(
        env={
            "STREAMREC_KAFKA_PYTHON_CONNECTIONS_MAX_IDLE_MS": "60000",
            "STREAMREC_KAFKA_PYTHON_CHECK_CRCS": "false",
            "STREAMREC_KAFKA_PYTHON_DELIVERY_TIMEOUT_MS": "90000",
        }
    ).kafka
    kafka_adapter.KafkaSink(cfg, "b1:9093", client_id="p")._client()
    kafka_adapter.KafkaSource(cfg, "b1:9093", "g", ["t"], client_id="c")._client()
    kafka_adapter.TableReader(cfg, "b1:9093", ["t"], client_id="r")._client()
    kafka_adapter.admin.admin_client(cfg, "b1:9093", 1.0)
    seen = {
        (kind, key): kw[key]
        for kind, kw in fake_clients
        for key in ("connections_max_idle_ms", "check_crcs", "delivery_timeout_ms")
        if key in kw
    }
    assert seen == {
        ("FakeProducer", "connections_max_idle_ms"): 60000,
        ("FakeProducer", "delivery_timeout_ms"): 90000,
        ("FakeConsumer", "connections_max_idle_ms"): 60000,
        ("FakeConsumer", "check_crcs"): False,
        ("FakeAdmin", "connections_max_idle_ms"): 60000,
    }
    assert sum(1 for kind, _ in fake_clients if kind == "FakeConsumer") == 2


def test_a_mistyped_passthrough_setting_stops_the_first_client(fake_clients):
    cfg = load(env={"STREAMREC_KAFKA_PYTHON_CONECTIONS_MAX_IDLE_MS": "60000"}).kafka
    with pytest.raises(
        ConfigError,
        match=r"kafka_python\.conections_max_idle_ms.*did you mean "
        r"connections_max_idle_ms",
    ):
        kafka_adapter.KafkaSource(cfg, "b1:9093", "g", ["t"], client_id="c")._client()
    assert fake_clients == []


@pytest.mark.parametrize(
    ("setting", "passed"),
    [
        ("auto", "lz4"),
        ("none", None),
        ("gzip", "gzip"),
        ("snappy", "snappy"),
        ("lz4", "lz4"),
        ("zstd", "zstd"),
    ],
)
def test_the_compression_setting_reaches_every_producer(fake_clients, setting, passed):
    kafka_adapter.KafkaSink(KafkaConfig(compression_type=setting), "b1:9093")._client()
    assert [kw["compression_type"] for _, kw in fake_clients] == [passed]


@pytest.mark.parametrize(
    ("installed", "chosen"), [({"lz4", "zstd"}, "lz4"), ({"zstd"}, "zstd"), ({"lz4"}, "lz4")]
)
def test_auto_compression_takes_lz4_then_zstd_whichever_kafka_python_can_write(installed, chosen):
    from pipeline.kafka.sink import producer_compression

    assert producer_compression("auto", lambda codec: codec in installed) == chosen


def test_auto_compression_without_a_codec_falls_back_to_none_and_says_so(caplog):
    from pipeline.kafka.sink import producer_compression

    with caplog.at_level("WARNING", logger="pipeline.kafka.sink"):
        assert producer_compression("auto", lambda codec: False) is None
    assert "producing uncompressed" in caplog.text and "lz4 or zstd" in caplog.text
    # a named codec is passed as it is (config.load already checked that its module imports)
    assert producer_compression("zstd", lambda codec: False) == "zstd"


def test_sasl_over_plaintext_is_refused_unless_allowed():
    with pytest.raises(ConfigError, match="allow_sasl_plaintext"):
        KafkaConfig(
            security_protocol="SASL_PLAINTEXT",
            sasl_mechanism="PLAIN",
            sasl_username="u",
            sasl_password=SENTINEL_SASL,
        )
    with pytest.raises(ConfigError) as info:
        load(
            env={
                "STREAMREC_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
                "STREAMREC_KAFKA_SASL_MECHANISM": "PLAIN",
                "STREAMREC_KAFKA_SASL_USERNAME": "u",
                "STREAMREC_KAFKA_SASL_PASSWORD": SENTINEL_SASL,
            }
        )
    assert SENTINEL_SASL not in str(info.value)
    allowed = sasl_plaintext_config(SENTINEL_SASL)
    assert kafka_adapter.client_settings(allowed, "b:9092")["security_protocol"] == "SASL_PLAINTEXT"


def test_sentinel_secrets_never_in_dumps_exceptions_dead_letters_or_metrics(caplog):
    caplog.set_level(logging.DEBUG)
    env = {
        "STREAMREC_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "STREAMREC_KAFKA_SASL_MECHANISM": "PLAIN",
        "STREAMREC_KAFKA_SASL_USERNAME": "svc",
        "STREAMREC_KAFKA_SASL_PASSWORD": SENTINEL_SASL,
        "STREAMREC_KAFKA_SSL_PASSWORD": SENTINEL_SSL,
    }
    config = load(env=env)
    shown = [repr(config), str(config), repr(config.kafka)]
    for bad in (
        {"STREAMREC_KAFKA_SASL_MECHANISM": "NOPE"},
        {"STREAMREC_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT"},
        {"STREAMREC_KAFKA_REQUEST_TIMEOUT_MS": "soon"},
    ):
        with pytest.raises(StreamrecError) as info:
            load(env={**env, **bad})
        shown.append(str(info.value))
    with pytest.raises(ConfigError) as info:
        load(env={**env, "STREAMREC_KAFKA_SASL_USERNAME": ""})
    shown.append(str(info.value))
    # A message carrying the secret as its key is dead-lettered: only message bytes are kept.
    codec = Codec(ValidationConfig(), worker="updater")
    record = Record("t", 0, 7, b"k", b"{broken", 0)
    with pytest.raises(InvalidMessage) as error:
        codec.decode(record, "event", 0)
    shown.append(encode(codec.dead_letter(record, error.value, 0)).decode())
    metrics = WorkerMetrics("updater")
    shown.append(generate_latest(metrics.registry).decode())
    shown.append(caplog.text)
    for text in shown:
        assert SENTINEL_SASL not in text and SENTINEL_SSL not in text, text[:300]
    assert config.kafka.sasl_password == SENTINEL_SASL  # still usable by the clients


def test_metrics_listen_on_localhost_by_default():
    assert Config().metrics.host == "127.0.0.1"
    assert load(env={}).metrics.host == "127.0.0.1"


class _PerUserHandler(NoopHandler):
    """A handler that emits one output per event, keyed by user: the worst case for labels."""

    def handle(self, batch, now_ms):
        return [Output("out", d.message.user_id.encode(), b"{}") for d in batch]


def _series_after(users: int) -> int:
    bus = MemoryBus(partitions=4)
    now_ms = 1_700_000_000_000
    for u in range(users):
        bus.produce(
            "events",
            f"user-{u}".encode(),
            orjson.dumps(
                {
                    "event_id": f"e{u}",
                    "user_id": f"user-{u}",
                    "item_id": f"item-{u}",
                    "type": "click",
                    "ts": now_ms,
                }
            ),
        )
        if u % 100 == 0:  # bad records too: their reason labels are a bounded set
            bus.produce("events", f"user-{u}".encode(), b"{bad")
    metrics = WorkerMetrics("updater")
    loop = ConsumerLoop(
        handler=_PerUserHandler(),
        source_factory=lambda **h: MemorySource(bus, "g", ["events"], **h),
        sink=MemorySink(bus),
        codec=Codec(ValidationConfig(), worker="updater"),
        metrics=metrics,
        dlq_topic="dlq",
        max_records=20_000,
        clock=lambda: now_ms / 1000,
    )
    while loop.run_once():
        pass
    samples = [s for family in metrics.registry.collect() for s in family.samples]
    for sample in samples:
        assert not any("user" in str(v) or "item" in str(v) for v in sample.labels.values())
        assert set(sample.labels) <= {
            "worker",
            "topic",
            "partition",
            "reason",
            "stage",
            "version",
            "le",
            # python_info, python_gc_*: the interpreter's, fixed
            "implementation",
            "major",
            "minor",
            "patchlevel",
            "generation",
            "python",
        }
    return len(samples)


def test_metric_series_stay_flat_from_1k_to_100k_users():
    assert _series_after(1_000) == _series_after(100_000)
