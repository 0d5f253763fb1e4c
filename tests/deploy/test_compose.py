"""deploy/docker-compose.yml, the Dockerfile and the Prometheus config, validated offline: the
Compose Specification's JSON schema (check-jsonschema's vendored copy, no network, no Docker),
then what the schema cannot know: the whole product is there, workers are probed on /healthz at
their configured metrics ports, state/feedback/registry live on volumes, every file mounted
into a container exists, and every STREAMREC_* variable is a real setting."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import Config, PathsConfig, load

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
WORKERS = ("updater", "scorer", "finetune")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))  # resolves the `<<` merge keys


def _check_compose_schema(path: Path) -> subprocess.CompletedProcess[str]:
    """check-jsonschema's built-in Compose specification on the file at `path`."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_compose_file_satisfies_the_compose_specification():
    result = _check_compose_schema(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_schema_check_rejects_a_misspelled_key(tmp_path):
    """The check above can fail: the same validator on a copy with one typo."""
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(
        COMPOSE.read_text(encoding="utf-8").replace(
            "    healthcheck: *worker-health", "    healthchek: *worker-health", 1
        )
    )
    result = _check_compose_schema(broken)
    assert result.returncode != 0 and "healthchek" in result.stdout


def test_the_whole_product_runs(compose):
    services = compose["services"]
    assert {"kafka", "bootstrap", *WORKERS, "prometheus", "grafana"} <= set(services)
    kafka_env = services["kafka"]["environment"]
    assert set(kafka_env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}  # KRaft
    assert not any("zookeeper" in str(v).lower() for v in kafka_env.values())
    for worker in WORKERS:
        service = services[worker]
        assert service["command"] == [worker]
        assert service["depends_on"]["kafka"]["condition"] == "service_healthy"
        assert service["depends_on"]["bootstrap"]["condition"] == "service_completed_successfully"
        assert service["environment"]["STREAMREC_KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"


def test_workers_are_probed_on_healthz_at_their_metrics_port(compose):
    defaults = Config()
    for worker in WORKERS:
        service = compose["services"][worker]
        port = getattr(defaults, worker).metrics_port
        assert service["environment"]["HEALTHZ_PORT"] == str(port)
        probe = " ".join(service["healthcheck"]["test"])
        assert "/healthz" in probe and "HEALTHZ_PORT" in probe
        assert f"127.0.0.1:{port}:{port}" in service["ports"]


def test_registry_state_and_feedback_live_on_named_volumes(compose):
    data = PathsConfig("/data")
    wanted = {str(data.models), str(data.state), str(data.feedback)}
    for name in ("bootstrap", *WORKERS):
        mounts = {m.split(":")[1]: m.split(":")[0] for m in compose["services"][name]["volumes"]}
        assert wanted <= set(mounts), name
        for target in wanted:
            assert mounts[target] in compose["volumes"], (name, target)
    dockerfile = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    for target in wanted:  # a mount point missing from the image would be root-owned
        assert target in dockerfile


def test_every_file_mounted_into_a_container_exists(compose):
    for name, service in compose["services"].items():
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source}"


def test_every_streamrec_variable_is_a_setting(compose, caplog):
    for name in ("bootstrap", *WORKERS):
        env = {k: str(v) for k, v in compose["services"][name]["environment"].items()}
        with caplog.at_level(logging.WARNING, logger="pipeline.config"):
            config = load(env=env)
        assert not caplog.records, [r.getMessage() for r in caplog.records]
        assert config.metrics.host == "0.0.0.0"


def test_the_image_exposes_every_worker_port():
    exposed = set(
        re.search(r"^EXPOSE (.+)$", (DEPLOY / "Dockerfile").read_text(encoding="utf-8"), re.M)
        .group(1)
        .split()
    )
    defaults = Config()
    wanted = {str(getattr(defaults, w).metrics_port) for w in WORKERS}
    assert wanted | {str(defaults.metrics.supervisor_port)} == exposed


def test_prometheus_scrapes_every_worker_and_loads_the_rules(compose):
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text(encoding="utf-8"))
    defaults = Config()
    scraped = {
        (sd["names"][0], sd["port"])
        for job in config["scrape_configs"]
        for sd in job.get("dns_sd_configs", [])
    }
    assert scraped == {(w, getattr(defaults, w).metrics_port) for w in WORKERS}
    mounts = compose["services"]["prometheus"]["volumes"]
    rules_dir = config["rule_files"][0].rsplit("/", 1)[0]
    assert any(m.startswith("./prometheus/alerts.yml:" + rules_dir) for m in mounts)
