"""`--mode probe`: starts nothing; times a running deployment (`streamrec up`, or the configured
cluster's workers) from outside, producing to its events topic at a fixed rate under its own
user ids (`probe-u<n>`) and matching its recommendations by `trigger_event_id`. The probe's
events become real state and feedback there, like any client's."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from pipeline.config import Config
from pipeline.errors import StreamrecError
from pipeline.kafka import KafkaSink
from workers.lab.bench.load import (
    EventSource,
    Freshness,
    collect,
    load_settings,
    offered_load,
    registry_items,
)
from workers.tail import recommendations_reader

log = logging.getLogger(__name__)

__all__ = ["probe"]


def probe(
    config: Config, *, rate: float, duration_s: float, users: int, items: int
) -> dict[str, Any]:
    """Event -> recommendation latency of the deployment `config` points at, seen from outside:
    the figure a client gets, with everything that runs there (fine-tunes and swaps included)."""
    result: dict[str, Any] = {
        "config": {
            **load_settings(rate, duration_s, users, items),
            "mode": "probe",
            "events_topic": config.topics.events,
            "recommendations_topic": config.topics.recommendations,
            "broker": config.kafka.bootstrap_servers or config.broker.bootstrap,
        }
    }
    freshness = Freshness()
    item_ids = registry_items(config, items)
    result["config"]["item_ids"] = "registry" if item_ids else "synthetic"
    source = EventSource(
        users, items, seed=int(time.time()), user_prefix="probe-u", item_ids=item_ids
    )
    reader = recommendations_reader(config, "bench-probe-reader", from_end=True)
    if not reader.wait_at_end(30):  # else answers to the first events could be skipped as old
        reader.close()
        raise StreamrecError(
            f"bench probe: could not find the end of {config.topics.recommendations} within 30 s"
        )
    stop = threading.Event()
    collector = threading.Thread(target=collect, args=(reader, freshness, stop), daemon=True)
    collector.start()
    try:
        with KafkaSink(config.kafka, config.bootstrap_servers, client_id="bench-probe") as sink:
            log.info(
                "bench: probing %s at %.0f events/s for %.0fs",
                config.topics.events,
                rate,
                duration_s,
            )
            result["offered"] = offered_load(
                sink, config.topics.events, source, freshness, rate, duration_s
            )
    finally:
        stop.set()
        collector.join(timeout=5)
        reader.close()
    return result
