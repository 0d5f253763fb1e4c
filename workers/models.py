"""`streamrec model list|rollback VERSION`: inspect the registry, move its CURRENT pointer, and
announce the rollback with a ModelUpdate so running updaters and scorers follow it at once."""

from __future__ import annotations

import sys
import time

import orjson

from pipeline.codec import encode
from pipeline.config import Config
from pipeline.errors import BrokerError, RegistryError
from pipeline.messages import ModelUpdate
from pipeline.registry import ModelRegistry

__all__ = ["run", "announce"]


def run(config: Config, action: str, version: str | None) -> int:
    registry = ModelRegistry(config.paths.models)
    if action == "list":
        versions = registry.versions()
        if not versions:
            print(f"no model versions under {registry.root}")
        for v in versions:
            marker = "*" if v["current"] else " "
            metrics = " ".join(
                f"{k}={val:.4f}"
                for k, val in sorted(v["metrics"].items())
                if isinstance(val, (int, float))
            )
            print(
                f"{marker} {v['version']}  parent={v['parent_version'] or '-'}  "
                f"events={v['trained_on_events']}  {metrics}"
            )
        return 0
    if version is None:
        raise RegistryError("model rollback needs a VERSION (see `streamrec model list`)")
    loaded = registry.load(version)  # verify before pointing anything at it
    previous = registry.current_version()
    registry.rollback(version)
    update = ModelUpdate(
        version=version,
        uri=_uri(registry, version),
        created_at=int(time.time() * 1000),
        parent_version=previous,
        metrics=dict(loaded.manifest.get("metrics", {})),
        trained_on_events=int(loaded.manifest.get("trained_on_events", 0)),
    )
    try:
        announce(config, update)
    except BrokerError as exc:
        print(orjson.dumps({"current": version, "announced": False}).decode())
        print(
            f"streamrec model rollback: CURRENT is {version}, but the ModelUpdate could not be "
            f"produced ({exc}); running workers follow on restart",
            file=sys.stderr,
        )
        return 1
    print(orjson.dumps({"current": version, "announced": True}).decode())
    return 0


def announce(config: Config, update: ModelUpdate) -> None:
    """Produce `update` to the model-updates topic, so running workers swap to it."""
    from pipeline.kafka import KafkaSink

    with KafkaSink(
        config.kafka, config.bootstrap_servers, client_id=f"{config.kafka.client_id}-model"
    ) as sink:
        sink.send(config.topics.model_updates, None, encode(update))
        sink.flush(30.0)


def _uri(registry: ModelRegistry, version: str) -> str:
    return (registry.root / version).resolve().as_uri()
