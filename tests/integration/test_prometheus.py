"""The Grafana dashboard and the alert rules in deploy/, proven on a real Prometheus (Debian's
`prometheus` package: `apt-get install prometheus`): it scrapes a running `streamrec up`, in
the default co-located topology (the updater answers, no scorer runs) and in the separate one
(STREAMREC_UPDATER_SCORE=false: the scorer answers), fed a short replay and one bad record;
`promtool check rules` passes on the rule file, and every PromQL expression of the dashboard
and of the rules returns data through the HTTP API. The latency SLO's rules are also
unit-tested with `promtool test rules` on the series of both topologies: they keep the
histogram of the worker that produces the recommendations, the updater or the scorer.

An alert's expression returns nothing while it does not fire, so each is asked in its `bool`
form (`x > 1000` becomes `x > bool 1000`: every series, 0 or 1), which fails exactly where a
series, a label or a function is wrong."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from kafka import KafkaProducer

from pipeline.broker import free_port, wait_for_broker
from tests.integration.support import http_get, up_flags, wait_for

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULES = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "streamrec.json"
PROMETHEUS, PROMTOOL = shutil.which("prometheus"), shutil.which("promtool")

pytestmark = pytest.mark.integration
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None or PROMTOOL is None,
    reason="the prometheus and promtool binaries are not installed: `make tools` (Debian's "
    "package: `sudo apt-get install -y prometheus`)",
)

_COMPARISON = re.compile(r"\s(>=|<=|==|!=|>|<)\s+(?!bool\b)")


def as_bool(expr: str) -> str:
    """`expr` with every comparison in its bool form (all series kept, valued 0 or 1)."""
    return _COMPARISON.sub(lambda m: f" {m.group(1)} bool ", expr)


def test_as_bool_keeps_every_series_of_a_comparison():
    assert as_bool("a > 1000 and b > (14.4 * 0.01)") == "a > bool 1000 and b > bool (14.4 * 0.01)"
    assert as_bool('x{outcome!="failed"} == 0') == 'x{outcome!="failed"} == bool 0'
    assert as_bool("a > bool 1") == "a > bool 1"


def expressions() -> dict[str, str]:
    """Every PromQL expression of the dashboard and the rule file, named by where it is."""
    out: dict[str, str] = {}
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            out[f"dashboard {panel['title']!r} {target['refId']}"] = target["expr"]
    for group in yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]:
        for rule in group["rules"]:
            if "record" in rule:
                out[f"record {rule['record']}"] = rule["expr"]
                out[f"recorded series {rule['record']}"] = rule["record"]
            else:
                out[f"alert {rule['alert']}"] = as_bool(rule["expr"])
    return out


def _query(port: int, expr: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]["result"]


def _prometheus_config(tmp_path: Path, ports: dict[str, int]) -> Path:
    """A scrape every second of each worker and of `up` itself, and the rule file with its
    recording group evaluated every second (15 s in deploy/)."""
    rules = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    for group in rules["groups"]:
        group["interval"] = "1s"
    rules_path = tmp_path / "alerts.yml"
    rules_path.write_text(yaml.safe_dump(rules), encoding="utf-8")
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules_path)],
        "scrape_configs": [
            {
                "job_name": f"streamrec-{name}",
                "static_configs": [{"targets": [f"127.0.0.1:{port}"]}],
            }
            for name, port in ports.items()
        ],
    }
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@needs_prometheus
def test_promtool_accepts_the_rules_and_rejects_a_broken_copy(tmp_path):
    ok = subprocess.run(
        [PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert ok.returncode == 0 and "SUCCESS" in ok.stdout, ok.stdout + ok.stderr
    broken = tmp_path / "alerts.yml"
    broken.write_text(
        RULES.read_text(encoding="utf-8").replace(
            "sum by (worker, topic) (", "sum by (worker, topic (", 1
        )
    )
    bad = subprocess.run(
        [PROMTOOL, "check", "rules", str(broken)], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode != 0


def _slo_series(worker: str, slow_per_min: int, recommends: bool) -> list[dict]:
    """A worker's end-to-end histogram (100 observations a minute, `slow_per_min` of them over
    250 ms) and what it produces: the recommendations, or else the user vectors."""
    topic = "streamrec.recommendations" if recommends else "streamrec.user-vectors"
    name = "streamrec_end_to_end_latency_seconds"
    return [
        {
            "series": f'{name}_bucket{{worker="{worker}", le="0.25"}}',
            "values": f"0+{100 - slow_per_min}x90",
        },
        {"series": f'{name}_count{{worker="{worker}"}}', "values": "0+100x90"},
        {
            "series": f'streamrec_messages_produced_total{{worker="{worker}", topic="{topic}"}}',
            "values": "0+100x90",
        },
    ]


@needs_prometheus
@pytest.mark.parametrize(
    ("series", "answering"),
    [
        # Co-located (the default): the updater produces the recommendations.
        (_slo_series("updater", 50, recommends=True), "updater"),
        # Separate: the updater's histogram ends at its user vectors (fast here), the scorer's
        # at the recommendations; only the scorer's counts.
        (
            _slo_series("updater", 0, recommends=False)
            + _slo_series("scorer", 50, recommends=True),
            "scorer",
        ),
    ],
    ids=["colocated", "separate"],
)
def test_the_slo_rules_keep_the_worker_that_produces_recommendations(tmp_path, series, answering):
    recorded = [f"streamrec:recommendation_slow:ratio_rate{w}" for w in ("5m", "30m", "1h", "6h")]
    unit = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "15s",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "promql_expr_test": [
                    {
                        "expr": name,
                        "eval_time": "80m",
                        "exp_samples": [
                            {"labels": f'{name}{{worker="{answering}"}}', "value": 0.5}
                        ],
                    }
                    for name in recorded
                ],
                "alert_rule_test": [
                    {
                        "alertname": "StreamrecLatencySLOBurnFast",
                        "eval_time": "80m",
                        "exp_alerts": [
                            {
                                "exp_labels": {"severity": "critical", "worker": answering},
                                "exp_annotations": {
                                    "summary": "Recommendations are burning the 250 ms latency "
                                    "SLO budget 14x too fast",
                                    "description": "More than 14.4% of recommendations took "
                                    "over 250 ms from their event, over both the last 5 minutes "
                                    "and the last hour.",
                                },
                            }
                        ],
                    }
                ],
            }
        ],
    }
    path = tmp_path / "slo_test.yml"
    path.write_text(yaml.safe_dump(unit), encoding="utf-8")
    result = subprocess.run(
        [PROMTOOL, "test", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


@needs_prometheus
@pytest.mark.parametrize("answering", ["updater", "scorer"], ids=["colocated", "separate"])
def test_every_dashboard_and_rule_expression_returns_data_from_streamrec_up(
    data_dir, tmp_path, answering
):
    """`streamrec up` as it runs by default (co-located: no scorer) and with
    STREAMREC_UPDATER_SCORE=false (the separate scorer answers)."""
    shutil.copytree(data_dir / "models", tmp_path / "models")
    shutil.copytree(data_dir / "cache", tmp_path / "cache")
    broker_port, prometheus_port = free_port(), free_port()
    ports = {name: free_port() for name in ("updater", "scorer", "finetune", "up")}
    # Co-located, the default: `up` runs no scorer (its port stays closed).
    scraped = {n: p for n, p in ports.items() if n != "scorer" or answering == "scorer"}
    workers = [name for name in scraped if name != "up"]
    common = up_flags(
        broker_port,
        tmp_path,
        updater=ports["updater"],
        scorer=ports["scorer"],
        finetune=ports["finetune"],
        supervisor=ports["up"],
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMREC_")}
    if answering == "scorer":
        env["STREAMREC_UPDATER_SCORE"] = "false"
    config_path = _prometheus_config(tmp_path, scraped)
    checked = subprocess.run(
        [PROMTOOL, "check", "config", str(config_path)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    up = subprocess.Popen([sys.executable, "-m", "workers", "up", *common], env=env)
    prometheus = None
    try:
        wait_for_broker(f"127.0.0.1:{broker_port}", 60)
        for worker in workers:
            wait_for(
                lambda w=worker: http_get(ports[w], "/readyz")[0] == 200,
                120,
                f"{worker} to be ready",
            )
        with open(tmp_path / "prometheus.log", "wb") as log:
            prometheus = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={config_path}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{prometheus_port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        replay = subprocess.run(
            [
                sys.executable,
                "-m",
                "workers",
                "replay",
                "--dataset",
                "synthetic",
                "--limit",
                "300",
                "--rate",
                "300",
                *common,
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert replay.returncode == 0, replay.stderr
        producer = KafkaProducer(bootstrap_servers=f"127.0.0.1:{broker_port}")
        producer.send("streamrec.events", key=b"u-bad", value=b"{not json")  # a dead letter
        producer.flush(30)
        producer.close()

        wanted = expressions()
        empty = dict(wanted)

        def all_answer() -> bool:
            for where, expr in list(empty.items()):
                if _query(prometheus_port, expr):
                    del empty[where]
            return not empty

        try:
            wait_for(all_answer, 90, "every expression to return data")
        except AssertionError:
            pytest.fail(
                "no data from:\n"
                + "\n".join(f"{w}: {e}" for w, e in empty.items())
                + "\n"
                + (tmp_path / "prometheus.log").read_text()[-3000:]
            )
        targets = json.load(
            urllib.request.urlopen(f"http://127.0.0.1:{prometheus_port}/api/v1/targets", timeout=10)
        )
        health = {t["labels"]["job"]: t["health"] for t in targets["data"]["activeTargets"]}
        assert health == {f"streamrec-{name}": "up" for name in scraped}
        # The recommendations and the SLO are the answering worker's alone (separate: the
        # updater observes end-to-end latency too, up to its user vectors).
        for expr in (
            'streamrec_messages_produced_total{topic=~".*recommendations"}',
            "streamrec:recommendation_slow:ratio_rate5m",
        ):
            assert {r["metric"]["worker"] for r in _query(prometheus_port, expr)} == {answering}
        if answering == "updater":
            with pytest.raises(OSError):
                http_get(ports["scorer"], "/healthz")
        assert len(wanted) >= 40  # the dashboard's 25 targets and the rule file's 24 rules
    finally:
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(timeout=30)
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=60) == 0
