"""The serving workers' Prometheus pages, read from outside as an operator would (bench, demo)."""

from __future__ import annotations

import logging
import re
import urllib.request
from collections.abc import Sequence

from pipeline.config import Config

__all__ = ["metrics_pages", "metric_sums"]

log = logging.getLogger(__name__)


def metrics_pages(config: Config, workers: Sequence[str] = ("updater", "scorer")) -> dict[str, str]:
    """The /metrics pages of `workers` (updater, scorer); one that cannot be read is left out,
    with a warning (its worker may have stopped already)."""
    ports = {"updater": config.updater.metrics_port, "scorer": config.scorer.metrics_port}
    pages = {}
    for worker, port in ((w, ports[w]) for w in workers):
        try:
            with urllib.request.urlopen(
                f"http://{config.metrics.host}:{port}/metrics", timeout=5
            ) as response:
                pages[worker] = response.read().decode()
        except OSError as exc:
            log.warning("could not read %s metrics: %s", worker, exc)
    return pages


def metric_sums(page: str, name: str, by: str = "") -> dict[str, float]:
    """`name`'s samples summed by the value of their label `by` ("" when it lacks it)."""
    out: dict[str, float] = {}
    for line in page.splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " "):
            labels, value = line[len(name) :].rsplit(" ", 1)
            match = re.search(rf'[{{,]{by}="([^"]*)"', labels) if by else None
            key = match.group(1) if match else ""
            out[key] = out.get(key, 0.0) + float(value)
    return out
