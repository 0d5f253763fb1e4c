"""Ranking metrics: hand-computed, property-based, and ranks against a plain sort."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.ranking import hit_rate_at_k, mrr_at_k, ndcg_at_k, rank_of_targets


def test_metrics_hand_computed() -> None:
    ranks = np.array([1, 3, 11])
    assert hit_rate_at_k(ranks, 10) == pytest.approx(2 / 3)
    assert hit_rate_at_k(ranks, 1) == pytest.approx(1 / 3)
    assert ndcg_at_k(ranks, 10) == pytest.approx((1.0 + 1 / math.log2(4)) / 3)
    assert mrr_at_k(ranks, 10) == pytest.approx((1.0 + 1 / 3) / 3)
    assert mrr_at_k(ranks, 20) == pytest.approx((1.0 + 1 / 3 + 1 / 11) / 3)
    assert hit_rate_at_k(np.array([], dtype=int), 10) == 0.0


def test_rank_of_targets_hand_computed() -> None:
    scores = np.array([[0.1, 0.9, 0.5, 0.3], [0.4, 0.4, 0.2, 0.8]], dtype=np.float32)
    assert rank_of_targets(scores, np.array([2, 0])).tolist() == [2, 3]  # tie counts against
    exclude = np.array([[False, True, False, False], [True, False, False, True]])
    assert rank_of_targets(scores, np.array([2, 0]), exclude).tolist() == [1, 2]
    assert rank_of_targets(torch.from_numpy(scores), torch.tensor([1, 3])).tolist() == [1, 1]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 50), min_size=1, max_size=40), st.integers(1, 30))
def test_metric_properties(ranks_list: list[int], k: int) -> None:
    ranks = np.array(ranks_list)
    hr, ndcg, mrr = hit_rate_at_k(ranks, k), ndcg_at_k(ranks, k), mrr_at_k(ranks, k)
    assert 0.0 <= mrr <= ndcg + 1e-12 <= hr + 2e-12 <= 1.0 + 2e-12
    assert hit_rate_at_k(ranks, k + 1) >= hr
    assert hit_rate_at_k(np.ones_like(ranks), k) == ndcg_at_k(np.ones_like(ranks), k) == 1.0


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(2, 30), st.integers(0, 10_000))
def test_rank_matches_sort(batch: int, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    scores = rng.standard_normal((batch, n)).astype(np.float32)
    targets = rng.integers(0, n, batch)
    exclude = rng.random((batch, n)) < 0.3
    ranks = rank_of_targets(scores, targets, exclude)
    for b in range(batch):
        keep = ~exclude[b]
        keep[targets[b]] = True
        order = np.argsort(-scores[b][keep], kind="stable")
        position = int(np.nonzero(np.flatnonzero(keep)[order] == targets[b])[0][0]) + 1
        assert ranks[b] == position
        assert 1 <= ranks[b] <= n
