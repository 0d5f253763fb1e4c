"""`streamrec bench`: freshness and throughput of the real updater and scorer processes.

One JSON object plus a table, on fresh topics (a unique prefix) of the embedded broker or the
configured cluster. One module per mode:
- ceiling.py: consume -> parse -> produce pass-through, the yardstick;
- serving.py: offered load (latency at a fixed rate) and saturation (sustained events/s, CPU
  per 1,000 events) of the real worker processes;
- probe.py: a running deployment timed from outside (alone);
- catalog.py: ANN vs exact top-10 over 1M items;
- memory.py: the updater's state in memory (in process, no broker);
- codecs.py: Kafka compression codecs (`python -m workers.lab.bench.codecs`).
load.py has what they share (events, pacing, matching answers), report.py the table.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from typing import Any

from pipeline.broker import EmbeddedBroker, free_port
from pipeline.config import Config, PathsConfig
from pipeline.kafka import ensure_topics
from workers.lab.bench.catalog import catalog_scale
from workers.lab.bench.ceiling import ceiling
from workers.lab.bench.load import Freshness, percentiles, registry_items
from workers.lab.bench.memory import state_memory
from workers.lab.bench.probe import probe
from workers.lab.bench.report import format_table
from workers.lab.bench.serving import ensure_bench_model, run_workers

__all__ = ["run", "probe", "percentiles", "Freshness", "format_table"]

log = logging.getLogger(__name__)


def run(config: Config, *, rate: float = 1000.0, duration_s: float = 60.0, users: int = 10_000,
        items: int = 2000, saturation_events: int = 50_000, ceiling_events: int = 50_000,
        modes: tuple[str, ...] = ("ceiling", "offered", "saturation"),
        instances: int = 1) -> dict[str, Any]:
    memory = state_memory(config.updater) if "memory" in modes else None
    if set(modes) == {"memory"}:
        return {"state_memory": memory}
    if "probe" in modes:
        if set(modes) != {"probe"}:
            raise ValueError("--mode probe times a running deployment; run it on its own")
        return probe(config, rate=rate, duration_s=duration_s, users=users, items=items)
    bench_root = config.paths.root / "bench"
    config = config.replace(paths=PathsConfig(str(bench_root)))
    broker = EmbeddedBroker(config.broker) if config.kafka.embedded else None
    result: dict[str, Any] = {"config": {
        "rate": rate, "duration_s": duration_s, "users": users, "catalog_items": items,
        "partitions": config.topics.partitions, "instances_per_worker": instances,
        "updater_batch_max_records": config.updater.batch_max_records,
        "scorer_batch_max_records": config.scorer.batch_max_records,
        "fetch_max_wait_ms": config.kafka.fetch_max_wait_ms, "linger_ms": config.kafka.linger_ms,
        "broker": "embedded tansu" if broker else config.kafka.bootstrap_servers}}
    try:
        if broker is not None:
            broker.start()
        result["config"]["model_version"] = ensure_bench_model(config)
        result["config"]["model"] = dataclasses.asdict(config.model)
        item_ids = registry_items(config, items)
        if item_ids:
            result["config"]["catalog_items"] = len(item_ids)
        run_config = config.replace(
            topics=dataclasses.replace(config.topics, prefix=f"bench{uuid.uuid4().hex[:6]}."),
            updater=dataclasses.replace(config.updater, metrics_port=free_port()),
            scorer=dataclasses.replace(config.scorer, metrics_port=free_port()))
        ensure_topics(run_config.kafka, run_config.bootstrap_servers, run_config.topics)
        if "ceiling" in modes:
            log.info("bench: ceiling pass-through over %d messages", ceiling_events)
            result["ceiling"] = ceiling(run_config, ceiling_events)
        if "catalog" in modes:
            log.info("bench: catalog scale, 1M items")
            result["catalog"] = catalog_scale(config)
        if {"offered", "saturation"} & set(modes):
            result.update(run_workers(run_config, rate=rate, duration_s=duration_s, users=users,
                                      items=items, saturation_events=saturation_events,
                                      modes=modes, instances=instances, item_ids=item_ids,
                                      broker_pid=broker.pid if broker else None))
        if memory is not None:
            result["state_memory"] = memory
        yardstick = (result.get("ceiling") or {}).get("msgs_per_s")
        sustained = (result.get("saturation") or {}).get("events_per_s")
        if yardstick and sustained:
            result["saturation"]["ratio_to_ceiling"] = round(sustained / yardstick, 3)
    finally:
        if broker is not None:
            broker.stop()
    return result
