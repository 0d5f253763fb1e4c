"""Continual-learning pieces: trigger, vocabulary growth, feedback split, promotion, prequential."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import TrainingConfig
from pipeline.continual import (
    OnlineEvaluator,
    TriggerPolicy,
    fine_tune,
    grow_vocabulary,
    prequential,
    prequential_rounds,
    promotion_decision,
    split_feedback,
)
from pipeline.messages import Event
from pipeline.model import SeqRecConfig, SeqRecModel


def _model(num_items=5):
    torch.manual_seed(0)
    return SeqRecModel(
        SeqRecConfig(
            num_items=num_items,
            hidden_size=16,
            num_layers=1,
            num_heads=2,
            max_length=8,
            dropout=0.0,
        )
    ).eval()


def _ev(i, user, item, ts=None):
    return Event(f"e{i}", user, item, "click", ts if ts is not None else 1_000 + i)


def test_trigger_every_n_events_or_t_seconds_but_never_without_new_events():
    policy = TriggerPolicy(every_events=100, every_seconds=60.0)
    assert policy.due(100, 0.0) and policy.due(1, 60.0)
    assert not policy.due(99, 59.0) and not policy.due(0, 1e9)


def test_the_first_fine_tune_comes_early_then_the_normal_schedule():
    policy = TriggerPolicy(every_events=5000, every_seconds=300.0, first_after_events=300)
    assert policy.due(300, 0.0, first=True) and not policy.due(299, 0.0, first=True)
    assert not policy.due(300, 0.0) and policy.due(5000, 0.0)
    assert not TriggerPolicy(5000, 300.0).due(300, 0.0, first=True)  # 0 = off


def test_growing_the_vocabulary_keeps_old_outputs_identical_and_new_rows_cold_start():
    model = _model()
    ids = [f"i{i}" for i in range(5)]
    grown, grown_ids = grow_vocabulary(model, ids, ["i2", "new1", "new2", "new1"])
    assert grown_ids == ids + ["new1", "new2"] and grown.config.num_items == 7
    text = torch.randn(8, 384)
    with torch.no_grad():
        old = model.item_vectors(torch.arange(6), text[:6])
        assert torch.equal(grown.item_vectors(torch.arange(6), text[:6]), old)
        # a new row gives exactly the vector the unknown row gave the same item (its cold start)
        cold = model.item_vectors(torch.zeros(2, dtype=torch.long), text[6:])
        assert torch.allclose(grown.item_vectors(torch.tensor([6, 7]), text[6:]), cold)
        seq = old[1:4].unsqueeze(0)  # (1, 3, D)
        types = torch.zeros(1, 3, dtype=torch.long)
        assert torch.equal(
            grown.encode(seq, types, torch.tensor([3])), model.encode(seq, types, torch.tensor([3]))
        )


def test_split_holds_out_the_newest_event_of_recent_users_and_replays_others():
    events = [_ev(i, f"old{i % 4}", f"i{i % 5}") for i in range(20)]
    events += [_ev(100 + i, f"new{i % 2}", f"i{i % 5}") for i in range(6)]
    index = {f"i{i}": i + 1 for i in range(5)}
    data = split_feedback(
        events, index, new_from=20, replay_ratio=1.0, holdout_users=1, rng=np.random.default_rng(0)
    )
    assert len(data.holdout) == 1 and data.holdout[0].user_id == "new1"
    assert list(data.holdout[0].items) == [2, 4, 1]  # new1's items, newest last = the target
    (train_new1,) = [s for s in data.train if s.user_id == "new1"]
    assert list(train_new1.items) == [2, 4]  # the held-out target is not trained on
    assert data.new_users == 2 and data.replayed_users == 2
    assert {s.user_id for s in data.train} >= {"new0", "new1"}


def _split(events, index, *, new_from, replay, users, per_user):
    """split_feedback (replay_ratio, holdout_users, holdout_events_per_user), its rng seeded 0."""
    return split_feedback(
        events,
        index,
        new_from=new_from,
        replay_ratio=replay,
        holdout_users=users,
        holdout_events_per_user=per_user,
        rng=np.random.default_rng(0),
    )


def test_split_holds_out_several_newest_events_per_user_but_never_more_than_half():
    index = {f"i{i}": i + 1 for i in range(9)}
    events = [_ev(i, "old", f"i{i % 9}") for i in range(5)]
    events += [_ev(10 + i, "busy", f"i{i % 9}") for i in range(10)]  # 10 new events
    events += [_ev(30 + i, "few", f"i{(i + 4) % 9}") for i in range(3)]  # 3 new events
    data = _split(events, index, new_from=5, replay=0.0, users=2, per_user=4)
    by_user: dict[str, list[list[int]]] = {}
    for seq in data.holdout:
        by_user.setdefault(seq.user_id, []).append(list(seq.items))
    # busy: its 4 newest events, each a target after the whole history before it
    assert by_user["busy"] == [[index[f"i{j % 9}"] for j in range(n + 1)] for n in range(6, 10)]
    assert by_user["few"] == [[5, 6, 7]]  # 3 new events: one target (at most half, at least one)
    trained = {s.user_id: list(s.items) for s in data.train}
    assert trained["busy"] == [index[f"i{j % 9}"] for j in range(6)]
    assert trained["few"] == [5, 6]


def test_split_holds_out_the_newest_by_event_time_not_the_last_to_arrive():
    index = {f"i{i}": i + 1 for i in range(9)}
    events = [
        _ev(0, "u", "i0", ts=10),
        _ev(1, "u", "i1", ts=20),
        _ev(2, "u", "i2", ts=100),
        _ev(3, "u", "i3", ts=200),
        _ev(4, "u", "i4", ts=50),
    ]
    data = _split(events, index, new_from=2, replay=0.0, users=1, per_user=1)
    (held,) = data.holdout
    assert list(held.items) == [1, 2, 5, 3, 4]  # up to i3 (ts 200), the late i4 in its place
    assert [list(s.items) for s in data.train] == [[1, 2, 5, 3]]


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 4), st.integers(0, 50)), min_size=1, max_size=40),
    st.integers(0, 40),
    st.integers(1, 6),
    st.integers(1, 4),
)
def test_split_holds_out_each_users_newest_new_events_and_never_trains_on_them(
    rows, new_from, per_user, holdout_users
):
    # One item per event (row i + 1), so every target names its event.
    events = [_ev(i, f"u{u}", f"i{i}", ts=ts) for i, (u, ts) in enumerate(rows)]
    index = {e.item_id: i + 1 for i, e in enumerate(events)}
    data = _split(
        events, index, new_from=new_from, replay=10.0, users=holdout_users, per_user=per_user
    )
    new: dict[str, list[int]] = {}
    for i in range(new_from, len(events)):
        new.setdefault(events[i].user_id, []).append(i)
    newest_first = sorted(new, key=lambda u: max((events[i].ts, i) for i in new[u]), reverse=True)
    targets = set()
    for seq in data.holdout:
        target = int(seq.items[-1]) - 1
        user = events[target].user_id
        assert user in newest_first[:holdout_users]
        ranked = sorted(new[user], key=lambda i: (events[i].ts, i))
        assert target in ranked[-min(per_user, max(1, len(ranked) // 2)) :]
        assert list(seq.items) == [
            j + 1
            for j in sorted(
                (
                    j
                    for j in range(len(events))
                    if events[j].user_id == user
                    and (events[j].ts, j) <= (events[target].ts, target)
                ),
                key=lambda j: (events[j].ts, j),
            )
        ]
        targets.add(target)
    trained = {int(i) - 1 for s in data.train for i in s.items}
    assert not trained & targets
    assert data.train_events == sum(len(s) for s in data.train)


def test_promotion_respects_the_tolerance():
    cur = {"ndcg@10": 0.30, "users": 50}
    assert promotion_decision({"ndcg@10": 0.31, "users": 50}, cur, tolerance=0.0)[0]
    ok, why = promotion_decision({"ndcg@10": 0.29, "users": 50}, cur, tolerance=0.0)
    assert not ok and "0.2900" in why and "0.3000" in why
    assert promotion_decision({"ndcg@10": 0.29, "users": 50}, cur, tolerance=0.02)[0]
    assert not promotion_decision({"ndcg@10": float("nan")}, cur, tolerance=1.0)[0]


def test_fine_tune_grows_trains_and_compares_on_the_same_targets():
    model = _model(3)
    ids = ["a", "b", "c"]
    rng = np.random.default_rng(1)
    events = [_ev(i, f"u{i % 6}", ["a", "b", "c", "d"][int(rng.integers(4))]) for i in range(120)]
    text = np.random.default_rng(2).standard_normal((4, 384)).astype(np.float32)
    cand = fine_tune(
        model,
        ids,
        events,
        new_from=60,
        text_of=lambda items: text[[ord(i) - ord("a") for i in items]],
        training=TrainingConfig(epochs=1, batch_size=8, device="cpu"),
        replay_ratio=1.0,
        holdout_users=6,
    )
    assert cand.item_ids == ["a", "b", "c", "d"] and cand.model.config.num_items == 4
    assert cand.candidate_metrics["users"] == cand.current_metrics["users"] == 6
    assert np.isfinite(cand.loss)
    assert model.config.num_items == 3  # the served model is never touched


def test_online_evaluator_pairs_each_recommendation_with_the_next_event_in_any_order():
    ev = OnlineEvaluator(k=10)
    ev.observe_event("u", "e1", "x")
    assert ev.observe_recommendation("e1", ["y", "z"]) is None  # next event not seen yet
    assert ev.observe_event("u", "e2", "z") == (1.0, 1 / np.log2(3))
    ev.observe_event("u", "e3", "q")  # e2's recommendation is late
    assert ev.observe_recommendation("e2", ["a"]) == (0.0, 0.0)
    assert ev.observe_recommendation(None, ["a"]) is None  # a model-swap re-scoring
    assert ev.figures()["judged"] == 2 and ev.figures()["hr@10"] == 0.5


def test_prequential_judges_only_triggers_with_their_own_recommendation():
    events = [_ev(1, "u", "a"), _ev(2, "u", "b"), _ev(3, "u", "c"), _ev(4, "v", "a")]
    figures = prequential(events, {"e1": ["b", "x"], "e2": ["x"]}, k=10)
    assert figures["judged"] == 2 and figures["hr@10"] == 0.5
    same = prequential(events, {"e1": ["b", "x"], "e2": ["x"]}, k=10, only={"e1", "e3"})
    assert same["judged"] == 1 and same["hr@10"] == 1.0  # e2 left out, e3 had no recommendation


def test_the_trigger_policy_is_a_frozen_value():
    """Frozen: a worker's policy cannot drift at run time."""
    policy = TriggerPolicy(1, 1.0)
    assert dataclasses.asdict(policy) == {
        "every_events": 1,
        "every_seconds": 1.0,
        "first_after_events": 0,
    }
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.every_events = 2  # type: ignore[misc]


def test_prequential_rounds_keep_each_users_order_and_never_repeat_a_user_within_a_round():
    events = [
        _ev(1, "a", "x"),
        _ev(2, "a", "y"),
        _ev(3, "b", "x"),
        _ev(4, "a", "z"),
        _ev(5, "b", "y"),
    ]
    rounds = prequential_rounds(events)
    assert [[e.event_id for e in r] for r in rounds] == [["e1", "e3"], ["e2", "e5"], ["e4"]]
    assert prequential_rounds([]) == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 9)), max_size=60))
def test_prequential_rounds_are_a_regrouping_that_prequential_cannot_tell_apart(rows):
    events = [_ev(i, f"u{u}", f"i{item}") for i, (u, item) in enumerate(rows)]
    rounds = prequential_rounds(events)
    flat = [e for r in rounds for e in r]
    assert sorted(e.event_id for e in flat) == sorted(e.event_id for e in events)
    for r in rounds:
        assert len({e.user_id for e in r}) == len(r)
    for user in {e.user_id for e in events}:
        assert [e for e in flat if e.user_id == user] == [e for e in events if e.user_id == user]
    recs = {e.event_id: [f"i{(int(e.event_id[1:]) * 7) % 10}"] for e in events}
    assert prequential(flat, recs) == prequential(events, recs)
