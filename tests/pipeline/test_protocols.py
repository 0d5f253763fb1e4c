"""The two ranking protocols (masked: whole history out; unmasked: RecBole's default) and the
SASRec baseline that `streamrec evaluate` trains beside streamrec's model."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.baselines import SASRec, SASRecBaseline, SASRecConfig
from pipeline.config import TrainingConfig
from pipeline.evaluation import PROTOCOLS, protocol_ranks, score_histories
from pipeline.training import UserSequence, evaluate, fit


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@st.composite
def _ranking_case(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """scores (B, N) with many ties, targets (B,) columns, histories of rows (1..N, 0 = unknown)
    that may repeat items and may contain the target."""
    b = draw(st.integers(1, 5))
    n = draw(st.integers(1, 12))
    values = st.integers(-3, 3).map(float)  # a small range: ties are common
    scores = np.array([[draw(values) for _ in range(n)] for _ in range(b)], dtype=np.float32)
    targets = np.array([draw(st.integers(0, n - 1)) for _ in range(b)], dtype=np.int64)
    histories = [
        np.array(draw(st.lists(st.integers(0, n), max_size=20)), dtype=np.int64) for _ in range(b)
    ]
    return scores, targets, histories


@given(_ranking_case())
@settings(max_examples=200, deadline=None)
def test_masked_rank_counts_only_items_outside_the_history(case) -> None:
    scores, targets, histories = case
    ranks = protocol_ranks(scores, targets, histories)
    assert set(ranks) == set(PROTOCOLS)
    for b, (row, target, history) in enumerate(zip(scores, targets, histories)):
        seen = {int(r) - 1 for r in history if r > 0} - {int(target)}
        # Ties count against the target, in both protocols.
        unmasked = sum(1 for c in range(len(row)) if row[c] >= row[target])
        masked = sum(1 for c in range(len(row)) if row[c] >= row[target] and c not in seen)
        assert ranks["unmasked"][b] == unmasked
        assert ranks["masked"][b] == masked
        assert 1 <= ranks["masked"][b] <= ranks["unmasked"][b]
        assert ranks["masked"][b] <= len(row) - len(seen)


@given(_ranking_case(), st.floats(-1e6, 1e6, allow_nan=False))
@settings(max_examples=100, deadline=None)
def test_masked_rank_ignores_what_history_items_score(case, value) -> None:
    scores, targets, histories = case
    before = protocol_ranks(scores, targets, histories)["masked"]
    changed = scores.copy()
    for b, history in enumerate(histories):
        cols = [int(r) - 1 for r in history if r > 0 and int(r) - 1 != targets[b]]
        changed[b, cols] = value  # the -inf of the masked protocol makes these irrelevant
    assert protocol_ranks(changed, targets, histories)["masked"].tolist() == before.tolist()


@given(_ranking_case())
@settings(max_examples=50, deadline=None)
def test_empty_histories_make_both_protocols_equal(case) -> None:
    scores, targets, _ = case
    ranks = protocol_ranks(scores, targets, [np.zeros(0, dtype=np.int64)] * len(targets))
    assert ranks["masked"].tolist() == ranks["unmasked"].tolist()


def _sequences(n_users: int, n_items: int, length: int, seed: int) -> list[UserSequence]:
    rng = np.random.default_rng(seed)
    return [
        UserSequence(
            str(u),
            rng.permutation(np.arange(1, n_items + 1))[:length],
            np.zeros(length, dtype=np.int64),
        )
        for u in range(n_users)
    ]


def test_fit_selection_and_test_figures_mask_the_same_whole_history() -> None:
    # max_length 4 < history length 9: the masked protocol still removes all 9 history items,
    # and training.evaluate (what early stopping reads) agrees with the test-figure code path.
    torch.manual_seed(0)
    model = SASRec(
        SASRecConfig(num_items=12, hidden_size=8, num_heads=2, inner_size=16, max_length=4)
    ).eval()
    text = torch.zeros(12, 3)
    seqs = _sequences(20, 12, 10, seed=1)
    inputs = [UserSequence(s.user_id, s.items[:-1], s.types[:-1]) for s in seqs]
    scores = score_histories(model, inputs, text)
    targets = np.array([int(s.items[-1]) - 1 for s in seqs])
    ranks = protocol_ranks(scores, targets, [s.items[:-1] for s in seqs])
    # 12 items, 9 in each history: the target competes with 2 others at most.
    assert ranks["masked"].max() <= 3
    masked = evaluate(model, seqs, text, ks=(1, 2), exclude_seen=True)
    unmasked = evaluate(model, seqs, text, ks=(1, 2), exclude_seen=False)
    for k in (1, 2):
        assert masked[f"hr@{k}"] == pytest.approx(float(np.mean(ranks["masked"] <= k)))
        assert unmasked[f"hr@{k}"] == pytest.approx(float(np.mean(ranks["unmasked"] <= k)))


def test_sasrec_is_causal_and_ignores_text_and_types() -> None:
    torch.manual_seed(0)
    model = SASRec(
        SASRecConfig(num_items=10, hidden_size=8, num_heads=2, inner_size=16, max_length=6)
    ).eval()
    items = torch.tensor([[1, 2, 3, 4, 5, 6]])
    vecs = model.item_vectors(items.view(-1), torch.randn(6, 5)).view(1, 6, 8)
    full = model(vecs)
    changed = vecs.clone()
    changed[0, 4:] = model.item_vectors(torch.tensor([9, 9]))
    assert torch.allclose(model(changed)[0, :4], full[0, :4], atol=1e-6)  # earlier positions
    assert not torch.allclose(model(changed)[0, 4:], full[0, 4:])
    users = model.encode(vecs, torch.zeros(1, 6, dtype=torch.long), torch.tensor([3]))
    assert torch.allclose(users, full[0, 2:3], atol=1e-6)
    with pytest.raises(ValueError, match="max_length"):
        model(torch.zeros(1, 7, 8))


def test_sasrec_learns_a_fixed_order_through_the_shared_fit() -> None:
    # Every user walks items 1..8 in order: after fitting, the next item ranks first.
    torch.manual_seed(0)
    baseline = SASRecBaseline(
        hidden_size=16,
        num_heads=2,
        inner_size=32,
        max_length=8,
        dropout=0.0,
        learning_rate=1e-2,
        weight_decay=0.0,
        epochs=40,
    )
    model = SASRec(baseline.model_config(num_items=8))
    seqs = [UserSequence(str(u), np.arange(1, 9), np.zeros(8, dtype=np.int64)) for u in range(16)]
    training = dataclasses.replace(TrainingConfig(device="cpu"), **baseline.training_fields())
    fit(model, seqs, torch.zeros(8, 1), training)
    assert evaluate(model, seqs, torch.zeros(8, 1), ks=(1,), exclude_seen=False)["hr@1"] == 1.0


def test_sasrec_config_is_checked() -> None:
    with pytest.raises(ValueError, match="num_heads"):
        SASRecConfig(num_items=3, hidden_size=10, num_heads=3)
    with pytest.raises(ValueError, match="dropout"):
        SASRecConfig(num_items=3, dropout=1.0)
    with pytest.raises(ValueError):
        SASRecBaseline(learning_rate=0.0)
