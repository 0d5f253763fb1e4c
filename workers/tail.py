"""`streamrec tail`: print recommendations, with their reasons, as they arrive."""

from __future__ import annotations

import threading
import time

import orjson

from pipeline.config import Config
from pipeline.kafka import TableReader

__all__ = ["run", "format_recommendation", "recommendations_reader"]


def recommendations_reader(
    config: Config, client_id: str, *, from_end: bool = False
) -> TableReader:
    """The recommendations topic read as a table (every partition, no group): how `tail` and
    the lab's collectors watch what the scorers publish."""
    return TableReader(
        config.kafka,
        config.bootstrap_servers,
        [config.topics.recommendations],
        client_id=client_id,
        from_end=from_end,
    )


def format_recommendation(rec: dict) -> str:
    trigger = rec.get("trigger_event_id") or rec.get("trigger") or "-"
    lines = [
        f"user {rec['user_id']}  (model {rec['model_version']}, trigger {trigger}, "
        f"rec {rec['rec_id'][:12]})"
    ]
    for item in rec["items"]:
        flag = " [explore]" if item["explore"] else ""
        lines.append(
            f"  {item['rank']:>2}. {item['item_id']:<10} {item['score']:+.3f}{flag}  "
            f"{item['reason']['text']}"
        )
    return "\n".join(lines)


def run(
    config: Config,
    *,
    max_count: int = 0,
    from_beginning: bool = False,
    idle_timeout_s: float = 0.0,
    stop: threading.Event | None = None,
) -> int:
    stop = stop or threading.Event()
    reader = recommendations_reader(
        config, f"{config.kafka.client_id}-tail", from_end=not from_beginning
    )
    shown = 0
    last = time.monotonic()
    try:
        while not stop.is_set():
            records = reader.poll(200, 100)
            for record in records:
                if record.value is None:
                    continue
                print(format_recommendation(orjson.loads(record.value)), flush=True)
                shown += 1
                if max_count and shown >= max_count:
                    return shown
            if records:
                last = time.monotonic()
            elif idle_timeout_s and time.monotonic() - last > idle_timeout_s:
                return shown
    finally:
        reader.close()
    return shown
