"""Topics and groups: create the configured topics with a replication factor that fits the
cluster (and say when an existing count differs), describe a consumer group."""

from __future__ import annotations

import logging
import time
from typing import Any

from pipeline.config import KafkaConfig, TopicsConfig
from pipeline.errors import BrokerError, ConfigError
from pipeline.kafka.client import (
    KafkaAdminClient,
    client_settings,
    field_of,
    kafka_errors,
    wrap_error,
)
from pipeline.kafka.passthrough import passthrough_settings

__all__ = [
    "admin_client",
    "ensure_topics",
    "describe_group",
    "replication_factor",
    "DEFAULT_MAX_REPLICATION",
]

log = logging.getLogger(__name__)

# Kafka's own recommendation: three copies survive one broker down while a second is restarted.
DEFAULT_MAX_REPLICATION = 3


def replication_factor(configured: int, brokers: int) -> int:
    """The replication factor for new topics: `configured` when set (>= 1), else
    min(DEFAULT_MAX_REPLICATION, brokers). Raises ConfigError, naming the setting, when the
    cluster has fewer brokers than the configured factor (the broker would refuse the topics)."""
    if brokers < 1:
        raise BrokerError("the cluster metadata lists no broker")
    if configured == 0:
        return min(DEFAULT_MAX_REPLICATION, brokers)
    if configured > brokers:
        raise ConfigError(
            f"invalid setting topics.replication_factor: {configured} is more than "
            f"the {brokers} broker(s) the cluster lists; set it to at most {brokers} "
            "or 0 for min(3, brokers)"
        )
    return configured


def admin_client(cfg: KafkaConfig, bootstrap: str, timeout_s: float) -> KafkaAdminClient:
    settings = client_settings(cfg, bootstrap)
    settings["bootstrap_timeout_ms"] = int(timeout_s * 1000)
    settings.update(passthrough_settings(cfg, "admin"))
    try:
        return KafkaAdminClient(**settings)
    except kafka_errors.KafkaError as exc:
        raise wrap_error(f"connecting an admin client to {bootstrap}", exc) from exc


def ensure_topics(
    cfg: KafkaConfig, bootstrap: str, topics: TopicsConfig, *, timeout_s: float = 30.0
) -> list[str]:
    """Create the six streamrec topics that are missing; return the names it created.

    Idempotent (existing topics are kept as they are, whatever their partition count). Waits
    until metadata lists every topic with its partitions. Raises BrokerError.
    """
    names = list(topics.all())
    deadline = time.monotonic() + timeout_s
    admin = admin_client(cfg, bootstrap, timeout_s)
    try:
        existing = set(admin.list_topics())
        missing = [name for name in names if name not in existing]
        created: list[str] = []
        factor = 0
        if missing:
            brokers = len(admin.describe_cluster()["brokers"])
            factor = replication_factor(topics.replication_factor, brokers)
            spec = {
                name: {"num_partitions": topics.partitions, "replication_factor": factor}
                for name in missing
            }
            response = admin.create_topics(
                spec, timeout_ms=int(timeout_s * 1000), raise_errors=False
            )
            created = _created_topics(response, missing)
        while True:
            described = {t["name"]: t for t in admin.describe_topics(names)}
            ready = [
                n
                for n in names
                if n in described
                and described[n].get("error_code", 0) == 0
                and described[n].get("partitions")
            ]
            if len(ready) == len(names):
                break
            if time.monotonic() >= deadline:
                raise BrokerError(
                    f"topics {sorted(set(names) - set(ready))} not visible in "
                    f"metadata of {bootstrap} after {timeout_s:.0f}s"
                )
            time.sleep(0.05)  # metadata propagation backoff
        if created:
            log.info(
                "created topics %s (%d partitions, replication factor %d)",
                created,
                topics.partitions,
                factor,
            )
        for name in names:
            if (count := len(described[name]["partitions"])) != topics.partitions:
                log.warning(
                    "topic %s has %d partitions, not the configured %d (created "
                    "elsewhere, or auto-created by a Tansu broker)",
                    name,
                    count,
                    topics.partitions,
                )
        return created
    except kafka_errors.KafkaError as exc:
        raise wrap_error(f"creating topics on {bootstrap}", exc) from exc
    finally:
        admin.close()


def describe_group(
    cfg: KafkaConfig, bootstrap: str, group_id: str, *, timeout_s: float = 10.0
) -> dict[str, Any]:
    """The broker's view of a consumer group, for diagnostics (`streamrec chaos`): state and
    each member's id, client id and assigned partitions. Never raises: a failure is returned
    as {"error": ...}. (kafka-python's describe_groups() fails on Tansu 0.6.0, which reports
    authorized operations kafka-python cannot parse, so the request is sent without them.)"""
    from kafka.protocol.admin import DescribeGroupsRequest
    from kafka.protocol.consumer.metadata import ConsumerProtocolAssignment

    try:
        admin = admin_client(cfg, bootstrap, timeout_s)
    except BrokerError as exc:
        return {"error": str(exc)}

    async def fetch() -> Any:
        coordinator = (await admin._find_coordinator_ids([group_id]))[group_id]
        request = DescribeGroupsRequest(groups=[group_id], include_authorized_operations=False)
        return await admin._manager.send(request, node_id=coordinator)

    try:
        group = admin._manager.run(fetch).groups[0]
        members = []
        for member in group.members:
            parts: list[list[Any]] = []
            if member.member_assignment:
                decoded = ConsumerProtocolAssignment.decode(member.member_assignment)
                parts = [[topic, sorted(ps)] for topic, ps in decoded.assigned_partitions]
            members.append(
                {"member_id": member.member_id, "client_id": member.client_id, "partitions": parts}
            )
        return {"state": group.group_state, "error_code": group.error_code, "members": members}
    except Exception as exc:  # diagnostics only
        return {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        admin.close()


def _created_topics(response: Any, requested: list[str]) -> list[str]:
    created = []
    for topic in field_of(response, "topics"):
        name, code = field_of(topic, "name"), field_of(topic, "error_code")
        if code == 0:
            created.append(name)
        elif code != kafka_errors.TopicAlreadyExistsError.errno:
            message = field_of(topic, "error_message", "")
            raise BrokerError(f"cannot create topic {name!r}: error {code} {message}")
    return [name for name in requested if name in created]
