"""`streamrec model list|rollback VERSION`: inspect the registry and move its current pointer."""

from __future__ import annotations

import orjson

from pipeline.config import Config
from pipeline.errors import RegistryError
from pipeline.registry import ModelRegistry

__all__ = ["run"]


def run(config: Config, action: str, version: str | None) -> int:
    registry = ModelRegistry(config.paths.models)
    if action == "list":
        versions = registry.versions()
        if not versions:
            print(f"no model versions under {registry.root}")
        for v in versions:
            marker = "*" if v["current"] else " "
            metrics = " ".join(f"{k}={val:.4f}" for k, val in sorted(v["metrics"].items())
                               if isinstance(val, (int, float)))
            print(f"{marker} {v['version']}  parent={v['parent_version'] or '-'}  "
                  f"events={v['trained_on_events']}  {metrics}")
        return 0
    if version is None:
        raise RegistryError("model rollback needs a VERSION (see `streamrec model list`)")
    registry.load(version)  # verify before pointing anything at it
    registry.rollback(version)
    print(orjson.dumps({"current": version}).decode())
    return 0
