"""`streamrec demo` (what `make demo` runs): the whole pipeline on embedded defaults.

Starts the embedded broker, bootstraps a model on the first 80% (by time) of MovieLens-100K when
the registry has none, runs the updater and scorer as child processes, replays the remaining 20%
at a fixed rate, and reports: sample recommendations with reasons, the online HR@10 of emitted
recommendations against each user's next event, throughput, and where the metrics are.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import defaultdict
from typing import Any

import orjson

from pipeline.broker import EmbeddedBroker
from pipeline.config import Config
from pipeline.datasets import load_movielens_100k, split_by_time
from pipeline.kafka import KafkaSink, TableReader, ensure_topics
from pipeline.messages import Event
from workers.replay import produce_events, produce_items
from workers.tail import format_recommendation
from workers.up import Supervisor, ensure_model

__all__ = ["run", "online_hit_rate"]

log = logging.getLogger(__name__)


def online_hit_rate(events: list[Event], recs: dict[str, dict[str, Any]],
                    k: int = 10) -> dict[str, float]:
    """Prequential HR@k: the recommendation triggered by a user's event, judged by the item of
    that user's next event. Pairs whose trigger got no recommendation of its own (collapsed into
    a later one within a micro-batch) are not counted."""
    next_item: dict[str, str] = {}
    last_by_user: dict[str, str] = {}
    for event in events:
        previous = last_by_user.get(event.user_id)
        if previous is not None:
            next_item[previous] = event.item_id
        last_by_user[event.user_id] = event.event_id
    hits = judged = exploit_hits = 0
    for trigger, target in next_item.items():
        rec = recs.get(trigger)
        if rec is None:
            continue
        judged += 1
        items = rec["items"][:k]
        hits += any(i["item_id"] == target for i in items)
        exploit_hits += any(i["item_id"] == target and not i["explore"] for i in items)
    return {"judged": judged, "pairs": len(next_item),
            f"hr@{k}": hits / judged if judged else 0.0,
            f"hr@{k}_exploit_only": exploit_hits / judged if judged else 0.0}


def _collect(reader: TableReader, recs: dict[str, dict[str, Any]], stop: threading.Event) -> None:
    while not stop.is_set():
        for record in reader.poll(100, 1000):
            if record.value:
                rec = orjson.loads(record.value)
                if rec.get("trigger_event_id"):
                    recs[rec["trigger_event_id"]] = rec


def run(config: Config, *, rate: float = 1000.0, retrain: bool = False,
        stop: threading.Event | None = None) -> int:
    stop = stop or threading.Event()
    # The demo's catalog holds only rated movies: recommending one already rated is pointless.
    config = config.replace(scorer=dataclasses.replace(config.scorer, exclude_interacted=True))
    started = time.monotonic()
    data = load_movielens_100k(config.paths.cache)
    head, tail = split_by_time(data, config.training.bootstrap_fraction)
    broker = EmbeddedBroker(config.broker) if config.kafka.embedded else None
    try:
        if broker is not None:
            broker.start()
            print(f"broker: Tansu on {broker.bootstrap}")
        ensure_topics(config.kafka, config.bootstrap_servers, config.topics)
        if retrain:
            from workers.bootstrap import run as bootstrap

            bootstrap(config)
        else:
            ensure_model(config)
        recs: dict[str, dict[str, Any]] = {}
        reader = TableReader(config.kafka, config.bootstrap_servers,
                             [config.topics.recommendations], client_id="streamrec-demo",
                             from_end=True)
        reader.poll(0, 1)
        collector_stop = threading.Event()
        collector = threading.Thread(target=_collect, args=(reader, recs, collector_stop),
                                     daemon=True)
        with Supervisor(config, workers=("updater", "scorer")) as supervisor, KafkaSink(
                config.kafka, config.bootstrap_servers, client_id="streamrec-demo") as sink:
            collector.start()
            produce_items(sink, config.topics.items, data.items)
            time.sleep(0.5)
            events = list(tail.events)
            print(f"replaying the last {len(events):,} of {len(data.events):,} MovieLens-100K "
                  f"events at {rate:,.0f} events/s")
            seconds = produce_events(sink, config.topics.events, events, rate=rate)
            last_trigger = events[-1].event_id
            deadline = time.monotonic() + 120
            while last_trigger not in recs and time.monotonic() < deadline and not stop.is_set():
                supervisor.check()
                time.sleep(0.2)
            time.sleep(1.0)
            collector_stop.set()
            collector.join(timeout=5)
        reader.close()
        _report(config, events, recs, seconds, time.monotonic() - started)
    finally:
        if broker is not None:
            broker.stop()
    return 0


def _report(config: Config, events: list[Event], recs: dict[str, dict[str, Any]],
            replay_s: float, total_s: float) -> None:
    by_user: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for rec in recs.values():
        by_user[rec["user_id"]].append(rec)
    print("\nsample recommendations (with reasons):")
    for user_id in sorted(by_user, key=lambda u: -len(by_user[u]))[:3]:
        latest = max(by_user[user_id], key=lambda r: r["generated_at"])
        latest = dict(latest, items=latest["items"][:5])
        print(format_recommendation(latest))
    figures = online_hit_rate(events, recs, k=config.scorer.top_k)
    print(f"\nrecommendations received: {len(recs):,} for {len(events):,} events "
          f"replayed in {replay_s:.1f}s")
    print(f"online HR@{config.scorer.top_k} (next event of the same user in the top "
          f"{config.scorer.top_k}): {figures[f'hr@{config.scorer.top_k}']:.4f} over "
          f"{figures['judged']:,} judged pairs (exploit slots only: "
          f"{figures[f'hr@{config.scorer.top_k}_exploit_only']:.4f})")
    host = config.metrics.host
    print(f"metrics: http://{host}:{config.updater.metrics_port}/metrics (updater), "
          f"http://{host}:{config.scorer.metrics_port}/metrics (scorer) while workers run")
    print(f"demo finished in {total_s:.0f}s; models and state are under {config.paths.root}/")
