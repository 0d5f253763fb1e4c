"""Prometheus metrics of one worker, bound to its own CollectorRegistry (never the global one, so
two workers in one process or one test never mix series). Names: streamrec_<worker>_<what>.

Labels are bounded sets only (topic, partition, reason, stage): never user or item ids.
The only importer of prometheus_client.
"""

from __future__ import annotations

import platform
from typing import Any

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)

from pipeline import __version__

__all__ = ["WorkerMetrics", "UpdaterMetrics", "FinetuneMetrics", "SupervisorMetrics", "serve",
           "STAGES"]

STAGES = ("poll", "validate", "state_update", "encode", "score", "produce", "persist", "commit")

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5,
                    5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)


def _registry() -> CollectorRegistry:
    """A registry of its own, with the process's standard series (process_*, python_*) and
    streamrec_build_info, as the default registry would have them."""
    registry = CollectorRegistry(auto_describe=True)
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    Gauge("streamrec_build_info", "streamrec and Python versions of this process (value 1)",
          ["version", "python"], registry=registry).labels(
        version=__version__, python=platform.python_version()).set(1)
    return registry


class WorkerMetrics:
    """Every series one worker exports."""

    def __init__(self, worker: str) -> None:
        self.worker = worker
        self.registry = _registry()
        p = f"streamrec_{worker}"
        r = self.registry
        self.consumed = Counter(f"{p}_messages_consumed_total", "Messages consumed", ["topic"],
                                registry=r)
        self.produced = Counter(f"{p}_messages_produced_total", "Messages produced", ["topic"],
                                registry=r)
        self.invalid = Counter(f"{p}_messages_invalid_total",
                               "Messages sent to the DLQ, by reason", ["topic", "reason"], registry=r)
        self.duplicates = Counter(f"{p}_duplicates_total", "Messages recognised as duplicates",
                                  registry=r)
        self.key_mismatch = Counter(f"{p}_key_mismatch_total",
                                    "Messages whose key differs from the id in the value", ["topic"],
                                    registry=r)
        self.misrouted = Counter(f"{p}_misrouted_total",
                                 "Keyed records that arrived on a partition other than murmur2 "
                                 "of their key gives (a producer not partitioning by murmur2)",
                                 ["topic"], registry=r)
        self.batch_size = Histogram(f"{p}_batch_size", "Records per micro-batch",
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.stage_seconds = Histogram(f"{p}_stage_seconds", "Time spent per micro-batch stage",
                                       ["stage"], buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_seconds = Histogram(f"{p}_batch_processing_seconds",
                                       "Wall time to process one micro-batch end to end",
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.end_to_end_seconds = Histogram(
            f"{p}_end_to_end_latency_seconds",
            "From the triggering event's produce time to this worker's output produced",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.event_age_seconds = Histogram(
            f"{p}_event_time_lag_seconds", "From event time (ts) to output produced",
            buckets=_LATENCY_BUCKETS + (60.0, 600.0, 3600.0), registry=r)
        self.lag = Gauge(f"{p}_consumer_lag_messages", "High watermark minus position",
                         ["topic", "partition"], registry=r)
        self.fetch_wait_seconds = Gauge(
            f"{p}_fetch_max_wait_seconds",
            "Fetch wait the input consumer asks for now; above kafka.fetch_max_wait_ms when the "
            "broker starved it (a long log on the embedded broker)", registry=r)
        self.model_version = Gauge(f"{p}_model_info", "Model version in use (value 1)",
                                   ["version"], registry=r)
        self.state_users = Gauge(f"{p}_state_users", "Users held in state", registry=r)
        self.state_items = Gauge(f"{p}_state_items", "Items held in the catalog", registry=r)
        self.broker_resets = Counter(f"{p}_broker_resets_total",
                                     "Input logs found behind the stored offsets (broker lost data)",
                                     registry=r)
        self.partitions = Gauge(f"{p}_assigned_partitions", "Partitions assigned to this instance",
                                registry=r)
        self.model_swaps = Counter(f"{p}_model_swaps_total", "Hot swaps to a new model version",
                                   registry=r)
        self.quarantined = Counter(
            f"{p}_quarantined_total",
            "Records dead-lettered unapplied because the worker died twice applying them",
            ["topic"], registry=r)
        self.crashes = Counter(
            f"{p}_crashes_total",
            "Starts of this instance that found its predecessor died mid-batch (kept across "
            "restarts)", registry=r)
        self.skipped_table_records = Counter(
            f"{p}_table_records_invalid_total",
            "Invalid records skipped by the global table reader (the owning group DLQs them)",
            ["topic", "reason"], registry=r)

    def set_model_version(self, version: str) -> None:
        self.model_version.clear()
        self.model_version.labels(version=version).set(1)

    def time_stage(self, stage: str) -> Any:
        return self.stage_seconds.labels(stage=stage).time()


class UpdaterMetrics(WorkerMetrics):
    """The updater's series on top of the loop's: how user vectors were refreshed."""

    def __init__(self, worker: str = "updater") -> None:
        super().__init__(worker)
        p, r = f"streamrec_{worker}", self.registry
        self.user_encodes = Counter(f"{p}_user_encodes_total",
                                    "User vectors computed, by mode: incremental (cached "
                                    "positions extended) or full (whole window re-encoded)",
                                    ["mode"], registry=r)
        self.encoder_cache_bytes = Gauge(f"{p}_encoder_cache_bytes",
                                         "Bytes of cached attention keys/values", registry=r)
        self.encoder_cache_users = Gauge(f"{p}_encoder_cache_users",
                                         "Users whose attention keys/values are cached",
                                         registry=r)
        self.rescore_pending = Gauge(f"{p}_swap_rescore_pending",
                                     "Users not yet re-scored under the newest model version",
                                     registry=r)


_RUN_BUCKETS = (1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


class FinetuneMetrics(WorkerMetrics):
    """The fine-tune worker's series on top of the loop's: runs and their figures, the feedback
    store, and online (prequential) HR@10/NDCG@10 of emitted recommendations."""

    def __init__(self, worker: str = "finetune") -> None:
        super().__init__(worker)
        p, r = f"streamrec_{worker}", self.registry
        self.runs = Counter(f"{p}_runs_total", "Fine-tune runs, by outcome",
                            ["outcome"], registry=r)  # promoted | rejected | failed
        self.run_seconds = Histogram(f"{p}_run_seconds", "Wall time of one fine-tune run",
                                     buckets=_RUN_BUCKETS, registry=r)
        self.loss = Gauge(f"{p}_train_loss", "Training loss of the last run's final epoch",
                          registry=r)
        self.evaluation = Gauge(f"{p}_eval", "Held-out figures of the last run",
                                ["model", "metric"], registry=r)  # candidate|current × hr@10|ndcg@10
        self.promotions = Counter(f"{p}_promotions_total", "Candidates promoted", registry=r)
        self.rejections = Counter(f"{p}_rejections_total",
                                  "Candidates rejected (worse than current beyond tolerance)",
                                  registry=r)
        self.feedback_events = Gauge(f"{p}_feedback_events", "Events retained in the store",
                                     registry=r)
        self.feedback_impressions = Gauge(f"{p}_feedback_impressions",
                                          "Impressions retained in the store", registry=r)
        self.feedback_bytes = Gauge(f"{p}_feedback_bytes", "Size of the feedback store",
                                    registry=r)
        self.online_judged = Counter(f"{p}_online_judged_total",
                                     "Recommendations judged against the user's next event",
                                     registry=r)
        self.online_hits = Counter(f"{p}_online_hits_total",
                                   "Judged recommendations whose top 10 held the next item",
                                   registry=r)
        self.online_ndcg_sum = Counter(f"{p}_online_ndcg_sum_total",
                                       "Sum of NDCG@10 over judged recommendations", registry=r)
        self.online_hr = Gauge(f"{p}_online_hit_rate_at_10", "Prequential HR@10 since start",
                               registry=r)
        self.online_ndcg = Gauge(f"{p}_online_ndcg_at_10", "Prequential NDCG@10 since start",
                                 registry=r)


class SupervisorMetrics:
    """`streamrec up`'s own series: its children, and how often they had to be restarted."""

    def __init__(self) -> None:
        self.registry = _registry()
        r = self.registry
        self.restarts = Counter("streamrec_up_child_restarts_total",
                                "Worker processes restarted after they exited", ["worker"],
                                registry=r)
        self.running = Gauge("streamrec_up_child_running",
                             "1 while the worker process runs, 0 while it waits for a restart",
                             ["worker"], registry=r)


def serve(metrics: WorkerMetrics | SupervisorMetrics, host: str, port: int) -> Any:
    """Expose the registry on http://host:port/metrics; returns the server (call .shutdown())."""
    server, _thread = start_http_server(port, addr=host, registry=metrics.registry)
    return server
