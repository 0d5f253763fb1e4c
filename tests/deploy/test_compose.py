"""deploy/docker-compose.yml, the Dockerfile and the Prometheus config, validated offline: the
Compose Specification's JSON schema (check-jsonschema's vendored copy, no network, no Docker),
then what the schema cannot know: the whole product is there, the default stack is co-located
(updater.score, no scorer) and the profile `separate-scorer` with STREAMREC_UPDATER_SCORE=false
is the separate topology, each running the workers `streamrec up` runs for the same settings;
workers are probed on /healthz at their configured metrics ports, state/feedback/registry live
on volumes, every file mounted into a container exists, and every STREAMREC_* variable is a
real setting, with the shell's variables interpolated as Compose does."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import Config, ConfigError, PathsConfig, load
from workers import scorer
from workers.up import workers_for

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
WORKERS = ("updater", "scorer", "finetune")  # every worker service, profiles included
SEPARATE = "separate-scorer"  # the scorer's profile
# The shell of `STREAMREC_UPDATER_SCORE=false docker compose --profile separate-scorer up`.
SEPARATE_SHELL = {"STREAMREC_UPDATER_SCORE": "false"}
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))  # resolves the `<<` merge keys


def interpolate(value: object, shell: dict[str, str]) -> str:
    """`value` as Compose passes it on: `${VAR}` and `${VAR:-default}` from `shell` (`$$` is
    a literal `$`)."""

    def one(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        return shell.get(name) or (default or "")

    return "$".join(_VARIABLE.sub(one, part) for part in str(value).split("$$"))


def environment(compose: dict, service: str, shell: dict[str, str]) -> dict[str, str]:
    return {
        k: interpolate(v, shell) for k, v in compose["services"][service]["environment"].items()
    }


def started(compose: dict, *profiles: str) -> set[str]:
    """The services `docker compose [--profile P ...] up` starts."""
    return {
        name
        for name, service in compose["services"].items()
        if not service.get("profiles") or set(service["profiles"]) & set(profiles)
    }


def test_interpolate_reads_the_shell_like_compose():
    assert interpolate("${A:-true}", {}) == "true"
    assert interpolate("${A:-true}", {"A": "false"}) == "false"
    assert interpolate("${A:-true}", {"A": ""}) == "true"  # `:-`: empty counts as unset
    assert interpolate("$$(cat x) ${A}", {"A": "1"}) == "$(cat x) 1"


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
    assert started(compose) == {
        "kafka",
        "bootstrap",
        "updater",
        "finetune",
        "prometheus",
        "grafana",
    }
    assert started(compose, SEPARATE) == started(compose) | {"scorer"}
    kafka_env = services["kafka"]["environment"]
    assert set(kafka_env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}  # KRaft
    assert not any("zookeeper" in str(v).lower() for v in kafka_env.values())
    for worker in WORKERS:
        service = services[worker]
        assert service["command"] == [worker]
        assert service["depends_on"]["kafka"]["condition"] == "service_healthy"
        assert service["depends_on"]["bootstrap"]["condition"] == "service_completed_successfully"
        assert service["environment"]["STREAMREC_KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"


@pytest.mark.parametrize(
    ("profiles", "shell", "score"),
    [((), {}, True), ((SEPARATE,), SEPARATE_SHELL, False)],
    ids=["default-colocated", "separate-scorer"],
)
def test_each_topology_runs_what_streamrec_up_runs_for_its_settings(
    compose, profiles, shell, score
):
    """Co-located by default (the updaters score, no scorer); with the profile and the
    setting, the separate scorer, every worker agreeing on updater.score."""
    workers = started(compose, *profiles) & set(WORKERS)
    configs = {w: load(env=environment(compose, w, shell)) for w in workers}
    assert {c.updater.score for c in configs.values()} == {score}
    assert workers == set(workers_for(configs["updater"]))


def test_the_profile_without_the_setting_gets_a_scorer_that_refuses_to_start(compose):
    """`--profile separate-scorer` alone: the scorer sees updater.score true and stops at
    start (its handler is built first), rather than answering every event a second time."""
    config = load(env=environment(compose, "scorer", {}))
    assert config.updater.score is True
    with pytest.raises(ConfigError, match="STREAMREC_UPDATER_SCORE=false"):
        scorer.SPEC.build_handler(config, None)


def test_no_service_depends_on_one_its_profiles_do_not_start(compose):
    for profiles in ((), (SEPARATE,), ("tools",)):
        running = started(compose, *profiles)
        for name in running:
            assert set(compose["services"][name].get("depends_on", ())) <= running, (name, profiles)


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


@pytest.mark.parametrize("shell", [{}, SEPARATE_SHELL], ids=["default", "separate"])
def test_every_streamrec_variable_is_a_setting(compose, caplog, shell):
    for name in ("bootstrap", *WORKERS):
        with caplog.at_level(logging.WARNING, logger="pipeline.config"):
            config = load(env=environment(compose, name, shell))
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
    """The scorer's job too: by DNS, it finds the scorer when its profile runs."""
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
