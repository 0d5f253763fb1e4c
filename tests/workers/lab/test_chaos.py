"""The chaos verifier itself: it must count what it claims (lost, twice, duplicates), and the
fault hook must fire only at its point and count."""

from __future__ import annotations

import logging
import signal
import threading

import numpy as np
import pytest

from pipeline.config import load
from workers.lab.chaos_harness import Worker
from workers.lab.chaos_verdict import compare, duplicate_recommendations, recovery_times
from workers.runtime import fault_from_env, fault_hook


class _Collected:
    def __init__(self, vectors, recs=None):
        self.lock = threading.Lock()
        self.vectors = {v["user_id"]: v for v in vectors}
        self.final = {v["user_id"]: {v["trigger_event_id"]: v} for v in vectors}
        self.recs = recs or {}


def _ref(history, last="e3"):
    return {"u": {"history": history, "last": last, "vector": np.zeros(2, dtype=np.float32)}}


def _vec(history, trigger="e3", vector=(0.0, 0.0)):
    return {"user_id": "u", "trigger_event_id": trigger, "history": history, "vector": list(vector)}


def test_compare_counts_lost_and_twice_and_vector_distance():
    ok = compare(_ref(["a", "b", "a"]), _Collected([_vec(["a", "b", "a"])]))
    assert ok["events_lost"] == ok["events_applied_twice"] == ok["users_state_mismatch"] == 0
    lost = compare(_ref(["a", "b", "a"]), _Collected([_vec(["a", "b"])]))
    assert (lost["events_lost"], lost["events_applied_twice"]) == (1, 0)
    twice = compare(_ref(["a", "b"]), _Collected([_vec(["a", "b", "b"])]))
    assert (twice["events_lost"], twice["events_applied_twice"]) == (0, 1)
    far = compare(_ref(["a"]), _Collected([_vec(["a"], vector=(0.0, 2e-5))]))
    assert far["users_state_mismatch"] == 1 and far["max_vector_diff"] == pytest.approx(2e-5)
    stale = compare(_ref(["a"]), _Collected([_vec(["a"], trigger="e2")]))
    assert stale["users_last_event_wrong"] == 1
    missing = compare(_ref(["a", "b"]), _Collected([]))
    assert missing["users_missing"] == 1 and missing["events_lost"] == 2


def test_duplicate_recommendations_and_rec_ids():
    same = _Collected([], {("u", "e1", "v1"): ["r1", "r1"], ("u", "e2", "v1"): ["r2"]})
    assert duplicate_recommendations(same) == {
        "recommendations": 3,
        "duplicate_recommendations": 1,
        "duplicates_same_rec_id": True,
    }
    differ = _Collected([], {("u", "e1", "v1"): ["r1", "rX"]})
    assert duplicate_recommendations(differ)["duplicates_same_rec_id"] is False


def test_recovery_times_from_restart_to_first_output():
    result = recovery_times([10.0, 20.0], [5.0, 12.5, 13.0, 21.0])
    assert (result["recovered"], result["max_s"], result["p50_s"]) == (2, 2.5, 1.75)


def test_fault_hook_fires_at_its_point_on_the_nth_hit(monkeypatch):
    killed = []
    monkeypatch.setattr("workers.runtime.os.kill", lambda pid, sig: killed.append(sig))
    hook = fault_hook("before_commit:2")
    hook("after_produce")
    hook("before_commit")
    assert not killed
    hook("before_commit")
    assert len(killed) == 1
    assert fault_hook("") is None
    stop = fault_hook("mid_snapshot:1:stop")
    stop("mid_snapshot")
    stop("mid_snapshot")  # once only: the harness sends SIGCONT and the worker goes on
    assert killed[1:] == [signal.SIGSTOP]
    with pytest.raises(ValueError, match="STREAMREC_FAULT_POINT"):
        fault_hook("nowhere")


def test_a_fault_point_is_armed_only_with_the_chaos_opt_in(monkeypatch, caplog):
    killed = []
    monkeypatch.setattr("workers.runtime.os.kill", lambda pid, sig: killed.append(sig))
    caplog.set_level(logging.WARNING, logger="workers.runtime")
    # A fault point left in a production environment: ignored, loudly, even a malformed one.
    for env in (
        {"STREAMREC_FAULT_POINT": "before_commit"},
        {"STREAMREC_FAULT_POINT": "before_commit", "STREAMREC_CHAOS": "0"},
        {"STREAMREC_FAULT_POINT": "nowhere"},
    ):
        assert fault_from_env(env) is None
    assert caplog.text.count("ignored: fault injection is for `streamrec chaos` only") == 3
    assert "ARMED" not in caplog.text and fault_from_env({"STREAMREC_CHAOS": "1"}) is None
    hook = fault_from_env({"STREAMREC_FAULT_POINT": "before_commit", "STREAMREC_CHAOS": "1"})
    assert "FAULT INJECTION ARMED" in caplog.text
    hook("before_commit")
    assert killed == [signal.SIGKILL]
    with pytest.raises(ValueError, match="STREAMREC_FAULT_POINT"):
        fault_from_env({"STREAMREC_FAULT_POINT": "nowhere", "STREAMREC_CHAOS": "1"})
    # Both are switches of the chaos run, not settings: the config accepts them.
    load(env={"STREAMREC_FAULT_POINT": "before_commit", "STREAMREC_CHAOS": "1"})


def test_the_chaos_harness_sets_both_switches_and_only_with_a_fault(monkeypatch, tmp_path):
    started = []

    class _Popen:
        def __init__(self, cmd, env, **kwargs):
            started.append(env)

    monkeypatch.setenv("STREAMREC_CHAOS", "1")  # never inherited: the harness sets it itself
    monkeypatch.setattr("workers.lab.chaos_harness.subprocess.Popen", _Popen)
    worker = Worker("updater", load(env={}), tmp_path / "log")
    worker.start()
    worker.start(fault="after_produce:2")
    assert "STREAMREC_FAULT_POINT" not in started[0] and "STREAMREC_CHAOS" not in started[0]
    assert started[1]["STREAMREC_FAULT_POINT"] == "after_produce:2"
    assert started[1]["STREAMREC_CHAOS"] == "1"


def test_startup_timelines_from_worker_logs():
    from workers.lab.chaos_verdict import startup_timelines

    log = "\n".join(
        [
            "2026-11-23 10:00:00,000 INFO workers.runtime: updater start-up timeline "
            '{"entered": 0.1, "assigned": 3.0, "first_batch": 3.5}',
            "2026-11-23 10:00:05,000 INFO workers.updater: something else",
            "2026-11-23 10:00:10,000 INFO workers.runtime: updater start-up timeline "
            '{"entered": 0.3, "assigned": 5.0, "first_batch": 6.5}',
            "2026-11-23 10:00:20,000 INFO workers.runtime: updater start-up timeline {broken",
        ]
    )
    import datetime

    after = datetime.datetime(2026, 11, 23, 10, 0, 1).timestamp()
    assert startup_timelines(log, after) == {
        "starts": 1,
        "p50_s": {"entered": 0.3, "assigned": 5.0, "first_batch": 6.5},
        "max_s": {"entered": 0.3, "assigned": 5.0, "first_batch": 6.5},
    }
    both = startup_timelines(log)
    assert both["starts"] == 2 and both["p50_s"]["first_batch"] == 5.0
    assert list(both["p50_s"]) == ["entered", "assigned", "first_batch"]
    assert startup_timelines("") == {"starts": 0}


def test_stop_signal_during_startup_aborts_it_after_the_cli_handler_ran():
    from workers.runtime import _abort_startup_on_stop_signal, _StartupAborted

    seen = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        with pytest.raises(_StartupAborted), _abort_startup_on_stop_signal():
            signal.raise_signal(signal.SIGTERM)
        assert seen == [signal.SIGTERM]  # the CLI's handler (sets the stop event) ran first
        signal.raise_signal(signal.SIGTERM)  # after start-up: the CLI's handler alone
        assert seen == [signal.SIGTERM, signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_registry_check_after_a_kill_reports_broken_and_vanished_versions(registry):
    from workers.lab.chaos_finetune import _check

    root, known = registry.root, set()
    version = registry.current_version()
    sound = _check(root, known, None)
    assert sound["current_loads"] and not sound["failures"] and known == {version}
    weights = root / version / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])  # a torn write of a complete version
    torn = _check(root, known, version)  # the previous CURRENT is always verified again
    assert not torn["current_loads"] and any(version in f for f in torn["failures"])
    (root / version / "manifest.json").unlink()  # no longer listed as complete
    assert f"{version}: vanished" in _check(root, known, None)["failures"]


def test_chaos_help_names_every_scenario():
    from workers.cli import build_parser
    from workers.lab.chaos import KILL_FINETUNE, SCENARIOS

    parser = build_parser()
    chaos = next(
        a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == "chaos"
    )[1]
    help_text = " ".join(a.help or "" for a in chaos._actions if "--scenario" in a.option_strings)
    assert all(name in help_text for name in [*SCENARIOS, KILL_FINETUNE])
