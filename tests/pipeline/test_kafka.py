"""Pure parts of pipeline.kafka: the shared client settings (security, secrets), member slots."""

from __future__ import annotations

import logging

import pytest

from pipeline.config import KafkaConfig
from pipeline.errors import BrokerError
from pipeline.kafka import KafkaSource, TableReader, client_settings, replication_factor
from tests.pipeline.conftest import sasl_plaintext_config, sasl_ssl_config

SASL_PASSWORD = "s3cr3t-sasl-pw"
SSL_PASSWORD = "s3cr3t-key-pw"


def _sasl_ssl() -> KafkaConfig:
    return sasl_ssl_config(SASL_PASSWORD, SSL_PASSWORD, ssl_check_hostname=False)


def test_plaintext_settings_carry_no_security_extras() -> None:
    settings = client_settings(KafkaConfig(client_id="me"), "127.0.0.1:19092")
    assert settings["bootstrap_servers"] == ["127.0.0.1:19092"]
    assert settings["client_id"] == "me"
    assert settings["security_protocol"] == "PLAINTEXT"
    assert not any(key.startswith(("sasl_", "ssl_")) for key in settings)


def test_sasl_ssl_settings_pass_everything_through() -> None:
    settings = client_settings(_sasl_ssl(), "b1:9093, b2:9093")
    assert settings["bootstrap_servers"] == ["b1:9093", "b2:9093"]
    assert settings["security_protocol"] == "SASL_SSL"
    assert settings["sasl_mechanism"] == "SCRAM-SHA-512"
    assert settings["sasl_plain_username"] == "svc"
    assert settings["sasl_plain_password"] == SASL_PASSWORD
    assert settings["ssl_cafile"] == "/etc/ca.pem"
    assert settings["ssl_certfile"] == "/etc/client.pem"
    assert settings["ssl_keyfile"] == "/etc/client.key"
    assert settings["ssl_password"] == SSL_PASSWORD
    assert settings["ssl_check_hostname"] is False
    # kafka-python builds SASL PLAIN bytes this way: the real value must come through.
    plain = "\0".join(["svc", settings["sasl_plain_password"]]).encode()
    assert plain == f"svc\0{SASL_PASSWORD}".encode()


def test_ssl_only_settings_have_no_sasl() -> None:
    cfg = KafkaConfig(security_protocol="SSL", ssl_cafile="/etc/ca.pem")
    settings = client_settings(cfg, "b:9093")
    assert settings["ssl_cafile"] == "/etc/ca.pem"
    assert settings["ssl_check_hostname"] is True
    assert "ssl_password" not in settings and "ssl_certfile" not in settings
    assert not any(key.startswith("sasl_") for key in settings)


def test_sasl_plaintext_needs_the_opt_in() -> None:
    cfg = sasl_plaintext_config(SASL_PASSWORD)
    settings = client_settings(cfg, "b:9092")
    assert settings["sasl_mechanism"] == "PLAIN"
    assert settings["sasl_plain_password"] == SASL_PASSWORD
    assert not any(key.startswith("ssl_") for key in settings)


def test_secrets_never_appear_in_repr_str_of_settings_or_log_lines(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = _sasl_ssl()
    settings = client_settings(cfg, "b1:9093")
    shown = [
        repr(settings),
        str(settings),
        repr(cfg),
        f"{settings}",
        repr(settings["sasl_plain_password"]),
        repr(settings["ssl_password"]),
    ]
    caplog.set_level(logging.DEBUG)
    # The exact line kafka-python's admin client logs at DEBUG with its kwargs.
    logging.getLogger("kafka.admin.client").debug(
        "Starting KafkaAdminClient with configuration: %s", settings
    )
    shown.extend(record.getMessage() for record in caplog.records)
    for text in shown:
        assert SASL_PASSWORD not in text and SSL_PASSWORD not in text, text
    assert "***" in shown[0]


def test_empty_bootstrap_is_an_error() -> None:
    with pytest.raises(BrokerError, match="bootstrap"):
        client_settings(KafkaConfig(), "")


def test_member_slots_are_exclusive_while_held_and_free_after_release(tmp_path) -> None:
    from pipeline.kafka import MemberSlot

    one = MemberSlot.acquire(tmp_path / "g")
    two = MemberSlot.acquire(tmp_path / "g")
    assert one is not None and two is not None and one.path != two.path
    one.write("g", "member-a")
    assert one.read("g") == "member-a"
    assert one.read("other-group") is None
    one.release()  # what the kernel does when the process dies
    again = MemberSlot.acquire(tmp_path / "g")
    assert again is not None and again.path == one.path
    assert again.read("g") == "member-a"  # the successor rejoins as its predecessor
    again.clear()
    assert again.read("g") is None  # after a clean leave nobody rejoins as it
    for slot in (two, again):
        slot.release()


def test_member_slot_with_garbage_or_unusable_dir(tmp_path) -> None:
    from pipeline.kafka import MemberSlot

    slot = MemberSlot.acquire(tmp_path)
    assert slot is not None
    slot.path.write_bytes(b"\xff\xfe")  # a torn or foreign write reads back as no id
    assert slot.read("g") is None
    slot.release()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert MemberSlot.acquire(blocker / "sub") is None  # logged, and the member joins fresh


def test_a_poll_for_no_records_returns_none_without_asking_kafka_python(monkeypatch) -> None:
    # The loop asks for what is left of a full batch after a rebalance: that can be 0, and
    # kafka-python's poll raises ValueError for max_records <= 0.
    cfg = KafkaConfig(bootstrap_servers="127.0.0.1:9")
    source = KafkaSource(cfg, cfg.bootstrap_servers, "g", ["t"])
    table = TableReader(cfg, cfg.bootstrap_servers, ["items"])
    for reader in (source, table):
        monkeypatch.setattr(reader, "_client", lambda: pytest.fail("kafka-python was asked"))
        assert reader.poll(0, 0) == [] and reader.poll(50, -3) == []


# -- replication factor of the topics streamrec creates ------------------------------------------


@pytest.mark.parametrize(
    ("configured", "brokers", "expected"),
    [(0, 1, 1), (0, 2, 2), (0, 3, 3), (0, 9, 3), (1, 9, 1), (5, 5, 5)],
)
def test_replication_factor_is_min_3_brokers_unless_set(configured, brokers, expected):
    assert replication_factor(configured, brokers) == expected


def test_a_replication_factor_above_the_broker_count_fails_naming_the_setting():
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match=r"topics\.replication_factor: 3 is more than the 1 "):
        replication_factor(3, 1)
