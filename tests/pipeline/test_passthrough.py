"""Further kafka-python settings ([kafka_python] / STREAMREC_KAFKA_PYTHON_*): loaded, checked
against kafka-python's own settings (a typo fails naming the setting), typed, and handed only to
the clients that know them."""

from __future__ import annotations

import pytest

from pipeline.config import load, to_env
from pipeline.errors import ConfigError
from pipeline.kafka.passthrough import check_passthrough, passthrough_settings


def _kafka(**passthrough):
    return load(
        env={f"STREAMREC_KAFKA_PYTHON_{k.upper()}": v for k, v in passthrough.items()}
    ).kafka


def test_the_table_and_the_environment_fill_it_and_the_environment_wins(tmp_path, caplog):
    path = tmp_path / "streamrec.toml"
    path.write_text(
        "[kafka_python]\nretry_backoff_ms = 200\napi_version = [2, 8, 0]\ncheck_crcs = false\n"
    )
    with caplog.at_level("WARNING"):
        cfg = load(path, env={"STREAMREC_KAFKA_PYTHON_RETRY_BACKOFF_MS": "250"}).kafka
    assert "STREAMREC_KAFKA_PYTHON" not in caplog.text  # not an unknown variable
    assert dict(cfg.passthrough) == {
        "retry_backoff_ms": "250",
        "api_version": (2, 8, 0),
        "check_crcs": False,
    }
    assert check_passthrough(cfg) == {
        "retry_backoff_ms": 250,
        "api_version": (2, 8, 0),
        "check_crcs": False,
    }


def test_up_hands_them_to_its_workers_unchanged():
    config = load(
        env={
            "STREAMREC_KAFKA_PYTHON_API_VERSION": "2.8.0",
            "STREAMREC_KAFKA_PYTHON_CHECK_CRCS": "false",
        }
    )
    again = load(env=to_env(config))
    assert (
        check_passthrough(again.kafka)
        == check_passthrough(config.kafka)
        == {"api_version": (2, 8, 0), "check_crcs": False}
    )


def test_each_client_gets_only_the_settings_it_knows():
    cfg = _kafka(
        check_crcs="false",
        delivery_timeout_ms="90000",
        connections_max_idle_ms="60000",
        receive_buffer_bytes="65536",
    )
    common = {"connections_max_idle_ms": 60000, "receive_buffer_bytes": 65536}
    assert passthrough_settings(cfg, "consumer") == {"check_crcs": False, **common}
    assert passthrough_settings(cfg, "producer") == {"delivery_timeout_ms": 90000, **common}
    assert passthrough_settings(cfg, "admin") == common


@pytest.mark.parametrize(
    ("passthrough", "message"),
    [
        (
            {"retry_backof_ms": "5"},
            r"kafka_python\.retry_backof_ms: kafka-python .* has no such "
            r"client setting; did you mean retry_backoff_ms\?",
        ),
        ({"acks": "1"}, r"kafka_python\.acks: streamrec sets it from kafka\.acks"),
        ({"batch_size": "1"}, r"kafka_python\.batch_size: .*kafka\.producer_batch_bytes"),
        ({"enable_auto_commit": "true"}, r"kafka_python\.enable_auto_commit: not settable"),
        ({"retry_backoff_ms": "soon"}, r"kafka_python\.retry_backoff_ms: 'soon' is not an integer"),
        ({"check_crcs": "maybe"}, r"kafka_python\.check_crcs: 'maybe' is not a boolean"),
        ({"api_version": "two"}, r"kafka_python\.api_version: 'two' is not a version"),
        ({"key_serializer": "str"}, r"kafka_python\.key_serializer: kafka-python takes a Python "),
        ({"socket_options": "x"}, r"kafka_python\.socket_options: kafka-python takes a Python "),
    ],
)
def test_a_bad_setting_fails_naming_it(passthrough, message):
    cfg = _kafka(**passthrough)
    with pytest.raises(ConfigError, match=message):
        passthrough_settings(cfg, "admin")  # every setting is checked, whichever client


def test_a_name_that_cannot_be_a_setting_fails_at_load(tmp_path):
    path = tmp_path / "streamrec.toml"
    path.write_text('[kafka_python]\n"Retry-Backoff" = 5\n')
    with pytest.raises(ConfigError, match=r"kafka_python\.Retry-Backoff"):
        load(path, env={})
