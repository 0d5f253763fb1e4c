"""`streamrec chaos`, trimmed short profile of scenario 1 (SIGKILL the updater, scoring its users
as it does by default) and scenario 3
(SIGKILL at each named point of the loop and the store): nothing lost, nothing applied twice,
state equal to the in-process reference. Timing checks (recovery p95) depend on the machine's
load and are reported by the command, not asserted here."""

from __future__ import annotations

import pytest

from pipeline.config import Config, PathsConfig
from workers.lab.chaos import Profile, run

pytestmark = pytest.mark.integration

# One kill, one hit per point: the full profile runs 8 kills and 5 hits per point.
_TEST_PROFILE = Profile(
    rate=200, min_duration_s=5, users=100, kills=1, every_s=(1, 2), repeats=1, settle_timeout_s=60
)
_CORRECTNESS = (
    "no_event_lost",
    "none_applied_twice",
    "state_equals_reference",
    "last_event_equal",
    "lag_back_to_zero",
    "replay_ok",
    "last_rec_answers_last_event",
    "no_missing_recommendation",
    "duplicates_share_rec_id",
)


def test_kills_and_named_fault_points_lose_nothing(tmp_path):
    results = run(
        Config(paths=PathsConfig(str(tmp_path))),
        scenarios=["kill-colocated", "fault-points"],  # the default topology: the updater scores
        profile=_TEST_PROFILE,
        seed=3,
    )
    kill, points = results
    for result in results:
        assert "error" not in result, result
        failed = [name for name in _CORRECTNESS if not result["checks"].get(name, True)]
        assert not failed, (failed, {k: v for k, v in result.items() if k != "faults"})
        assert result["events_lost"] == 0 and result["events_applied_twice"] == 0
    assert kill["faults_injected"] == 1 and kill["recovery_updater"]["recovered"] == 1
    assert {"last_rec_answers_last_event", "duplicates_share_rec_id"} <= kill["checks"].keys()
    assert points["checks"]["every_point_reached"], points["faults"]
    assert [f["point"] for f in points["faults"]] == [
        "after_state_update",
        "after_produce",
        "before_commit",
        "mid_snapshot",
    ]


def test_killing_a_publishing_fine_tune_never_breaks_the_registry(tmp_path):
    """Scenario 4: SIGKILL at random moments of train / save / publish; CURRENT always loads,
    every version that was ever complete still verifies, partial versions are never listed."""
    results = run(
        Config(paths=PathsConfig(str(tmp_path))),
        scenarios=["kill-finetune"],
        profile="short",
        seed=2,
    )
    result = results[0]
    assert result["pass"], result
    assert result["faults_injected"] == 4 and result["versions_complete"] > 1
