"""`streamrec bench`: freshness and throughput of the real updater and scorer processes.

One JSON object plus a table, on fresh topics (a unique prefix) of the embedded broker or the
configured cluster. One module per mode:
- ceiling.py: consume -> parse -> produce pass-through, the throughput yardstick;
- floor.py: a raw pass-through process at the offered rate, the latency yardstick;
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
from workers.lab.bench.floor import floor
from workers.lab.bench.load import Freshness, load_settings, percentiles, registry_items
from workers.lab.bench.memory import state_memory
from workers.lab.bench.probe import probe
from workers.lab.bench.report import format_table
from workers.lab.bench.serving import ensure_bench_model, run_workers

__all__ = [
    "run",
    "probe",
    "percentiles",
    "Freshness",
    "format_table",
    "ratios_to_floor",
    "TOPOLOGIES",
]

log = logging.getLogger(__name__)

TOPOLOGIES = ("separate", "colocated")


def ratios_to_floor(
    offered: dict[str, Any] | None, floor_figures: dict[str, Any] | None
) -> dict[str, float]:
    """p50 and p99 of a run's offered load over the same-run floor's (issue 21's targets are
    <= 1.5 each); {} when either side is missing."""
    if not offered or not floor_figures:
        return {}
    return {
        f"{q}_ratio_to_floor": round(offered[f"{q}_ms"] / floor_figures[f"{q}_ms"], 2)
        for q in ("p50", "p99")
        if offered.get(f"{q}_ms") and floor_figures.get(f"{q}_ms")
    }


def run(
    config: Config,
    *,
    rate: float = 1000.0,
    duration_s: float = 60.0,
    users: int = 10_000,
    items: int = 2000,
    saturation_events: int = 50_000,
    ceiling_events: int = 50_000,
    modes: tuple[str, ...] = ("ceiling", "offered", "saturation"),
    instances: int = 1,
    topologies: tuple[str, ...] = (),
) -> dict[str, Any]:
    """`topologies`: which serving topologies the offered load and saturation measure, each on
    fresh topics: "separate" (updater -> user vectors -> scorer) and "colocated" (the updater
    scores, updater.score); default the one `config` runs. With two, their figures sit under
    result["topologies"][name], with one at the top level."""
    topologies = topologies or (("colocated",) if config.updater.score else ("separate",))
    unknown = set(topologies) - set(TOPOLOGIES)
    if unknown:
        raise ValueError(f"unknown topology {sorted(unknown)}: expected {TOPOLOGIES}")
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
    result: dict[str, Any] = {
        "config": {
            **load_settings(rate, duration_s, users, items),
            "partitions": config.topics.partitions,
            "instances_per_worker": instances,
            "topologies": list(topologies),
            "updater_batch_max_records": config.updater.batch_max_records,
            "scorer_batch_max_records": config.scorer.batch_max_records,
            "fetch_max_wait_ms": config.kafka.fetch_max_wait_ms,
            "linger_ms": config.kafka.linger_ms,
            "broker": "embedded tansu" if broker else config.kafka.bootstrap_servers,
        }
    }
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
            scorer=dataclasses.replace(config.scorer, metrics_port=free_port()),
        )
        ensure_topics(run_config.kafka, run_config.bootstrap_servers, run_config.topics)
        if "ceiling" in modes:
            log.info("bench: ceiling pass-through over %d messages", ceiling_events)
            result["ceiling"] = ceiling(run_config, ceiling_events)
        if "floor" in modes:
            log.info("bench: latency floor, raw pass-through at %.0f events/s", rate)
            result["floor"] = floor(
                run_config, rate=rate, duration_s=duration_s, users=users, items=items
            )
        if "catalog" in modes:
            log.info("bench: catalog scale, 1M items")
            result["catalog"] = catalog_scale(config)
        runs: dict[str, dict[str, Any]] = {}
        for topology in topologies if {"offered", "saturation"} & set(modes) else ():
            log.info("bench: %s topology", topology)
            topology_config = run_config.replace(
                topics=dataclasses.replace(
                    run_config.topics, prefix=f"bench{uuid.uuid4().hex[:6]}."
                ),
                updater=dataclasses.replace(
                    run_config.updater, metrics_port=free_port(), score=topology == "colocated"
                ),
                scorer=dataclasses.replace(run_config.scorer, metrics_port=free_port()),
            )
            ensure_topics(
                topology_config.kafka, topology_config.bootstrap_servers, topology_config.topics
            )
            runs[topology] = run_workers(
                topology_config,
                rate=rate,
                duration_s=duration_s,
                users=users,
                items=items,
                saturation_events=saturation_events,
                modes=modes,
                instances=instances,
                item_ids=item_ids,
                broker_pid=broker.pid if broker else None,
            )
        yardstick = (result.get("ceiling") or {}).get("msgs_per_s")
        for figures in runs.values():
            sustained = (figures.get("saturation") or {}).get("events_per_s")
            if yardstick and sustained:
                figures["saturation"]["ratio_to_ceiling"] = round(sustained / yardstick, 3)
        for figures in runs.values():
            figures.get("offered", {}).update(
                ratios_to_floor(figures.get("offered"), result.get("floor"))
            )
        if len(runs) == 1:
            result.update(next(iter(runs.values())))
        elif runs:
            result["topologies"] = runs
        if memory is not None:
            result["state_memory"] = memory
    finally:
        if broker is not None:
            broker.stop()
    return result
