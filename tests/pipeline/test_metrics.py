"""Each worker's registry carries the process's standard series and the build info, two workers
in one process never mix series, and every streamrec series follows the naming rule: one name
with a `worker` label where every worker has it, `streamrec_<worker>_<what>` otherwise."""

from __future__ import annotations

from prometheus_client import generate_latest

from pipeline import __version__
from pipeline.metrics import FinetuneMetrics, SupervisorMetrics, UpdaterMetrics, WorkerMetrics


def test_process_python_and_build_info_series_in_every_registry():
    for metrics in (UpdaterMetrics(), WorkerMetrics("scorer"), SupervisorMetrics()):
        registry = metrics.registry
        assert registry.get_sample_value("process_cpu_seconds_total") is not None
        assert registry.get_sample_value("process_resident_memory_bytes") > 0
        page = generate_latest(registry).decode()
        assert "python_info{" in page and "python_gc_collections_total" in page
        assert f'version="{__version__}"' in page and "streamrec_build_info{" in page


def test_two_workers_in_one_process_keep_their_own_series():
    updater, scorer = UpdaterMetrics(), WorkerMetrics("scorer")
    updater.duplicates.inc(3)
    assert (
        updater.registry.get_sample_value("streamrec_duplicates_total", {"worker": "updater"}) == 3
    )
    assert scorer.registry.get_sample_value("streamrec_duplicates_total", {"worker": "scorer"}) == 0


def _streamrec_families(metrics: WorkerMetrics) -> dict[str, set[str]]:
    """streamrec family name -> label names of its samples (build info aside)."""
    families: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        if family.name.startswith("streamrec_") and family.name != "streamrec_build_info":
            families[family.name] = {label for s in family.samples for label in s.labels}
    return families


def test_shared_series_have_one_name_and_worker_specific_ones_their_prefix():
    workers = {
        "updater": UpdaterMetrics(),
        "scorer": WorkerMetrics("scorer"),
        "finetune": FinetuneMetrics(),
    }
    for metrics in workers.values():  # a labelled family has samples once a child exists
        metrics.lag.labels(topic="t", partition="0").set(1)
        metrics.produced.labels(topic="t").inc()
    names = {worker: set(_streamrec_families(m)) for worker, m in workers.items()}
    shared = set.intersection(*names.values())
    assert {
        "streamrec_rebalances",
        "streamrec_commit_failures",
        "streamrec_consumer_lag_messages",
        "streamrec_messages_consumed",
        "streamrec_stage_seconds",
    } <= shared
    for name in shared:
        assert not name.startswith(
            ("streamrec_updater_", "streamrec_scorer_", "streamrec_finetune_")
        ), name
    for worker, own in names.items():
        for name in own - shared:
            assert name.startswith(f"streamrec_{worker}_"), name
    for metrics in workers.values():
        for name, labels in _streamrec_families(metrics).items():
            assert not labels or "worker" in labels, name  # none: no labelled child yet
    page = generate_latest(workers["finetune"].registry).decode()
    assert 'streamrec_finetune_promotions_total{worker="finetune"} 0.0' in page


def test_a_labelled_series_takes_its_other_labels_positionally_or_by_name():
    metrics = WorkerMetrics("scorer")
    metrics.misrouted.labels("events").inc(2)
    metrics.lag.labels(topic="events", partition="3").set(7)
    get = metrics.registry.get_sample_value
    assert get("streamrec_misrouted_total", {"worker": "scorer", "topic": "events"}) == 2
    assert (
        get(
            "streamrec_consumer_lag_messages",
            {"worker": "scorer", "topic": "events", "partition": "3"},
        )
        == 7
    )
    metrics.lag.remove("events", "3")
    assert (
        get(
            "streamrec_consumer_lag_messages",
            {"worker": "scorer", "topic": "events", "partition": "3"},
        )
        is None
    )
    metrics.set_model_version("v1")
    metrics.set_model_version("v2")
    assert get("streamrec_model_info", {"worker": "scorer", "version": "v1"}) is None
    assert get("streamrec_model_info", {"worker": "scorer", "version": "v2"}) == 1


def test_the_metrics_page_table_documents_every_streamrec_series_and_no_other():
    import re
    from pathlib import Path

    page = Path(__file__).resolve().parents[2] / "docs" / "METRICS.md"
    documented = set(re.findall(r"^\| `(streamrec_\w+)` \|", page.read_text("utf-8"), re.M))
    exported: set[str] = set()
    for metrics in (
        UpdaterMetrics(),
        WorkerMetrics("scorer"),
        FinetuneMetrics(),
        SupervisorMetrics(),
    ):
        for family in metrics.registry.collect():
            if family.name.startswith("streamrec_"):
                suffix = "_total" if family.type == "counter" else ""
                exported.add(family.name + suffix)
    assert documented == exported


def test_series_a_panel_or_alert_reads_exist_at_zero_before_anything_happens():
    metrics = FinetuneMetrics()
    metrics.watch_topics(["events", "recommendations"])
    get = metrics.registry.get_sample_value
    for topic in ("events", "recommendations"):
        for name in ("streamrec_messages_consumed_total", "streamrec_quarantined_total"):
            assert get(name, {"worker": "finetune", "topic": topic}) == 0
    for outcome in ("promoted", "rejected", "failed"):
        assert get("streamrec_finetune_runs_total", {"worker": "finetune", "outcome": outcome}) == 0
    assert get("streamrec_start_time_seconds", {"worker": "finetune"}) > 1.7e9
    assert get("streamrec_model_created_timestamp_seconds", {"worker": "finetune"}) == 0
    metrics.set_model_version("v000002", created_at_ms=1_700_000_000_000)
    assert get("streamrec_model_created_timestamp_seconds", {"worker": "finetune"}) == 1.7e9
