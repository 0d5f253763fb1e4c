"""Shared pieces of the pipeline unit tests."""

from __future__ import annotations

from typing import Any

from pipeline.config import KafkaConfig
from pipeline.metrics import FinetuneMetrics, SupervisorMetrics, UpdaterMetrics, WorkerMetrics


def every_worker_metrics() -> tuple[WorkerMetrics | SupervisorMetrics, ...]:
    """A fresh metrics object of each worker (updater, scorer, fine-tune) and of `streamrec up`:
    between them, every series streamrec exports."""
    return (UpdaterMetrics(), WorkerMetrics("scorer"), FinetuneMetrics(), SupervisorMetrics())


def sasl_ssl_config(sasl_password: str, ssl_password: str, **overrides: Any) -> KafkaConfig:
    """A SASL_SSL client config (user "svc") with every security setting filled in, the two
    secrets as given."""
    return KafkaConfig(
        **{
            "bootstrap_servers": "b1:9093,b2:9093",
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_username": "svc",
            "sasl_password": sasl_password,
            "ssl_cafile": "/etc/ca.pem",
            "ssl_certfile": "/etc/client.pem",
            "ssl_keyfile": "/etc/client.key",
            "ssl_password": ssl_password,
            **overrides,
        }
    )


def sasl_plaintext_config(sasl_password: str) -> KafkaConfig:
    """SASL PLAIN over plaintext (user "u"), with the opt-in it needs."""
    return KafkaConfig(
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="PLAIN",
        sasl_username="u",
        sasl_password=sasl_password,
        allow_sasl_plaintext=True,
    )
