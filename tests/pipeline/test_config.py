"""Config: one typed object; every source maps onto it; bad settings fail naming the setting."""

from __future__ import annotations

import pytest

from pipeline.config import Config, field_specs, load, to_env
from pipeline.errors import ConfigError


def test_defaults_are_the_embedded_setup():
    config = load(env={})
    assert config == Config()
    assert config.bootstrap_servers == "127.0.0.1:19092"
    assert config.topics.events == "streamrec.events" and config.topics.partitions == 2
    assert config.kafka.fetch_max_wait_ms == 10 and config.metrics.host == "127.0.0.1"


def test_precedence_file_env_flags(tmp_path):
    path = tmp_path / "streamrec.toml"
    path.write_text('[scorer]\ntop_k = 20\nepsilon = 0.2\n[topics]\nprefix = "shop."\n')
    config = load(path, env={"STREAMREC_SCORER_TOP_K": "30"}, overrides={"scorer.epsilon": "0"})
    assert config.scorer.top_k == 30 and config.scorer.epsilon == 0.0
    assert config.topics.events == "shop.events"


@pytest.mark.parametrize(
    ("overrides", "setting"),
    [
        ({"scorer.epsilon": "1.5"}, "scorer.epsilon"),
        ({"scorer.top_k": "0"}, "scorer.top_k"),
        ({"scorer.trending": "popular"}, "scorer.trending"),
        ({"scorer.trending": "true"}, "scorer.trending"),  # a mode since it was a bool: say which
        ({"topics.partitions": "zero"}, "topics.partitions"),
        (
            {
                "kafka.security_protocol": "SASL_PLAINTEXT",
                "kafka.sasl_mechanism": "PLAIN",
                "kafka.sasl_username": "u",
            },
            "kafka.security_protocol",
        ),
        ({"kafka.security_protocol": "SASL_SSL"}, "kafka.sasl_mechanism"),
        ({"model.num_heads": "3"}, "model.num_heads"),
        ({"finetune.nice": "20"}, "finetune.nice"),
        ({"updater.swap_rescore_batch": "0"}, "updater.swap_rescore_batch"),
        ({"finetune.fetch_max_wait_ms": "30000"}, "finetune.fetch_max_wait_ms"),
        (
            {"kafka.fetch_max_wait_ms": "900", "kafka.request_timeout_ms": "800"},
            "kafka.fetch_max_wait_ms",
        ),
        ({"kafka.fetch_max_wait_ceiling_ms": "-1"}, "kafka.fetch_max_wait_ceiling_ms"),
        ({"logging.format": "yaml"}, "logging.format"),
        ({"nope.field": "1"}, "nope.field"),
    ],
)
def test_bad_settings_fail_fast_naming_the_setting(overrides, setting):
    with pytest.raises(ConfigError, match=setting.replace(".", r"\.")):
        load(env={}, overrides=overrides)


def test_an_unknown_env_var_is_logged_and_ignored(caplog):
    """Platforms inject STREAMREC_* variables of their own: a warning, never a dead worker."""
    with caplog.at_level("WARNING", logger="pipeline.config"):
        assert load(env={"STREAMREC_SCORER_TOPK": "5"}) == Config()
    assert "STREAMREC_SCORER_TOPK" in caplog.text


def test_kubernetes_service_links_are_ignored_silently(caplog):
    """What a Service named streamrec-updater injects into every pod of its namespace."""
    links = {
        "STREAMREC_UPDATER_SERVICE_HOST": "10.0.0.1",
        "STREAMREC_UPDATER_SERVICE_PORT": "9101",
        "STREAMREC_UPDATER_SERVICE_PORT_METRICS": "9101",
        "STREAMREC_UPDATER_PORT": "tcp://10.0.0.1:9101",
        "STREAMREC_UPDATER_PORT_9101_TCP": "tcp://10.0.0.1:9101",
        "STREAMREC_UPDATER_PORT_9101_TCP_PROTO": "tcp",
        "STREAMREC_UPDATER_PORT_9101_TCP_PORT": "9101",
        "STREAMREC_UPDATER_PORT_9101_TCP_ADDR": "10.0.0.1",
    }
    with caplog.at_level("WARNING", logger="pipeline.config"):
        config = load(env={**links, "STREAMREC_UPDATER_METRICS_PORT": "9201"})
    assert config.updater.metrics_port == 9201 and caplog.text == ""


def test_a_secret_can_come_from_a_file(tmp_path):
    secret = tmp_path / "password"
    secret.write_text("s3cr3t\n")
    sasl = {
        "STREAMREC_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "STREAMREC_KAFKA_SASL_MECHANISM": "PLAIN",
        "STREAMREC_KAFKA_SASL_USERNAME": "svc",
    }
    config = load(env={**sasl, "STREAMREC_KAFKA_SASL_PASSWORD_FILE": str(secret)})
    assert config.kafka.sasl_password == "s3cr3t"
    with pytest.raises(ConfigError, match="STREAMREC_KAFKA_SASL_PASSWORD_FILE"):
        load(env={**sasl, "STREAMREC_KAFKA_SASL_PASSWORD_FILE": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match="use one"):
        load(
            env={
                **sasl,
                "STREAMREC_KAFKA_SASL_PASSWORD_FILE": str(secret),
                "STREAMREC_KAFKA_SASL_PASSWORD": "other",
            }
        )


def test_secrets_are_masked_in_repr_but_survive_to_env():
    config = load(
        env={},
        overrides={
            "kafka.security_protocol": "SASL_SSL",
            "kafka.sasl_mechanism": "SCRAM-SHA-512",
            "kafka.sasl_username": "svc",
            "kafka.sasl_password": "s3cr3t-SENTINEL",
        },
    )
    assert "s3cr3t-SENTINEL" not in repr(config)
    assert load(env=to_env(config)) == config
    with pytest.raises(ConfigError) as info:
        load(env={}, overrides={"kafka.sasl_password": "s3cr3t-SENTINEL", "kafka.linger_ms": "x"})
    assert "s3cr3t-SENTINEL" not in str(info.value)


def test_every_field_has_one_flag_and_one_env_name():
    specs = field_specs()
    assert len({s.flag for s in specs}) == len(specs)
    assert all(s.flag.startswith("--") for s in specs)


def test_the_fetch_wait_ceiling_is_clamped_not_rejected():
    """A ceiling only bounds how far a starving consumer raises its wait: it never goes below
    the configured wait, and stays well below the request timeout."""
    assert load(env={}).kafka.fetch_wait_ceiling_ms == 1000
    short = load(env={}, overrides={"kafka.request_timeout_ms": "900"}).kafka
    assert short.fetch_wait_ceiling_ms == 450
    long_wait = load(env={}, overrides={"kafka.fetch_max_wait_ms": "1500"}).kafka
    assert long_wait.fetch_wait_ceiling_ms == 1500  # off: the configured wait is already above


@pytest.mark.parametrize("codec", ["auto", "none", "gzip", "snappy", "lz4", "zstd"])
def test_every_compression_type_is_accepted_and_its_codec_imports(codec):
    assert load(env={"STREAMREC_KAFKA_COMPRESSION_TYPE": codec}).kafka.compression_type == codec


def test_an_unknown_compression_type_fails_naming_the_setting():
    with pytest.raises(ConfigError, match=r"kafka\.compression_type.*'brotli'"):
        load(env={}, overrides={"kafka.compression_type": "brotli"})


def test_a_compression_type_whose_library_is_missing_fails_fast(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "zstandard", None)  # makes `import zstandard` fail
    with pytest.raises(ConfigError, match=r"kafka\.compression_type.*'zstandard'"):
        load(env={}, overrides={"kafka.compression_type": "zstd"})


def test_every_setting_says_why_it_exists():
    """`setting(default, why)` on every field: the why is its --help text."""
    missing = [spec.key for spec in field_specs() if len(spec.help.split()) < 3]
    assert missing == [], f"declare these with setting(default, why): {missing}"
