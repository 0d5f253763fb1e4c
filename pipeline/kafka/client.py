"""What every client shares: the one guarded import of kafka-python, security and consumer
settings built from `KafkaConfig`, error wrapping, record conversion, and the kafka-python 3.0.12
group-join patch (see the package docstring)."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping
from typing import Any, Self

with warnings.catch_warnings():
    # kafka-python 3.0.12 loads its schemas with the deprecated importlib.resources.read_text.
    warnings.filterwarnings("ignore", r"(read|open)_text is deprecated", DeprecationWarning)
    from kafka import (
        AsyncConsumerRebalanceListener,
        KafkaAdminClient,
        KafkaConsumer,
        KafkaProducer,
        OffsetAndMetadata,
        TopicPartition,
    )
    from kafka import codec as kafka_codec
    from kafka import errors as kafka_errors

from pipeline.config import KafkaConfig
from pipeline.errors import BrokerError
from pipeline.kafka.oauth import token_provider
from pipeline.messages import Record

__all__ = [
    "ClosingClient",
    "TP",
    "PartitionsCallback",
    "RECONNECT_BACKOFF_MAX_MS",
    "REVOKE_COMMIT_TIMEOUT_MS",
    "END_CHECK_S",
    "KEEPS_FINISHED_JOINS",
    "client_settings",
    "wrap_error",
    "field_of",
    "to_record",
    "flatten",
    "AsyncConsumerRebalanceListener",
    "KafkaAdminClient",
    "KafkaConsumer",
    "KafkaProducer",
    "OffsetAndMetadata",
    "TopicPartition",
    "kafka_errors",
    "kafka_codec",
]

log = logging.getLogger(__name__)

TP = tuple[str, int]
PartitionsCallback = Callable[[list[TP]], None]

# Reconnect quickly after a broker restart (kafka-python's default backs off up to 30 s).
RECONNECT_BACKOFF_MAX_MS = 1000
REVOKE_COMMIT_TIMEOUT_MS = 5000
END_CHECK_S = 1.0


def _keep_finished_joins() -> bool:
    """Work around kafka-python 3.0.12 throwing away a group join that finished between polls.

    `BaseCoordinator.join_group_async` starts the JoinGroup+SyncGroup exchange as a task and
    awaits it for the poll's timeout only; the next poll re-awaits a task still running, but
    starts a NEW JoinGroup when the task has already finished, discarding its assignment
    (`if self._join_task is None or self._join_task.is_done`). Measured on Tansu: each such join
    costs another ~3 s and makes every other member rejoin too; a worker that is busy between
    polls (start-up, a long batch, a loaded machine) can go round this several times, which is
    how a rebalance storm never settled. The wrapper below finishes a join that succeeded while
    nobody awaited it exactly as the awaiting path would have, then lets kafka-python go on.
    Applied to kafka-python 3.0.x only (checked against 3.0.12's code); returns whether it was.
    """
    try:
        import kafka
        from kafka.coordinator.base import BaseCoordinator
        from kafka.structs import MemberState
    except ImportError:  # pragma: no cover - another kafka-python layout
        return False
    original = getattr(BaseCoordinator, "join_group_async", None)
    if (
        not str(getattr(kafka, "__version__", "")).startswith("3.0.")
        or original is None
        or getattr(original, "_streamrec_keeps_finished_joins", False)
    ):
        return False

    async def join_group_async(self: Any, timeout_ms: Any = None) -> Any:
        task = getattr(self, "_join_task", None)
        if task is not None and task.is_done and task.succeeded() and self.need_rejoin():
            self._join_task = None
            with self._lock:
                self.rejoining = False
                self.rejoin_needed = False
                self.state = MemberState.STABLE
                self._enable_heartbeat()
            await self._on_join_complete_async(
                self._generation.generation_id,
                self._generation.member_id,
                self._generation.protocol,
                task.value,
            )
            return True
        return await original(self, timeout_ms)

    join_group_async._streamrec_keeps_finished_joins = True  # type: ignore[attr-defined]
    BaseCoordinator.join_group_async = join_group_async
    return True


KEEPS_FINISHED_JOINS = _keep_finished_joins()


class _Secret(str):
    """A str that prints as *** in repr() (so in dict reprs and kafka-python's debug logs)."""

    def __repr__(self) -> str:
        return "'***'"


def client_settings(cfg: KafkaConfig, bootstrap: str) -> dict[str, Any]:
    """Connection and security kwargs shared by every producer, consumer and admin client.

    Empty settings are left out so kafka-python keeps its defaults. Passwords are passed as a
    str subclass whose repr() is masked: `repr(client_settings(...))` never shows a secret.
    """
    if not bootstrap:
        raise BrokerError("no bootstrap servers given")
    settings: dict[str, Any] = {
        "bootstrap_servers": [part.strip() for part in bootstrap.split(",") if part.strip()],
        "client_id": cfg.client_id,
        "security_protocol": cfg.security_protocol,
        "request_timeout_ms": cfg.request_timeout_ms,
        "reconnect_backoff_max_ms": RECONNECT_BACKOFF_MAX_MS,
    }
    if cfg.security_protocol.startswith("SASL"):
        settings["sasl_mechanism"] = cfg.sasl_mechanism
        if cfg.sasl_mechanism == "OAUTHBEARER":
            settings["sasl_oauth_token_provider"] = token_provider(cfg)
        else:
            settings["sasl_plain_username"] = cfg.sasl_username
            settings["sasl_plain_password"] = _Secret(cfg.sasl_password)
    if cfg.security_protocol in ("SSL", "SASL_SSL"):
        settings["ssl_check_hostname"] = cfg.ssl_check_hostname
        for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            if getattr(cfg, key):
                settings[key] = getattr(cfg, key)
        if cfg.ssl_password:
            settings["ssl_password"] = _Secret(cfg.ssl_password)
    return settings


def wrap_error(action: str, exc: Exception) -> BrokerError:
    return BrokerError(f"{action} failed: {type(exc).__name__}: {exc}")


def field_of(obj: Any, name: str, default: Any = None) -> Any:
    return obj.get(name, default) if isinstance(obj, Mapping) else getattr(obj, name, default)


def to_record(message: Any) -> Record:
    return Record(
        topic=message.topic,
        partition=message.partition,
        offset=message.offset,
        key=message.key,
        value=message.value,
        timestamp_ms=int(message.timestamp or 0),
    )


def flatten(batches: Mapping[TopicPartition, list[Any]]) -> list[Record]:
    return [to_record(m) for tp in sorted(batches) for m in batches[tp]]


class ClosingClient:
    """`with` support for the clients: the block's end closes the client (`close()`)."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
