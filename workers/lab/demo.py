"""`streamrec demo` (what `make demo` runs): the whole pipeline on embedded defaults.

Starts the embedded broker, bootstraps a model on the first 80% (by time) of MovieLens-100K when
the registry has none, runs the serving workers as child processes (the updater scoring alone by
default, updater.score; with the scorer when that is off), replays the remaining 20%
at a fixed rate, and reports: sample recommendations with reasons, the online HR@10 of emitted
recommendations against each user's next event, throughput, and where the metrics are.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import orjson

from pipeline.broker import EmbeddedBroker
from pipeline.config import Config
from pipeline.datasets import load_movielens_100k, split_by_time
from pipeline.files import private_dirs
from pipeline.kafka import KafkaSink, TableReader, ensure_topics
from pipeline.messages import Event
from workers.lab.scrape import metrics_pages
from workers.replay import produce_events, produce_items
from workers.tail import format_recommendation, recommendations_reader
from workers.up import Supervisor, ensure_model, serving_workers

__all__ = ["run", "online_hit_rate"]

log = logging.getLogger(__name__)

# Training stops at its best epoch so far after this long: the demo ends in minutes even on a
# busy machine (on a quiet 2-core machine the full bootstrap takes ~100 s and is not cut).
_BOOTSTRAP_BUDGET_S = 150.0


def online_hit_rate(
    events: list[Event], sent_at_ms: dict[str, int], recs: list[dict[str, Any]], k: int = 10
) -> dict[str, float]:
    """Online HR@k as a user would have experienced it: each event is judged against the latest
    recommendation that user had been sent before the event was produced (events of users with
    no recommendation yet are not judged). Also the share hit by exploit slots only."""
    by_user: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for rec in recs:
        by_user[rec["user_id"]].append(rec)
    for user_recs in by_user.values():
        user_recs.sort(key=lambda r: r["generated_at"])
    cursor: dict[str, int] = defaultdict(int)
    hits = exploit_hits = judged = 0
    for event in events:  # in produce order, so each user's cursor only moves forward
        user_recs = by_user.get(event.user_id, [])
        at = sent_at_ms.get(event.event_id)
        i = cursor[event.user_id]
        while at is not None and i < len(user_recs) and user_recs[i]["generated_at"] < at:
            i += 1
        cursor[event.user_id] = i
        if i == 0:
            continue
        judged += 1
        items = user_recs[i - 1]["items"][:k]
        hits += any(it["item_id"] == event.item_id for it in items)
        exploit_hits += any(it["item_id"] == event.item_id and not it["explore"] for it in items)
    return {
        "judged": judged,
        f"hr@{k}": hits / judged if judged else 0.0,
        f"hr@{k}_exploit_only": exploit_hits / judged if judged else 0.0,
    }


def _collect(reader: TableReader, recs: list[dict[str, Any]], stop: threading.Event) -> None:
    while not stop.is_set():
        for record in reader.poll(100, 1000):
            if record.value:
                recs.append(orjson.loads(record.value))


def run(
    config: Config,
    *,
    rate: float = 1000.0,
    retrain: bool = False,
    stop: threading.Event | None = None,
) -> int:
    stop = stop or threading.Event()
    # The demo's catalog holds only rated movies: recommending one already rated is pointless.
    # Each run replays the same events, so it starts from empty user state of its own (a state
    # dir kept from an earlier run would rightly drop them all as duplicates); models are reused.
    run_state = Path(tempfile.mkdtemp(prefix="demo-state-", dir=_ensure_dir(config.paths.root)))
    config = config.replace(
        scorer=dataclasses.replace(config.scorer, exclude_interacted=True),
        paths=dataclasses.replace(config.paths, state_dir=str(run_state)),
    )
    started = time.monotonic()
    data = load_movielens_100k(config.paths.cache)
    _, tail = split_by_time(data, config.training.bootstrap_fraction)
    broker = EmbeddedBroker(config.broker) if config.kafka.embedded else None
    try:
        if broker is not None:
            broker.start()
            print(f"broker: Tansu on {broker.bootstrap}")
        ensure_topics(config.kafka, config.bootstrap_servers, config.topics)
        if retrain:
            from workers.bootstrap import run as bootstrap

            bootstrap(config, dataset=data)
        else:  # MovieLens explicitly: `up` no longer trains on it unless asked
            ensure_model(config, max_train_seconds=_BOOTSTRAP_BUDGET_S, dataset=data)
        recs: list[dict[str, Any]] = []
        sent_at_ms: dict[str, int] = {}
        reader = recommendations_reader(config, "streamrec-demo", from_end=True)
        reader.poll(0, 1)
        collector_stop = threading.Event()
        collector = threading.Thread(
            target=_collect, args=(reader, recs, collector_stop), daemon=True
        )
        with (
            Supervisor(config, workers=serving_workers(config)) as supervisor,
            KafkaSink(config.kafka, config.bootstrap_servers, client_id="streamrec-demo") as sink,
        ):
            collector.start()
            produce_items(sink, config.topics.items, data.items)
            _wait_until_serving(sink, config, recs, supervisor, stop)
            events = list(tail.events)
            print(
                f"replaying the last {len(events):,} of {len(data.events):,} MovieLens-100K "
                f"events at {rate:,.0f} events/s"
            )
            seconds = produce_events(
                sink,
                config.topics.events,
                events,
                rate=rate,
                on_sent=lambda e, t: sent_at_ms.__setitem__(e.event_id, int(t * 1000)),
            )
            last_trigger = events[-1].event_id
            deadline = time.monotonic() + 120
            while (
                not any(r.get("trigger_event_id") == last_trigger for r in recs[-50:])
                and time.monotonic() < deadline
                and not stop.is_set()
            ):
                supervisor.check()
                time.sleep(0.2)
            time.sleep(1.0)
            collector_stop.set()
            collector.join(timeout=5)
            live_metrics = metrics_pages(config, serving_workers(config))
        reader.close()
        _report(config, events, sent_at_ms, recs, seconds, time.monotonic() - started, live_metrics)
    finally:
        if broker is not None:
            broker.stop()
        shutil.rmtree(run_state, ignore_errors=True)
    return 0


def _wait_until_serving(
    sink: KafkaSink,
    config: Config,
    recs: list[dict[str, Any]],
    supervisor: Supervisor,
    stop: threading.Event,
) -> None:
    """Workers join their groups and load the model first: one warm-up event (a user of its
    own, left out of every figure) must come back as a recommendation before the replay."""
    warmup = Event("demo-warmup", "demo-warmup-user", "1", "click", int(time.time() * 1000))
    sink.send(config.topics.events, warmup.user_id.encode(), orjson.dumps(warmup.to_dict()))
    sink.flush(30)
    deadline = time.monotonic() + 180
    while not any(r.get("trigger_event_id") == "demo-warmup" for r in recs):
        if time.monotonic() > deadline or stop.is_set():
            raise TimeoutError("the workers did not answer a warm-up event within 180 s")
        supervisor.check()
        time.sleep(0.1)
    recs.clear()


def _ensure_dir(path: Path) -> Path:
    return private_dirs(path)


def _quantile_ms(page: str, name: str, q: float) -> float | None:
    """A quantile (upper bucket bound, ms) from a Prometheus histogram's text exposition."""
    buckets = []
    for line in page.splitlines():
        if line.startswith(f"{name}_bucket{{"):
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append(
                (float("inf") if bound == "+Inf" else float(bound), float(line.rsplit(" ", 1)[1]))
            )
    if not buckets or buckets[-1][1] == 0:
        return None
    total = buckets[-1][1]
    return next(b * 1000 for b, count in sorted(buckets) if count >= q * total)


def _counter(page: str, prefix: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in page.splitlines()
        if line.startswith(prefix) and not line.startswith("#")
    )


def _report(
    config: Config,
    events: list[Event],
    sent_at_ms: dict[str, int],
    recs: list[dict[str, Any]],
    replay_s: float,
    total_s: float,
    live_metrics: dict[str, str],
) -> None:
    by_user: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for rec in recs:
        by_user[rec["user_id"]].append(rec)
    print("\nsample recommendations (with reasons):")
    for user_id in sorted(by_user, key=lambda u: -len(by_user[u]))[:3]:
        latest = max(by_user[user_id], key=lambda r: r["generated_at"])
        print(format_recommendation(dict(latest, items=latest["items"][:5])))
    k = config.scorer.top_k
    figures = online_hit_rate(events, sent_at_ms, recs, k=k)
    print(
        f"\n{len(recs):,} recommendations for {len(events):,} events replayed in "
        f"{replay_s:.1f}s ({len(by_user):,} users; a user's events within one micro-batch "
        "share one recommendation)"
    )
    print(
        f"online HR@{k} (each event vs the recommendation its user had at that moment): "
        f"{figures[f'hr@{k}']:.4f} over {figures['judged']:,} events "
        f"(exploit slots only: {figures[f'hr@{k}_exploit_only']:.4f})"
    )
    answering = serving_workers(config)[-1]  # the worker that produces the recommendations
    updater = live_metrics.get("updater", "")
    page = live_metrics.get(answering, "")
    p50 = _quantile_ms(page, "streamrec_end_to_end_latency_seconds", 0.5)
    p99 = _quantile_ms(page, "streamrec_end_to_end_latency_seconds", 0.99)
    if p50 is not None:
        print(
            f"event produced -> recommendation produced ({answering} metric): "
            f"p50 <= {p50:.0f} ms, p99 <= {p99:.0f} ms"
        )
    if updater:
        print(
            f"updater: {_counter(updater, 'streamrec_messages_consumed_total'):,.0f} "
            f"messages consumed, {_counter(updater, 'streamrec_messages_invalid_total'):,.0f}"
            f" invalid, {_counter(updater, 'streamrec_duplicates_total'):,.0f} duplicates"
        )
    host = config.metrics.host
    ports = {"updater": config.updater.metrics_port, "scorer": config.scorer.metrics_port}
    print(
        "metrics were served at "
        + " and ".join(f"http://{host}:{ports[w]}/metrics ({w})" for w in serving_workers(config))
        + "; `streamrec up` keeps them running"
    )
    print(f"demo finished in {total_s:.0f}s; models and state are under {config.paths.root}/")
