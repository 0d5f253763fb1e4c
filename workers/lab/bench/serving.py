"""`--mode offered` and `--mode saturation`: the real updater and scorer processes under load.

offered: synthetic events at a fixed rate; latency from the moment an event was produced to
the moment the first recommendation reflecting it was consumed. saturation: a backlog produced
as fast as possible; sustained events/s until the last event's recommendation arrives, with
CPU seconds per 1,000 events of each worker. Where the time goes comes from each worker's own
metrics page, as an operator would see it in Prometheus."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Any

from pipeline.config import Config
from pipeline.kafka import KafkaSink
from pipeline.registry import ModelRegistry
from workers.lab.bench.load import (
    EventSource,
    Freshness,
    collect,
    cpu_seconds,
    offered_load,
    wait_answered,
)
from workers.lab.scrape import metric_sums, metrics_pages
from workers.tail import recommendations_reader
from workers.up import Supervisor

log = logging.getLogger(__name__)

__all__ = ["ensure_bench_model", "run_workers"]


def ensure_bench_model(config: Config) -> str:
    registry = ModelRegistry(config.paths.models)
    if registry.current_version() is None:
        from workers.bootstrap import run as bootstrap

        log.info("bench: training a small synthetic model once into %s", config.paths.models)
        bootstrap(
            config.replace(
                training=dataclasses.replace(config.training, dataset="synthetic", epochs=3)
            ),
            progress=False,
        )
    return str(registry.current_version())


def run_workers(
    config: Config,
    *,
    rate: float,
    duration_s: float,
    users: int,
    items: int,
    saturation_events: int,
    modes: tuple[str, ...],
    instances: int = 1,
    item_ids: list[str] | None = None,
    broker_pid: int | None = None,
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    freshness = Freshness()
    source = EventSource(users, items, seed=7, item_ids=item_ids)
    reader = recommendations_reader(config, "bench-reader")
    stop = threading.Event()
    collector = threading.Thread(target=collect, args=(reader, freshness, stop), daemon=True)
    # Co-located scoring (updater.score): the updater answers, no scorer runs.
    workers = ("updater",) * instances + ("scorer",) * (0 if config.updater.score else instances)
    with (
        Supervisor(config, workers=workers, log_level="WARNING") as supervisor,
        KafkaSink(config.kafka, config.bootstrap_servers, client_id="bench-producer") as sink,
    ):
        collector.start()
        _warm_up(sink, config, source, freshness, supervisor)
        if "offered" in modes:
            log.info("bench: offered load %.0f events/s for %.0fs", rate, duration_s)
            freshness.clear()
            batches = _batches(config)
            started, broker_cpu = time.time(), cpu_seconds(broker_pid) if broker_pid else 0.0
            out["offered"] = offered_load(
                sink,
                config.topics.events,
                source,
                freshness,
                rate,
                duration_s,
                lag_at_end=lambda: _consumer_lag(config),
            )
            out["offered"]["mean_batch_records"] = _mean_batch(batches, _batches(config))
            if broker_pid:
                out["offered"]["broker_cpu_share"] = round(
                    (cpu_seconds(broker_pid) - broker_cpu) / (time.time() - started), 2
                )
        if "saturation" in modes:
            batches = _batches(config)
            out["saturation"] = _saturate(
                sink, config, source, freshness, supervisor, saturation_events
            )
            out["saturation"]["mean_batch_records"] = _mean_batch(batches, _batches(config))
        out["stage_seconds"], out["user_encodes"] = _worker_figures(config)
        stop.set()
        collector.join(timeout=5)
    reader.close()
    return out


def _answering_workers(config: Config) -> tuple[str, ...]:
    """The workers a topology runs: the updater alone when it scores (updater.score)."""
    return ("updater",) if config.updater.score else ("updater", "scorer")


def _consumer_lag(config: Config) -> dict[str, int]:
    """Records each worker has not read yet, over its input partitions, as it exports them
    (`streamrec_consumer_lag_messages{worker=...}`, refreshed once a second)."""
    return {
        worker: int(sum(metric_sums(page, "streamrec_consumer_lag_messages").values()))
        for worker, page in metrics_pages(config, _answering_workers(config)).items()
    }


def _batches(config: Config) -> dict[str, tuple[float, float]]:
    """(records, micro-batches) each answering worker has handled so far
    (`streamrec_batch_size`): how its batches grow with the backlog."""
    out = {}
    for worker, page in metrics_pages(config, _answering_workers(config)).items():
        records = sum(metric_sums(page, "streamrec_batch_size_sum").values())
        out[worker] = (records, sum(metric_sums(page, "streamrec_batch_size_count").values()))
    return out


def _mean_batch(
    before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]
) -> dict[str, float]:
    """Records per micro-batch of each worker between two `_batches` readings."""
    return {
        worker: round((records - before[worker][0]) / max(1.0, count - before[worker][1]), 1)
        for worker, (records, count) in after.items()
        if worker in before
    }


def _worker_figures(config: Config) -> tuple[dict[str, dict[str, float]], dict[str, int]]:
    """Seconds spent per stage over the whole run, and the updater's user vectors by refresh
    mode (incremental | full), from each worker's own metrics page: where the time goes, as an
    operator would see it in Prometheus."""
    out: dict[str, dict[str, float]] = {}
    encodes: dict[str, int] = {}
    for worker, page in metrics_pages(config, _answering_workers(config)).items():
        out[worker] = {
            stage: round(seconds, 2)
            for stage, seconds in metric_sums(
                page, "streamrec_stage_seconds_sum", by="stage"
            ).items()
        }
        for mode, n in metric_sums(
            page, f"streamrec_{worker}_user_encodes_total", by="mode"
        ).items():
            encodes[mode] = encodes.get(mode, 0) + int(n)
    return out, encodes


def _warm_up(
    sink: KafkaSink,
    config: Config,
    source: EventSource,
    freshness: Freshness,
    supervisor: Supervisor,
) -> None:
    """Until the workers answer (group joins, model loads), a trickle of events."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        supervisor.check()
        for event_id, user, value, seq in source.batch(20):
            sink.send(config.topics.events, user.encode(), value)
            freshness.sent(event_id, user, seq, time.time())
        sink.flush(10)
        time.sleep(0.5)
        if freshness.latencies_ms:
            wait_answered(freshness, 10)
            return
    raise RuntimeError("workers did not answer within 180 s")


def _saturate(
    sink: KafkaSink,
    config: Config,
    source: EventSource,
    freshness: Freshness,
    supervisor: Supervisor,
    n: int,
) -> dict[str, Any]:
    pids = {name: proc.pid for name, proc in supervisor.children.items()}
    cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    events = source.batch(n)
    started = time.time()
    for event_id, user, value, seq in events:
        sink.send(config.topics.events, user.encode(), value)
        freshness.sent(event_id, user, seq, started)
    sink.flush(120)
    produced_s = time.time() - started
    wait_answered(freshness, 300)
    elapsed = freshness.last_received - started
    cpu: dict[str, float] = {}
    for name, pid in pids.items():  # per worker kind, summed over its instances
        kind = name.partition("-")[0]
        cpu[kind] = cpu.get(kind, 0.0) + cpu_seconds(pid) - cpu_before[name]
    return {
        "events": n,
        "produce_seconds": round(produced_s, 2),
        "seconds_to_last_recommendation": round(elapsed, 2),
        "events_per_s": round(n / elapsed, 1) if elapsed > 0 else None,
        "unanswered": freshness.unanswered(),
        "cpu_seconds_per_1000_events": {k: round(v * 1000 / n, 3) for k, v in cpu.items()},
    }
