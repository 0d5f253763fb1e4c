"""The approximate path for large catalogs: recall against exact search, sparse exclusions,
rows added after the build, and a builder that never blocks."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.ann import AnnIndex, Exclusions, IndexBuilder, ann_top_k
from pipeline.scoring import epsilon_greedy, exclusion_mask, top_k


@pytest.fixture(scope="module")
def space():
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((40, 16)).astype(np.float32)
    items = centers[rng.integers(0, 40, 6000)] + 0.3 * rng.standard_normal((6000, 16)).astype(
        np.float32
    )
    users = centers[rng.integers(0, 40, 64)] + 0.3 * rng.standard_normal((64, 16)).astype(
        np.float32
    )
    return users.astype(np.float32), items.astype(np.float32)


def test_recall_against_exact_with_exclusions(space):
    users, items = space
    rng = np.random.default_rng(1)
    available = rng.random(len(items)) > 0.02
    excluded = [rng.integers(0, len(items), 30) for _ in users]
    index = AnnIndex(items, nprobe=16)
    rows, scores, valid = ann_top_k(index, users, items, Exclusions(available, excluded), 10)
    mask = exclusion_mask(len(users), len(items), excluded, available)
    exact_rows, _, _ = top_k(users, items, mask, 10)
    recall = np.mean(
        [len(set(a) & set(b)) / 10 for a, b in zip(rows.tolist(), exact_rows.tolist())]
    )
    assert recall >= 0.9
    assert valid.all() and not np.take_along_axis(mask, rows, axis=1).any()
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # sorted descending


@pytest.mark.parametrize("bias", [-50.0, 0.0, 50.0])
def test_repeat_bias_moves_history_items_like_the_exact_path(space, bias):
    users, items = space
    history = [np.arange(b * 7, b * 7 + 5) for b in range(len(users))]
    mask = np.zeros((len(users), len(items)), dtype=bool)
    exact_rows, exact_scores, _ = top_k(
        users, items, mask, 10, history_rows=history, repeat_bias=bias
    )
    plain_rows, _, _ = top_k(users, items, mask, 10)
    in_history = np.array(
        [[r in set(h.tolist()) for r in row] for row, h in zip(exact_rows, history)]
    )
    if bias > 0:
        assert in_history[:, :5].all()  # a large boost puts every history item first
    elif bias < 0:
        assert not in_history.any()
    else:
        assert np.array_equal(exact_rows, plain_rows)
    index = AnnIndex(items, nprobe=10**6)  # probes every list: the approximation is exact
    exclusions = Exclusions(np.ones(len(items), dtype=bool), [np.empty(0, np.int64)] * len(users))
    rows, scores, _ = ann_top_k(
        index, users, items, exclusions, 10, history_rows=history, repeat_bias=bias
    )
    if bias <= 0:  # a positive boost only reaches history items the index retrieved
        assert np.array_equal(rows, exact_rows)
        assert np.allclose(scores, exact_scores, atol=1e-4)


def test_rows_added_after_the_build_are_found(space):
    users, items = space
    index = AnnIndex(items[:5000], nprobe=16)
    favourite = (users[0] * 100).reshape(1, -1)  # a new item nobody can beat for user 0
    grown = np.concatenate([items, favourite]).astype(np.float32)
    exclusions = Exclusions(np.ones(len(grown), dtype=bool), [np.empty(0, np.int64)] * len(users))
    rows, _, _ = ann_top_k(index, users, grown, exclusions, 5)
    assert rows[0, 0] == len(grown) - 1


def test_user_left_short_falls_back_to_exact(space):
    users, items = space
    index = AnnIndex(items, nprobe=1)
    available = np.zeros(len(items), dtype=bool)
    available[[5, 17, 4000]] = True  # almost everything retired
    rows, _, valid = ann_top_k(index, users[:2], items, Exclusions(available, [np.empty(0)] * 2), 5)
    assert sorted(rows[0][valid[0]].tolist()) == [5, 17, 4000]


def test_exploration_accepts_sparse_exclusions(space):
    users, items = space
    available = np.ones(len(items), dtype=bool)
    available[:100] = False
    exclusions = Exclusions(available, [np.arange(100, 200)] * len(users))
    rows, scores, valid = ann_top_k(AnnIndex(items, nprobe=8), users, items, exclusions, 10)
    rows, _, explore = epsilon_greedy(
        rows,
        scores,
        valid,
        exclusions,
        user_vecs=users,
        item_vecs=items,
        epsilon=0.5,
        seeds=np.arange(len(users), dtype=np.uint64),
    )
    assert explore.any() and (rows[explore] >= 200).all()


def test_builder_returns_none_until_built_then_the_index(space):
    _, items = space
    builder = IndexBuilder(nprobe=8)
    assert builder.get("v1", items) is None
    builder.wait(60)
    index = builder.get("v1", items)
    assert index is not None and index.n == len(items)
