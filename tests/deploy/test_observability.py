"""The dashboard and the alert rules, checked without Prometheus (the real-Prometheus test is
tests/integration/test_prometheus.py): every series they name is one the workers export or a
rule records, none assumes a topology (the recommendations come from the updater by default,
from the scorer in the separate topology), the alerts cover what an operator must be woken
for, and the dashboard is wired to the datasource Grafana is provisioned with."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from tests.pipeline.conftest import every_worker_metrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARD = json.loads((DEPLOY / "grafana" / "dashboards" / "streamrec.json").read_text())
RULES = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
DATASOURCES = yaml.safe_load(
    (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
)


def _exported() -> set[str]:
    """Every sample name the workers and `streamrec up` expose."""
    names: set[str] = set()
    for metrics in every_worker_metrics():
        for family in metrics.registry.collect():  # a labelled family may have no sample yet
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}
            names.update(family.name + suffix for suffix in suffixes.get(family.type, [""]))
    return names


def _rules(kind: str) -> list[dict]:
    return [rule for group in RULES["groups"] for rule in group["rules"] if kind in rule]


def _expressions() -> list[str]:
    return [t["expr"] for p in DASHBOARD["panels"] for t in p.get("targets", [])] + [
        rule["expr"] for group in RULES["groups"] for rule in group["rules"]
    ]


def test_every_series_named_is_exported_or_recorded():
    known = _exported() | {rule["record"] for rule in _rules("record")}
    named = {
        name
        for expr in _expressions()
        for name in re.findall(
            r"\b((?:streamrec|process)_[A-Za-z0-9_]+|streamrec:[A-Za-z0-9_:]+)", expr
        )
    }
    assert named, "no series found: the pattern is wrong"
    assert named - known == set()


def test_the_alerts_cover_what_an_operator_must_know():
    alerts = {rule["alert"]: rule for rule in _rules("alert")}
    wanted = {
        "StreamrecConsumerLagGrowing",
        "StreamrecLatencySLOBurnFast",
        "StreamrecLatencySLOBurnSlow",
        "StreamrecDeadLettersHigh",
        "StreamrecWorkerCrashLooping",
        "StreamrecFinetuneFailing",
        "StreamrecGateRejectingRepeatedly",
        "StreamrecModelStale",
    }
    assert wanted <= set(alerts)
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"]["summary"], name


def test_the_dashboard_covers_the_issue_list():
    titles = " | ".join(p["title"].lower() for p in DASHBOARD["panels"])
    for topic in (
        "events in",
        "end-to-end latency",
        "per stage",
        "lag per worker and partition",
        "dead letters by reason",
        "quarantines and restarts",
        "model version",
        "runs by outcome",
        "hr@10 and ndcg@10",
        "cpu",
        "memory",
    ):
        assert topic in titles, topic


def test_the_dashboard_uses_the_provisioned_datasource_and_its_panels_do_not_overlap():
    (datasource,) = DATASOURCES["datasources"]
    uids = {t["datasource"]["uid"] for p in DASHBOARD["panels"] for t in p.get("targets", [])}
    assert uids == {datasource["uid"]}
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in DASHBOARD["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
        mine = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & mine, panel["title"]
        cells |= mine


# The series of recommendations: whichever worker answers observes them, the updater
# (co-located scoring, the default) or the separate scorer.
_SERIES = re.compile(r"(streamrec_[a-z_]+)\{([^}]*)\}")


def _of_recommendations(name: str, matchers: str) -> bool:
    return name.startswith("streamrec_end_to_end_latency_seconds") or (
        name == "streamrec_messages_produced_total" and "recommendations" in matchers
    )


def test_no_expression_assumes_a_topology():
    """Nothing filters on the scorer (absent by default) or pins the recommendations' series
    to one worker: the dashboard and the rules work co-located and separate alike."""
    pinned = 0
    for expr in _expressions():
        assert not re.search(r'worker\s*(=|=~|!=|!~)\s*"[^"]*scorer', expr), expr
        for name, matchers in _SERIES.findall(expr):
            if _of_recommendations(name, matchers):
                assert "worker" not in matchers, expr
            pinned += "worker" in matchers
    assert pinned  # the pattern sees worker filters: the events' `worker="updater"`


def test_the_latency_slo_is_the_histogram_of_the_worker_that_produces_recommendations():
    """In the separate topology the updater observes end-to-end latency too (event to user
    vector): the SLO keeps only the worker that produces to the recommendations topic."""
    slow = {
        r["record"]: r["expr"] for r in _rules("record") if "recommendation_slow" in r["record"]
    }
    assert len(slow) == 4
    for expr in slow.values():
        assert "streamrec_end_to_end_latency_seconds" in expr
        assert re.search(
            r'\)\s*and on \(worker\) streamrec_messages_produced_total\{topic=~"\.\*recommendations"\}\s*$',
            expr,
        ), expr
    panel = next(p for p in DASHBOARD["panels"] if p["title"] == "Recommendations out")
    (target,) = panel["targets"]
    assert 'topic=~".*recommendations"' in target["expr"]
