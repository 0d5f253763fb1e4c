"""The prequential experiment: its comparison on the events both arms judged, its split."""

from __future__ import annotations

import dataclasses

import pytest

from pipeline.config import Config
from pipeline.messages import Event
from workers.cli import build_parser
from workers.lab.experiment import ML100K_REPLAY_FROM, compare_on_same_events, scenario


def _ev(i: int, user: str, item: str) -> Event:
    return Event(f"e{i}", user, item, "click", 1_000 + i)


def test_arms_are_compared_only_on_events_both_answered() -> None:
    tail = [_ev(1, "u", "a"), _ev(2, "u", "b"), _ev(3, "u", "c"), _ev(4, "u", "d")]
    # frozen answered e1 (miss) and e2 (hit on c); continual answered e2 (miss) and e3 (hit on d).
    frozen = {"e1": ["x"], "e2": ["c"]}
    continual = {"e2": ["x"], "e3": ["d"]}
    same = compare_on_same_events(tail, frozen, continual)
    assert same["judged"] == 1  # only e2 was answered by both
    assert same["frozen"] == {"hr@10": 1.0, "ndcg@10": 1.0}
    assert same["continual"] == {"hr@10": 0.0, "ndcg@10": 0.0}
    assert same["ndcg@10_relative_gain"] == -1.0


def test_no_common_event_gives_no_gain_instead_of_dividing_by_zero() -> None:
    tail = [_ev(1, "u", "a"), _ev(2, "u", "b")]
    same = compare_on_same_events(tail, {"e1": ["b"]}, {})
    assert same["judged"] == 0 and same["ndcg@10_relative_gain"] is None


def test_the_replayed_share_is_a_flag_defaulting_to_half_of_ml100k() -> None:
    args = build_parser().parse_args(["experiment", "prequential", "--dataset", "ml-100k"])
    assert args.bootstrap_fraction is None
    args = build_parser().parse_args(["experiment", "prequential", "--bootstrap-fraction", "0.8"])
    assert args.bootstrap_fraction == 0.8
    assert scenario(Config(), "ml-100k")[1] == ML100K_REPLAY_FROM == 0.5
    assert scenario(Config(), "ml-100k", 0.8)[1] == 0.8


def test_a_fraction_that_leaves_nothing_to_replay_or_to_bootstrap_is_refused() -> None:
    for fraction in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="bootstrap fraction"):
            scenario(Config(), "ml-100k", fraction)


def test_the_drift_scenario_always_splits_at_its_era_boundary() -> None:
    data, fraction = scenario(Config(), "synthetic", 0.8)
    assert fraction == 0.5 and data.name.startswith("synthetic-drift")
    # a serving split of 1.0 (allowed for the bootstrap command) must not break the drift run
    whole = Config().replace(
        training=dataclasses.replace(Config().training, bootstrap_fraction=1.0)
    )
    assert scenario(whole, "synthetic")[1] == 0.5
