"""The serving workers' Prometheus pages, read from outside as an operator would (bench, demo)."""

from __future__ import annotations

import logging
import urllib.request

from pipeline.config import Config

__all__ = ["metrics_pages", "metric_sums"]

log = logging.getLogger(__name__)


def metrics_pages(config: Config) -> dict[str, str]:
    """The updater's and the scorer's /metrics pages; one that cannot be read is left out, with
    a warning (its worker may have stopped already)."""
    pages = {}
    for worker, port in (("updater", config.updater.metrics_port),
                         ("scorer", config.scorer.metrics_port)):
        try:
            with urllib.request.urlopen(f"http://{config.metrics.host}:{port}/metrics",
                                        timeout=5) as response:
                pages[worker] = response.read().decode()
        except OSError as exc:
            log.warning("could not read %s metrics: %s", worker, exc)
    return pages


def metric_sums(page: str, name: str) -> dict[str, float]:
    """`name`'s samples summed by their first label's value ("" when it has no labels)."""
    out: dict[str, float] = {}
    for line in page.splitlines():
        if line.startswith(name) and line[len(name):len(name) + 1] in ("{", " "):
            labels, value = line[len(name):].rsplit(" ", 1)
            key = labels.split('"', 2)[1] if labels.startswith("{") else ""
            out[key] = out.get(key, 0.0) + float(value)
    return out
