"""Further kafka-python client settings (`[kafka_python]` / STREAMREC_KAFKA_PYTHON_*): checked
against kafka-python's own settings, typed as kafka-python expects, and handed to each kind of
client that knows them (producer, consumer, admin).

A name kafka-python does not know, a setting streamrec sets from its own config, one that
would break a guarantee, or one that takes a Python object fails with ConfigError naming the
setting, when the first client is built (at worker start).
"""

from __future__ import annotations

import difflib
from typing import Any

from pipeline.config import PASSTHROUGH_SECTION, KafkaConfig
from pipeline.errors import ConfigError
from pipeline.kafka.client import KafkaAdminClient, KafkaConsumer, KafkaProducer

__all__ = ["passthrough_settings", "check_passthrough", "CLIENT_KINDS"]

CLIENT_KINDS: dict[str, dict[str, Any]] = {
    "producer": KafkaProducer.DEFAULT_CONFIG,
    "consumer": KafkaConsumer.DEFAULT_CONFIG,
    "admin": KafkaAdminClient.DEFAULT_CONFIG,
}

# kafka-python settings streamrec derives from its own config: set those instead.
_OWN = {
    "bootstrap_servers": "kafka.bootstrap_servers",
    "client_id": "kafka.client_id",
    "security_protocol": "kafka.security_protocol",
    "sasl_mechanism": "kafka.sasl_mechanism",
    "sasl_plain_username": "kafka.sasl_username",
    "sasl_plain_password": "kafka.sasl_password",
    "ssl_cafile": "kafka.ssl_cafile",
    "ssl_certfile": "kafka.ssl_certfile",
    "ssl_keyfile": "kafka.ssl_keyfile",
    "ssl_password": "kafka.ssl_password",
    "ssl_check_hostname": "kafka.ssl_check_hostname",
    "sasl_oauth_token_provider": "kafka.sasl_oauth_token_file or kafka.sasl_oauth_token_url",
    "request_timeout_ms": "kafka.request_timeout_ms",
    "fetch_max_wait_ms": "kafka.fetch_max_wait_ms",
    "fetch_min_bytes": "kafka.fetch_min_bytes",
    "max_poll_records": "kafka.max_poll_records",
    "session_timeout_ms": "kafka.session_timeout_ms",
    "heartbeat_interval_ms": "kafka.heartbeat_interval_ms",
    "max_poll_interval_ms": "kafka.max_poll_interval_ms",
    "auto_offset_reset": "kafka.auto_offset_reset",
    "acks": "kafka.acks",
    "linger_ms": "kafka.linger_ms",
    "batch_size": "kafka.producer_batch_bytes",
    "compression_type": "kafka.compression_type",
    "group_id": "<worker>.group_id",
}
# Settings that would break what streamrec guarantees (docs/DESIGN.md).
_GUARANTEES = {
    "enable_auto_commit": "offsets are committed only after the state that covers them is "
    "persisted",
    "allow_auto_create_topics": "topics are created only by streamrec's CreateTopics, so a typo "
    "never creates a stray topic",
    "enable_idempotence": "set from kafka.acks (all = idempotent)",
    "transactional_id": "streamrec's producers are not transactional",
    "group_instance_id": "a restarted worker rejoins under its predecessor's member id",
}
# Settings whose default is None but whose value is a Python object or an integer.
_OBJECTS = {
    "key_serializer",
    "value_serializer",
    "key_deserializer",
    "value_deserializer",
    "ssl_context",
    "partitioner",
}
_INTEGERS = {"receive_buffer_bytes", "send_buffer_bytes"}
_SCALARS = (str, int, float, bool)


def _fail(name: str, message: str) -> ConfigError:
    return ConfigError(f"invalid setting {PASSTHROUGH_SECTION}.{name}: {message}")


def _typed(name: str, value: Any, default: Any) -> Any:
    """`value` as kafka-python expects it, judged by the setting's default; env values are text."""
    if name == "api_version":  # "2.5.0", "2,5,0" or [2, 5, 0]
        parts = value.replace(",", ".").split(".") if isinstance(value, str) else value
        try:
            return tuple(int(p) for p in parts)
        except (TypeError, ValueError):
            raise _fail(name, f"{value!r} is not a version like 2.5.0") from None
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if str(value).strip().lower() in {"1", "true", "yes", "on"}:
            return True
        if str(value).strip().lower() in {"0", "false", "no", "off"}:
            return False
        raise _fail(name, f"{value!r} is not a boolean")
    if isinstance(default, (int, float)) or name in _INTEGERS:
        kind = float if isinstance(default, float) else int
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise _fail(name, f"{value!r} is not a number")
        try:
            number = float(value) if kind is float else int(str(value).replace("_", ""))
        except ValueError:
            raise _fail(
                name, f"{value!r} is not {'a number' if kind is float else 'an integer'}"
            ) from None
        return number
    if (default is None or isinstance(default, str)) and name not in _OBJECTS:
        if not isinstance(value, _SCALARS):
            raise _fail(name, f"{value!r} is not a plain value")
        return value
    raise _fail(name, "kafka-python takes a Python object here, which configuration cannot give")


def check_passthrough(cfg: KafkaConfig) -> dict[str, Any]:
    """Every passthrough setting, checked and typed. Raises ConfigError naming the first bad one."""
    known = {
        name: default for defaults in CLIENT_KINDS.values() for name, default in defaults.items()
    }
    typed: dict[str, Any] = {}
    for name, value in cfg.passthrough:
        if name in _OWN:
            raise _fail(name, f"streamrec sets it from {_OWN[name]}; set that instead")
        if name in _GUARANTEES:
            raise _fail(name, f"not settable: {_GUARANTEES[name]}")
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise _fail(name, f"kafka-python {_kafka_version()} has no such client setting{hint}")
        typed[name] = _typed(name, value, known[name])
    return typed


def passthrough_settings(cfg: KafkaConfig, kind: str) -> dict[str, Any]:
    """The passthrough settings a `kind` client (producer, consumer, admin) takes; all of them
    are checked each time, so the first client a worker builds fails on any bad one."""
    return {
        name: value for name, value in check_passthrough(cfg).items() if name in CLIENT_KINDS[kind]
    }


def _kafka_version() -> str:
    import kafka

    return str(getattr(kafka, "__version__", "?"))
