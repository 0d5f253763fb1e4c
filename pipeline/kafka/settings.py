"""The settings a consumer is built with: streamrec's own (pipeline/kafka/client.py) plus the
kafka-python passthrough (pipeline/kafka/passthrough.py), which needs the client classes and so
cannot live in client.py without an import circle."""

from __future__ import annotations

from typing import Any

from pipeline.config import KafkaConfig
from pipeline.kafka.client import client_settings
from pipeline.kafka.passthrough import passthrough_settings

__all__ = ["consumer_settings"]


# KafkaConfig fields a consumer takes as they are: each is named as kafka-python names it.
_CONSUMER_FIELDS = (
    "auto_offset_reset",
    "fetch_max_wait_ms",
    "fetch_min_bytes",
    "max_poll_records",
    "session_timeout_ms",
    "heartbeat_interval_ms",
    "max_poll_interval_ms",
)


def consumer_settings(cfg: KafkaConfig, bootstrap: str, client_id: str | None) -> dict[str, Any]:
    settings = client_settings(cfg, bootstrap)
    settings.update(
        client_id=client_id or cfg.client_id,
        enable_auto_commit=False,
        allow_auto_create_topics=False,
    )
    settings.update({name: getattr(cfg, name) for name in _CONSUMER_FIELDS})
    settings.update(passthrough_settings(cfg, "consumer"))
    return settings
