"""Prometheus metrics of one worker, bound to its own CollectorRegistry (never the global one, so
two workers in one process or one test never mix series).

Names: a series every worker has is `streamrec_<what>{worker="updater|scorer|finetune"}` (one
name to query across workers); a series only one worker has is `streamrec_<worker>_<what>` and
carries the same `worker` label, so every streamrec series can be filtered the same way. The
docs/METRICS.md lists them all.

Labels are bounded sets only (worker, topic, partition, reason, stage): never user or item ids.
The only importer of prometheus_client. `serve` also answers /healthz and /readyz on the
same port, from what the consumer loop last did (pipeline/health.py).
"""

from __future__ import annotations

import platform
import socket
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    make_wsgi_app,
)

from pipeline import __version__
from pipeline.health import LoopHealth, Verdict

__all__ = [
    "WorkerMetrics",
    "UpdaterMetrics",
    "FinetuneMetrics",
    "SupervisorMetrics",
    "serve",
    "STAGES",
]

STAGES = ("poll", "validate", "state_update", "encode", "score", "produce", "persist", "commit")

_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
_BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)


def _registry() -> CollectorRegistry:
    """A registry of its own, with the process's standard series (process_*, python_*) and
    streamrec_build_info, as the default registry would have them."""
    registry = CollectorRegistry(auto_describe=True)
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    Gauge(
        "streamrec_build_info",
        "streamrec and Python versions of this process (value 1)",
        ["version", "python"],
        registry=registry,
    ).labels(version=__version__, python=platform.python_version()).set(1)
    return registry


class _WorkerSeries:
    """A metric with more labels than `worker`, seen through one worker's label: `labels()` and
    `remove()` take the other labels only (positionally or by name), as callers wrote them
    before the label existed."""

    def __init__(self, metric: Any, worker: str) -> None:
        self._metric = metric
        self._worker = worker

    def labels(self, *values: str, **labels: str) -> Any:
        if values:
            return self._metric.labels(self._worker, *values)
        return self._metric.labels(worker=self._worker, **labels)

    def remove(self, *values: str) -> None:
        self._metric.remove(self._worker, *values)

    def clear(self) -> None:
        self._metric.clear()  # one worker per registry: its series are all there are


class WorkerMetrics:
    """Every series the consumer loop exports, the same names in every worker."""

    def __init__(self, worker: str) -> None:
        self.worker = worker
        self.registry = _registry()
        shared = self._shared
        self.consumed = shared(Counter, "messages_consumed_total", "Messages consumed", ["topic"])
        self.produced = shared(Counter, "messages_produced_total", "Messages produced", ["topic"])
        self.invalid = shared(
            Counter,
            "messages_invalid_total",
            "Messages sent to the DLQ, by reason",
            ["topic", "reason"],
        )
        self.duplicates = shared(Counter, "duplicates_total", "Messages recognised as duplicates")
        self.key_mismatch = shared(
            Counter,
            "key_mismatch_total",
            "Messages whose key differs from the id in the value",
            ["topic"],
        )
        self.misrouted = shared(
            Counter,
            "misrouted_total",
            "Keyed records that arrived on a partition other than murmur2 "
            "of their key gives (a producer not partitioning by murmur2)",
            ["topic"],
        )
        self.batch_size = shared(
            Histogram, "batch_size", "Records per micro-batch", buckets=_BATCH_BUCKETS
        )
        self.stage_seconds = shared(
            Histogram,
            "stage_seconds",
            "Time spent per micro-batch stage",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
        )
        self.batch_seconds = shared(
            Histogram,
            "batch_processing_seconds",
            "Wall time to process one micro-batch end to end",
            buckets=_LATENCY_BUCKETS,
        )
        self.end_to_end_seconds = shared(
            Histogram,
            "end_to_end_latency_seconds",
            "From the triggering event's produce time to this worker's answer acknowledged",
            buckets=_LATENCY_BUCKETS,
        )
        self.event_age_seconds = shared(
            Histogram,
            "event_time_lag_seconds",
            "From event time (ts) to output produced",
            buckets=_LATENCY_BUCKETS + (60.0, 600.0, 3600.0),
        )
        self.lag = shared(
            Gauge, "consumer_lag_messages", "High watermark minus position", ["topic", "partition"]
        )
        self.fetch_wait_seconds = shared(
            Gauge,
            "fetch_max_wait_seconds",
            "Fetch wait the input consumer asks for now; above kafka.fetch_max_wait_ms when the "
            "broker starved it (a long log on the embedded broker)",
        )
        self.model_version = shared(
            Gauge, "model_info", "Model version in use (value 1)", ["version"]
        )
        self.model_created = shared(
            Gauge,
            "model_created_timestamp_seconds",
            "When the model version in use was published (Unix "
            "seconds; 0 while no model is loaded)",
        )
        self.started = shared(
            Gauge,
            "start_time_seconds",
            "When this worker process started (Unix seconds): its changes count restarts",
        )
        self.started.set_to_current_time()
        self.state_users = shared(Gauge, "state_users", "Users held in state")
        self.state_items = shared(Gauge, "state_items", "Items held in the catalog")
        self.broker_resets = shared(
            Counter,
            "broker_resets_total",
            "Input logs found behind the stored offsets (broker lost data)",
        )
        self.partitions = shared(
            Gauge, "assigned_partitions", "Partitions assigned to this instance"
        )
        self.rebalances = shared(
            Counter,
            "rebalances_total",
            "Partition assignments the group handed this instance (the first one included)",
        )
        self.commit_failures = shared(
            Counter,
            "commit_failures_total",
            "Offset commits that failed (refused by the group after a "
            "rebalance, or a broker error)",
        )
        self.model_swaps = shared(Counter, "model_swaps_total", "Hot swaps to a new model version")
        self.quarantined = shared(
            Counter,
            "quarantined_total",
            "Records dead-lettered unapplied because the worker died twice applying them",
            ["topic"],
        )
        self.crashes = shared(
            Counter,
            "crashes_total",
            "Starts of this instance that found its predecessor died mid-batch (kept across "
            "restarts)",
        )
        self.poll_age = shared(
            Gauge,
            "seconds_since_last_poll",
            "Seconds since the consumer loop last completed a poll (what "
            "/healthz judges against metrics.liveness_timeout_s)",
        )
        self.skipped_table_records = shared(
            Counter,
            "table_records_invalid_total",
            "Invalid records skipped by the global table reader (the owning group DLQs them)",
            ["topic", "reason"],
        )

    def _shared(
        self, kind: Any, what: str, doc: str, labels: list[str] | None = None, **options: Any
    ) -> Any:
        """A series every worker has: `streamrec_<what>{worker=...}`."""
        return self._series(kind, f"streamrec_{what}", doc, labels or [], options)

    def _own(
        self, kind: Any, what: str, doc: str, labels: list[str] | None = None, **options: Any
    ) -> Any:
        """A series only this worker has: `streamrec_<worker>_<what>{worker=...}`."""
        return self._series(kind, f"streamrec_{self.worker}_{what}", doc, labels or [], options)

    def _series(
        self, kind: Any, name: str, doc: str, labels: list[str], options: dict[str, Any]
    ) -> Any:
        metric = kind(name, doc, ["worker", *labels], registry=self.registry, **options)
        return _WorkerSeries(metric, self.worker) if labels else metric.labels(worker=self.worker)

    def set_model_version(self, version: str, created_at_ms: int | None = None) -> None:
        self.model_version.clear()
        self.model_version.labels(version=version).set(1)
        self.model_created.set((created_at_ms or 0) / 1000)

    def watch_topics(self, topics: list[str]) -> None:
        """Export the per-topic counters of the input topics at 0 from the start, so a rate,
        a dashboard panel or an alert over them has a series before the first record."""
        for topic in topics:
            for counter in (self.consumed, self.quarantined, self.key_mismatch, self.misrouted):
                counter.labels(topic=topic)

    def time_stage(self, stage: str) -> Any:
        return self.stage_seconds.labels(stage=stage).time()


class UpdaterMetrics(WorkerMetrics):
    """The updater's series on top of the loop's: how user vectors were refreshed."""

    def __init__(self, worker: str = "updater") -> None:
        super().__init__(worker)
        own = self._own
        self.user_encodes = own(
            Counter,
            "user_encodes_total",
            "User vectors computed, by mode: incremental (cached "
            "positions extended) or full (whole window re-encoded)",
            ["mode"],
        )
        self.encoder_cache_bytes = own(
            Gauge, "encoder_cache_bytes", "Bytes of cached attention keys/values"
        )
        self.encoder_cache_users = own(
            Gauge, "encoder_cache_users", "Users whose attention keys/values are cached"
        )
        self.rescore_pending = own(
            Gauge, "swap_rescore_pending", "Users not yet re-scored under the newest model version"
        )


_RUN_BUCKETS = (1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


class FinetuneMetrics(WorkerMetrics):
    """The fine-tune worker's series on top of the loop's: runs and their figures, the feedback
    store, and online (prequential) HR@10/NDCG@10 of emitted recommendations."""

    def __init__(self, worker: str = "finetune") -> None:
        super().__init__(worker)
        own = self._own
        self.runs = own(Counter, "runs_total", "Fine-tune runs, by outcome", ["outcome"])
        for outcome in ("promoted", "rejected", "failed"):  # at 0 before the first run
            self.runs.labels(outcome=outcome)
        self.run_seconds = own(
            Histogram, "run_seconds", "Wall time of one fine-tune run", buckets=_RUN_BUCKETS
        )
        self.loss = own(Gauge, "train_loss", "Training loss of the last run's final epoch")
        self.evaluation = own(
            Gauge, "eval", "Held-out figures of the last run", ["model", "metric"]
        )  # candidate|current × hr@10|ndcg@10
        self.promotions = own(Counter, "promotions_total", "Candidates promoted")
        self.rejections = own(
            Counter, "rejections_total", "Candidates rejected (worse than current beyond tolerance)"
        )
        self.feedback_events = own(Gauge, "feedback_events", "Events retained in the store")
        self.feedback_impressions = own(
            Gauge, "feedback_impressions", "Impressions retained in the store"
        )
        self.feedback_bytes = own(Gauge, "feedback_bytes", "Size of the feedback store")
        self.online_judged = own(
            Counter, "online_judged_total", "Recommendations judged against the user's next event"
        )
        self.online_hits = own(
            Counter, "online_hits_total", "Judged recommendations whose top 10 held the next item"
        )
        self.online_ndcg_sum = own(
            Counter, "online_ndcg_sum_total", "Sum of NDCG@10 over judged recommendations"
        )
        self.online_hr = own(Gauge, "online_hit_rate_at_10", "Prequential HR@10 since start")
        self.online_ndcg = own(Gauge, "online_ndcg_at_10", "Prequential NDCG@10 since start")


class SupervisorMetrics:
    """`streamrec up`'s own series: its children, and how often they had to be restarted."""

    def __init__(self) -> None:
        self.registry = _registry()
        r = self.registry
        self.restarts = Counter(
            "streamrec_up_child_restarts_total",
            "Worker processes restarted after they exited",
            ["worker"],
            registry=r,
        )
        self.running = Gauge(
            "streamrec_up_child_running",
            "1 while the worker process runs, 0 while it waits for a restart",
            ["worker"],
            registry=r,
        )


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow scraper never holds the process at exit


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # a line per scrape is noise
        return None


def _app(registry: CollectorRegistry, health: LoopHealth | None) -> Callable[..., Iterable[bytes]]:
    """/healthz and /readyz (when the worker has a loop: 200 or 503, with the reason as text),
    everything else is the metrics page, as prometheus_client serves it."""
    metrics_app = make_wsgi_app(registry)
    checks: dict[str, Callable[[], Verdict]] = (
        {"/healthz": health.live, "/readyz": health.ready} if health is not None else {}
    )

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        check = checks.get(environ.get("PATH_INFO", ""))
        if check is None:
            page: Iterable[bytes] = metrics_app(environ, start_response)
            return page
        verdict = check()
        status = "200 OK" if verdict.ok else "503 Service Unavailable"
        start_response(
            status, [("Content-Type", "text/plain; charset=utf-8"), ("Cache-Control", "no-store")]
        )
        return [f"{'ok' if verdict.ok else 'failing'}: {verdict.reason}\n".encode()]

    return app


def serve(
    metrics: WorkerMetrics | SupervisorMetrics,
    host: str,
    port: int,
    health: LoopHealth | None = None,
) -> Any:
    """Expose the registry on http://host:port/metrics, and /healthz and /readyz judged from
    `health`; returns the server (call .shutdown())."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]  # "::" is IPv6
    server_class = type("_Server", (_Server,), {"address_family": family})
    server: WSGIServer = make_server(
        host, port, _app(metrics.registry, health), server_class, handler_class=_QuietHandler
    )
    threading.Thread(target=server.serve_forever, name=f"metrics-{port}", daemon=True).start()
    return server
