"""The CLI in-process (main(argv)): config errors name the setting, help shows env twins,
`model list` reads the registry."""

from __future__ import annotations

import pytest

from workers.cli import main


def test_bad_setting_fails_fast_naming_it(capsys):
    assert main(["scorer", "--scorer-epsilon", "2"]) == 2
    assert "scorer.epsilon" in capsys.readouterr().err


def test_an_unknown_env_var_is_named_in_a_warning_and_the_command_runs(
    monkeypatch, tmp_path, caplog
):
    monkeypatch.setenv("STREAMREC_UPDATER_HISTORY_LEN", "5")
    with caplog.at_level("WARNING"):
        assert main(["model", "list", "--paths-data-dir", str(tmp_path)]) == 0
    assert "STREAMREC_UPDATER_HISTORY_LEN" in caplog.text


def test_json_logs_one_object_per_line_from_the_first_line_on(monkeypatch, tmp_path, capsys):
    """STREAMREC_LOGGING_FORMAT=json: even the warning load() writes before it knows the format
    comes out as JSON, with the command as the worker."""
    import json

    monkeypatch.setenv("STREAMREC_LOGGING_FORMAT", "json")
    monkeypatch.setenv("STREAMREC_UPDATER_HISTORY_LEN", "5")
    assert main(["model", "list", "--paths-data-dir", str(tmp_path)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    warning = next(entry for entry in lines if "STREAMREC_UPDATER_HISTORY_LEN" in entry["message"])
    assert warning["level"] == "WARNING" and warning["worker"] == "model"
    assert warning["logger"] == "pipeline.config" and warning["time"].endswith("Z")


def test_text_logs_by_default(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("STREAMREC_UPDATER_HISTORY_LEN", "5")
    assert main(["model", "list", "--paths-data-dir", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert " WARNING pipeline.config: ignoring unknown environment variable" in err
    assert not err.lstrip().startswith("{")


def test_help_lists_env_twins_and_never_a_secret(monkeypatch, capsys):
    monkeypatch.setenv("STREAMREC_KAFKA_SASL_PASSWORD", "sentinel-secret-value")
    with pytest.raises(SystemExit) as exit_info:
        main(["updater", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "STREAMREC_KAFKA_BOOTSTRAP_SERVERS" in out and "--updater-history-length" in out
    assert "sentinel-secret-value" not in out


def test_model_list_marks_current(registry, capsys):
    data_dir = str(registry.root.parent)
    first = registry.current_version()
    loaded = registry.load(first)
    registry.publish(
        loaded.model,
        loaded.seq_config,
        list(loaded.item_ids),
        loaded.catalog_meta,
        {"ndcg@10": 0.2},
        first,
        10,
        text_vectors=loaded.text_vectors,
    )
    assert main(["model", "list", "--paths-data-dir", data_dir]) == 0
    listing = capsys.readouterr().out
    assert "* v000002" in listing and "  v000001" in listing


def test_model_list_on_empty_registry(tmp_path, capsys):
    assert main(["model", "list", "--paths-data-dir", str(tmp_path)]) == 0
    assert "no model versions" in capsys.readouterr().out


def test_continual_learning_can_be_switched_off_for_up_and_the_finetune_worker(monkeypatch, caplog):
    from pipeline.config import load
    from workers.up import workers_for

    assert workers_for(load()) == ("updater", "finetune")  # co-located scoring by default
    monkeypatch.setenv("STREAMREC_FINETUNE_ENABLED", "false")
    assert workers_for(load()) == ("updater",)
    monkeypatch.setenv("STREAMREC_UPDATER_SCORE", "false")
    assert workers_for(load()) == ("updater", "scorer")
    # the worker itself returns before touching any broker (none runs here)
    assert main(["finetune", "--kafka-bootstrap-servers", "127.0.0.1:1"]) == 0
    assert "continual learning is off" in caplog.text


def test_the_finetune_priority_is_only_ever_lowered():
    """In a child process (niceness cannot be undone): raised to the setting, never back."""
    import subprocess
    import sys

    code = (
        "import os; from workers.runtime import lower_cpu_priority as p; "
        "print(os.getpriority(os.PRIO_PROCESS, 0), p(7), p(3), p(0))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    base, *after = map(int, out.stdout.split())
    assert after == [max(base, 7)] * 3


def test_only_the_finetune_consumer_trades_latency_for_fewer_fetches():
    from pipeline.config import load
    from pipeline.kafka.settings import consumer_settings
    from workers import finetune, scorer, updater

    config = load(env={}, overrides={"finetune.fetch_min_bytes": "4096"})
    fetch = {
        spec.name: consumer_settings(spec.consumer(config), "127.0.0.1:1", None)
        for spec in (updater.SPEC, scorer.SPEC, finetune.SPEC)
    }
    assert fetch["updater"]["fetch_min_bytes"] == fetch["scorer"]["fetch_min_bytes"] == 1
    assert fetch["updater"]["fetch_max_wait_ms"] == config.kafka.fetch_max_wait_ms == 10
    assert fetch["finetune"]["fetch_min_bytes"] == 4096
    assert fetch["finetune"]["fetch_max_wait_ms"] == config.finetune.fetch_max_wait_ms == 500


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.startswith("streamrec ")


def test_a_worker_starts_among_kubernetes_service_links_and_takes_its_log_level_from_env(
    monkeypatch, tmp_path, capsys
):
    monkeypatch.setenv("STREAMREC_UPDATER_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("STREAMREC_UPDATER_PORT", "tcp://10.0.0.1:9101")
    monkeypatch.setenv("STREAMREC_LOG_LEVEL", "warning")
    assert main(["model", "list", "--paths-data-dir", str(tmp_path)]) == 0
    assert "no model versions" in capsys.readouterr().out
    monkeypatch.setenv("STREAMREC_LOG_LEVEL", "chatty")
    with pytest.raises(SystemExit) as info:
        main(["model", "list", "--paths-data-dir", str(tmp_path)])
    assert info.value.code == 2 and "STREAMREC_LOG_LEVEL" in capsys.readouterr().err


def test_a_worker_with_a_mistyped_kafka_python_setting_stops_at_start_naming_it(tmp_path):
    """No broker needed: the setting is checked before the first client connects."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMREC_")}
    env.update(
        STREAMREC_KAFKA_PYTHON_RETRY_BACKOF_MS="100",
        STREAMREC_KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:9",
        STREAMREC_PATHS_DATA_DIR=str(tmp_path),
        STREAMREC_UPDATER_METRICS_PORT="0",
    )
    done = subprocess.run(
        [sys.executable, "-m", "workers", "updater"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert (
        "invalid setting kafka_python.retry_backof_ms: kafka-python" in done.stderr
        and "did you mean retry_backoff_ms?" in done.stderr
    )


def test_help_tells_why_each_setting_exists(capsys):
    with pytest.raises(SystemExit):
        main(["updater", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the lines
    assert (
        "--updater-dedup-capacity INT event ids remembered per partition, so a record "
        "delivered twice is applied once; default 200000 [env "
        "STREAMREC_UPDATER_DEDUP_CAPACITY]"
    ) in out
