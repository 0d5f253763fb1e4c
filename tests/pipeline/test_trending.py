"""Trending counts, model knowledge and the blend: pure, against plain references."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.scoring import top_k, top_k_blended, top_k_trending
from pipeline.trending import TrendingCounts, blend, knowledge


@settings(max_examples=200, deadline=None)
@given(
    events=st.lists(st.tuples(st.integers(0, 9), st.floats(0, 1e6)), min_size=1, max_size=60),
    half_life=st.floats(1.0, 1e5),
)
def test_counts_rank_like_a_plainly_decayed_sum(events, half_life):
    events.sort(key=lambda e: e[1])
    trending = TrendingCounts(half_life)
    for row, t in events:
        trending.add(np.array([row]), t)
    now = events[-1][1]
    reference = np.zeros(10)
    for row, t in events:
        reference[row] += 2.0 ** (-(now - t) / half_life)
    np.testing.assert_allclose(trending.counts(10, now), reference, rtol=1e-9, atol=1e-300)
    scores = trending.scores(10)
    assert scores.max() == pytest.approx(1.0) and scores.min() >= 0
    np.testing.assert_allclose(scores, reference / reference.max(), rtol=1e-5, atol=1e-7)


def test_a_recent_interaction_outweighs_an_old_one_and_unknown_rows_are_ignored():
    trending = TrendingCounts(60.0)
    trending.add(np.array([0, 0, -1]), 0.0)
    trending.add(np.array([1, 1, 1]), 120.0)  # two half-lives later: 3 > 2 / 4
    assert trending.scores(3).tolist() == pytest.approx([2 / 4 / 3, 1.0, 0.0])
    assert TrendingCounts(1.0).scores(4).tolist() == [0, 0, 0, 0]


def test_knowledge_is_one_for_a_model_trained_on_everything_it_serves():
    trained = np.array([True, True, False, True])
    available = np.array([True, True, True, False])
    weights = knowledge(
        [np.array([0, 1]), np.array([0, 2]), np.array([], dtype=np.int64), np.array([-1, 3])],
        trained,
        available,
    )
    assert weights.tolist() == pytest.approx([2 / 3, 1 / 3, 0.0, 2 / 3])
    everything = knowledge([np.array([0, 1])], np.ones(4, bool), np.ones(4, bool))
    assert everything.tolist() == [1.0]


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(3, 40), b=st.integers(1, 5))
def test_weight_one_keeps_the_models_order_and_weight_zero_is_trending(seed, n, b):
    rng = np.random.default_rng(seed)
    users = rng.standard_normal((b, 8)).astype(np.float32)
    items = rng.standard_normal((n, 8)).astype(np.float32)
    mask = rng.random((b, n)) < 0.2
    trend = rng.random(n).astype(np.float32)
    k = min(5, n)

    def blended(weight: float):
        return top_k_blended(
            users,
            items,
            mask,
            k,
            history_rows=[],
            repeat_bias=0.0,
            trend=trend,
            weight=np.full(b, weight, np.float32),
        )

    plain_rows, _, plain_valid = top_k(users, items, mask, k)
    rows, _, valid, trending = blended(1.0)
    assert (rows == plain_rows).all() and (valid == plain_valid).all() and not trending.any()
    rows, _, valid, trending = blended(0.0)
    for u in range(b):
        allowed = np.flatnonzero(~mask[u])
        expected = allowed[np.argsort(-trend[allowed], kind="stable")][:k]
        assert rows[u][valid[u]].tolist() == expected.tolist()
    assert (trending == valid).all()


def test_blend_shares_one_scale():
    scores = np.array([[10.0, 0.0, -10.0]], np.float32)
    blended, trending = blend(
        scores, np.zeros((1, 3), bool), np.array([0.0, 0.0, 1.0]), np.array([0.5], np.float32)
    )
    assert blended.min() >= 0 and blended.max() <= 1
    assert trending.tolist() == [[False, False, True]]


@settings(max_examples=100, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1), n=st.integers(1, 40), b=st.integers(1, 5), k=st.integers(1, 12)
)
def test_trending_only_ranks_by_counts_alone_minus_each_users_exclusions(seed, n, b, k):
    rng = np.random.default_rng(seed)
    mask = rng.random((b, n)) < 0.3
    trend = rng.integers(0, 4, n).astype(np.float32) / 3  # ties: the lower row first
    rows, scores, valid = top_k_trending(trend, mask, k)
    for u in range(b):
        allowed = np.flatnonzero(~mask[u])
        expected = allowed[np.argsort(-trend[allowed], kind="stable")][:k]
        assert rows[u][valid[u]].tolist() == expected.tolist()
        assert scores[u][valid[u]].tolist() == trend[expected].tolist()
        assert not valid[u][len(expected) :].any() and (rows[u][~valid[u]] == -1).all()
