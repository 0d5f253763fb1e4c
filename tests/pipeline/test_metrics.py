"""Each worker's registry carries the process's standard series and the build info, and two
workers in one process never mix series."""

from __future__ import annotations

from prometheus_client import generate_latest

from pipeline import __version__
from pipeline.metrics import SupervisorMetrics, UpdaterMetrics, WorkerMetrics


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
    assert updater.registry.get_sample_value("streamrec_updater_duplicates_total") == 3
    assert scorer.registry.get_sample_value("streamrec_updater_duplicates_total") is None
