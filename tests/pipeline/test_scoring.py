"""Unit and property tests for pipeline.scoring (hand-made vectors; no I/O, fast)."""

from __future__ import annotations

import hashlib
import inspect

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pipeline import scoring
from pipeline.scoring import epsilon_greedy, exclusion_mask, explain, rec_id, seed_for, top_k


def _vecs(rows: list[list[float]]) -> np.ndarray:
    return np.asarray(rows, dtype=np.float32)


def _no_excl(b: int, n: int) -> np.ndarray:
    return exclusion_mask(b, n, [np.empty(0, np.int64)] * b, np.ones(n, bool))


def test_public_surface() -> None:
    # Exactly the module's own public functions are exported: a new one is not forgotten, and
    # a helper stays private.
    own = {
        name
        for name, value in vars(scoring).items()
        if inspect.isfunction(value) and value.__module__ == scoring.__name__
    }
    assert set(scoring.__all__) == {name for name in own if not name.startswith("_")}
    assert len(scoring.__all__) == len(set(scoring.__all__))


# --- exclusion_mask -----------------------------------------------------------------------


def test_exclusion_mask_purchased_retired_and_unknown() -> None:
    available = np.array([True, True, False, True, True])
    mask = exclusion_mask(2, 5, [np.array([0, -1, 3]), np.array([], np.int64)], available)
    assert mask.shape == (2, 5) and mask.dtype == bool
    assert mask.tolist() == [[True, False, True, True, False], [False, False, True, False, False]]


def test_exclusion_mask_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="outside"):
        exclusion_mask(1, 3, [np.array([3])], np.ones(3, bool))
    with pytest.raises(ValueError, match="excluded_rows"):
        exclusion_mask(2, 3, [np.array([0])], np.ones(3, bool))
    with pytest.raises(ValueError, match="available"):
        exclusion_mask(1, 3, [np.array([0])], np.ones(4, bool))


def test_exclusion_mask_empty_batch() -> None:
    assert exclusion_mask(0, 4, [], np.ones(4, bool)).shape == (0, 4)


# --- top_k --------------------------------------------------------------------------------


def test_top_k_order_and_exclusion() -> None:
    items = _vecs([[1, 0], [0, 1], [2, 0], [3, 0], [0.5, 0]])
    users = _vecs([[1, 0], [0, 1]])
    mask = exclusion_mask(2, 5, [np.array([3]), np.array([])], np.array([1, 1, 1, 1, 0], bool))
    rows, scores, valid = top_k(users, items, mask, 3)
    assert rows.dtype == np.int64 and scores.dtype == np.float32 and valid.all()
    assert rows[0].tolist() == [2, 0, 1]  # 3 purchased, 4 retired
    assert scores[0].tolist() == [2.0, 1.0, 0.0]
    assert rows[1].tolist() == [1, 0, 2]  # ties at 0: lower row first


def test_top_k_ties_lower_row_wins() -> None:
    items = _vecs([[1, 0]] * 6)
    rows, _, _ = top_k(_vecs([[1, 0]]), items, _no_excl(1, 6), 4)
    assert rows.tolist() == [[0, 1, 2, 3]]


def test_top_k_fewer_allowed_than_k() -> None:
    items = _vecs([[1, 0], [2, 0], [3, 0]])
    mask = exclusion_mask(1, 3, [np.array([1])], np.ones(3, bool))
    rows, scores, valid = top_k(_vecs([[1, 0]]), items, mask, 5)
    assert valid.tolist() == [[True, True, False, False, False]]
    assert rows.tolist() == [[2, 0, -1, -1, -1]]
    assert scores[0, :2].tolist() == [3.0, 1.0] and np.isneginf(scores[0, 2:]).all()


def test_top_k_negative_scores_rank_above_masked() -> None:
    items = _vecs([[-1, 0], [-5, 0]])
    rows, scores, valid = top_k(_vecs([[1, 0]]), items, _no_excl(1, 2), 2)
    assert rows.tolist() == [[0, 1]] and valid.all() and scores.tolist() == [[-1.0, -5.0]]


def test_top_k_signed_zero_scores_tie() -> None:
    items = _vecs([[-0.0], [0.0], [-0.0]])
    rows, scores, _ = top_k(_vecs([[1.0]]), items, _no_excl(1, 3), 3)
    assert rows.tolist() == [[0, 1, 2]] and (scores == 0).all()


def test_top_k_rejects_bad_k_and_mask() -> None:
    with pytest.raises(ValueError, match="k must be"):
        top_k(_vecs([[1]]), _vecs([[1]]), _no_excl(1, 1), 0)
    with pytest.raises(ValueError, match="mask has shape"):
        top_k(_vecs([[1]]), _vecs([[1]]), _no_excl(1, 2), 1)


# --- epsilon_greedy -----------------------------------------------------------------------


def _setup(n_users: int = 3, n_items: int = 30, k: int = 5, dim: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    users = rng.normal(size=(n_users, dim)).astype(np.float32)
    items = rng.normal(size=(n_items, dim)).astype(np.float32)
    available = np.ones(n_items, bool)
    available[[3, 7]] = False
    excluded = [rng.choice(n_items, size=4, replace=False) for _ in range(n_users)]
    mask = exclusion_mask(n_users, n_items, excluded, available)
    return users, items, mask, top_k(users, items, mask, k)


def _greedy(users, items, mask, top, epsilon: float, seeds: np.ndarray):
    """epsilon_greedy over a top_k result ``top`` = (rows, scores, valid)."""
    rows, scores, valid = top
    return epsilon_greedy(
        rows, scores, valid, mask, user_vecs=users, item_vecs=items, epsilon=epsilon, seeds=seeds
    )


def test_epsilon_zero_is_identity() -> None:
    users, items, mask, (rows, scores, valid) = _setup()
    r, s, e = _greedy(users, items, mask, (rows, scores, valid), 0.0, np.arange(3, dtype=np.uint64))
    assert np.array_equal(r, rows) and np.array_equal(s, scores) and not e.any()
    assert r is not rows


def test_epsilon_one_explores_everything_without_duplicates_or_excluded() -> None:
    users, items, mask, (rows, scores, valid) = _setup(n_users=4)
    r, s, e = _greedy(users, items, mask, (rows, scores, valid), 1.0, np.arange(4, dtype=np.uint64))
    assert e.all()
    full = users @ items.T
    for b in range(4):
        assert len(set(r[b].tolist())) == 5
        assert not mask[b, r[b]].any()
        assert not set(r[b].tolist()) & set(rows[b].tolist())  # replaced, not reshuffled
        np.testing.assert_allclose(s[b], full[b, r[b]], rtol=1e-5, atol=1e-5)


def test_epsilon_runs_out_of_candidates_keeps_exploit_items() -> None:
    items = _vecs([[float(i), 1.0] for i in range(4)])
    users = _vecs([[1, 0]])
    mask = _no_excl(1, 4)
    rows, scores, valid = top_k(users, items, mask, 3)
    r, _, e = _greedy(users, items, mask, (rows, scores, valid), 1.0, np.array([5], np.uint64))
    assert e.tolist() == [[True, False, False]] and r[0].tolist() == [0, 2, 1]


def test_epsilon_never_touches_invalid_slots() -> None:
    items = _vecs([[1, 0], [2, 0]])
    users = _vecs([[1, 0]])
    mask = exclusion_mask(1, 2, [np.array([0])], np.ones(2, bool))
    rows, scores, valid = top_k(users, items, mask, 3)
    r, _, e = _greedy(users, items, mask, (rows, scores, valid), 1.0, np.array([1], np.uint64))
    assert r.tolist() == [[1, -1, -1]] and not e.any()  # nothing left to explore


def test_same_seed_same_output_regardless_of_batch() -> None:
    users, items, mask, (rows, scores, valid) = _setup(n_users=5, n_items=50, k=6)
    seeds = np.array([11, 22, 33, 44, 55], np.uint64)
    kw = dict(item_vecs=items, epsilon=0.5)
    r_all, s_all, e_all = epsilon_greedy(
        rows, scores, valid, mask, user_vecs=users, seeds=seeds, **kw
    )
    sub = [3, 1]
    r_sub, s_sub, e_sub = epsilon_greedy(
        rows[sub], scores[sub], valid[sub], mask[sub], user_vecs=users[sub], seeds=seeds[sub], **kw
    )
    assert np.array_equal(r_all[sub], r_sub) and np.array_equal(e_all[sub], e_sub)
    np.testing.assert_allclose(s_all[sub], s_sub, rtol=1e-6)
    assert e_all.any() and not e_all.all()  # epsilon 0.5 really mixed both kinds
    exploit = ~e_all
    for b in range(5):  # exploit slots keep their item, position and score order
        assert np.array_equal(r_all[b][exploit[b]], rows[b][exploit[b]])


def test_epsilon_rejects_bad_input() -> None:
    users, items, mask, (rows, scores, valid) = _setup()
    with pytest.raises(ValueError, match="epsilon"):
        _greedy(users, items, mask, (rows, scores, valid), 1.5, np.arange(3, dtype=np.uint64))
    with pytest.raises(ValueError, match="seeds"):
        _greedy(users, items, mask, (rows, scores, valid), 0.1, np.arange(2, dtype=np.uint64))


# --- ids and seeds ------------------------------------------------------------------------


def test_rec_id_stable_and_sensitive() -> None:
    base = rec_id("u1", "e1", "v1")
    assert base == rec_id("u1", "e1", "v1") and len(base) == 32
    int(base, 16)
    others = {
        rec_id("u2", "e1", "v1"),
        rec_id("u1", "e2", "v1"),
        rec_id("u1", "e1", "v2"),
        rec_id("u1", None, "v1"),
        rec_id("u1", "", "v1"),
        rec_id("u1e", "1", "v1"),
    }
    assert base not in others and len(others) == 6


def test_rec_id_pinned_across_processes() -> None:
    # A literal, so any change to the encoding (which would break attribution) fails here.
    assert rec_id("u1", "e1", "v1") == "6e8d045c67c7e032f87f72fa94e6e344"
    assert seed_for("abc", 7) == 3613392208535341410
    enc = b"".join(b"\x01" + len(f).to_bytes(8, "big") + f for f in (b"rec", b"u1", b"e1", b"v1"))
    assert rec_id("u1", "e1", "v1") == hashlib.sha256(enc).hexdigest()[:32]


def test_seed_for_stable_64_bit_and_sensitive() -> None:
    s = seed_for("abc", 7)
    assert s == seed_for("abc", 7) and 0 <= s < 2**64
    assert s != seed_for("abc", 8) and s != seed_for("abd", 7)
    np.random.default_rng(np.array([s], np.uint64)[0])  # usable as a numpy seed


# --- explain ------------------------------------------------------------------------------

_TITLES = ["Toy Story (1995)", "Heat (1995)", "Babe (1995)", "Casino (1995)", "Jumanji (1995)"]
_IDS = ["i0", "i1", "i2", "i3", "i4"]
_CATS = [
    ("Animation", "Comedy"),
    ("Action", "Crime"),
    ("Comedy", "Drama"),
    ("Crime", "Drama"),
    ("Adventure", "Animation", "Comedy"),
]
_ITEMS = _vecs([[1, 0, 0], [0, 1, 0], [0.7, 0, 0.7], [0, 0.9, 0.1], [0.9, 0.1, 0]])


def _explain(recs: list, histories: list, explore: np.ndarray, items: np.ndarray = _ITEMS):
    """explain over the five-film catalog above."""
    return explain(np.array(recs), histories, items, _TITLES, _CATS, _IDS, explore)


def test_explain_picks_most_similar_history_item_and_shared_categories() -> None:
    reasons = _explain([[4, 3]], [np.array([1, -1, 0])], np.zeros((1, 2), bool))
    r4, r3 = reasons[0]
    assert r4["history_item_id"] == "i0" and r4["history_title"] == "Toy Story (1995)"
    assert r4["shared_categories"] == ["Animation", "Comedy"]
    centered = _ITEMS - _ITEMS.mean(axis=0)  # cosine of deviations from the catalog mean
    want = float(
        centered[4] @ centered[0] / np.linalg.norm(centered[4]) / np.linalg.norm(centered[0])
    )
    assert r4["similarity"] == pytest.approx(want, abs=1e-4)
    assert r4["text"] == (
        f'Because you interacted with "Toy Story (1995)" (similarity {want:.2f}); '
        "also Animation, Comedy"
    )
    assert r3["history_item_id"] == "i1" and r3["shared_categories"] == ["Crime"]


def test_explain_explore_slot_says_so_and_keeps_evidence() -> None:
    reasons = _explain([[2]], [np.array([0, 1])], np.ones((1, 1), bool))
    (r,) = reasons[0]
    assert r["text"].startswith("Exploring something new for you")
    assert r["history_item_id"] == "i0" and r["shared_categories"] == ["Comedy"]


def test_explain_empty_or_unknown_history_and_invalid_slots() -> None:
    reasons = _explain(
        [[0, -1], [1, 2]],
        [np.array([], np.int64), np.array([-1, -1])],
        np.array([[False, False], [True, False]]),
    )
    assert reasons[0][1] is None
    for r in (reasons[0][0], reasons[1][0], reasons[1][1]):
        assert "no history yet" in r["text"]
        assert r["history_item_id"] is None and r["similarity"] is None
        assert r["shared_categories"] == []
    assert reasons[1][0]["text"].startswith("Exploring")


def test_explain_prefers_other_items_over_itself_and_recent_on_ties() -> None:
    reasons = _explain([[0, 1]], [np.array([0, 4, 4, 1])], np.zeros((1, 2), bool))
    assert reasons[0][0]["history_item_id"] == "i4"  # not itself
    only_self = _explain([[1]], [np.array([1])], np.zeros((1, 1), bool))[0][0]
    assert only_self["history_item_id"] == "i1" and "before" in only_self["text"]
    assert only_self["similarity"] == pytest.approx(1.0)


def test_explain_zero_vector_does_not_crash() -> None:
    items = np.zeros((5, 3), np.float32)
    (r,) = _explain([[2]], [np.array([0])], np.zeros((1, 1), bool), items)[0]
    assert r["similarity"] == 0.0 and r["history_item_id"] == "i0"


# --- properties ---------------------------------------------------------------------------


@st.composite
def _batches(draw):
    b = draw(st.integers(1, 4))
    n = draw(st.integers(1, 25))
    d = draw(st.integers(1, 4))
    k = draw(st.integers(1, 8))
    # Small integer-valued vectors make exact ties common, which is what tie-breaking needs.
    elems = st.integers(-3, 3).map(float)
    if draw(st.booleans()):
        elems = st.floats(-10, 10, width=32)
    users = draw(hnp.arrays(np.float32, (b, d), elements=elems))
    items = draw(hnp.arrays(np.float32, (n, d), elements=elems))
    mask = draw(hnp.arrays(np.bool_, (b, n)))
    seeds = draw(hnp.arrays(np.uint64, (b,), elements=st.integers(0, 2**64 - 1)))
    eps = draw(st.sampled_from([0.0, 0.3, 1.0]))
    return users, items, mask, k, seeds, eps


@settings(max_examples=150, deadline=None)
@given(_batches())
def test_top_k_matches_brute_force_sort(batch) -> None:
    users, items, mask, k, _, _ = batch
    rows, scores, valid = top_k(users, items, mask, k)
    full = users @ items.T
    for b in range(users.shape[0]):
        allowed = np.flatnonzero(~mask[b])
        expected = sorted(allowed.tolist(), key=lambda r: (-full[b, r], r))[:k]
        n_ok = len(expected)
        assert rows[b, :n_ok].tolist() == expected
        assert valid[b].tolist() == [True] * n_ok + [False] * (k - n_ok)
        assert (rows[b, n_ok:] == -1).all()
        assert np.array_equal(scores[b, :n_ok], full[b, expected])


@settings(max_examples=150, deadline=None)
@given(_batches())
def test_exploration_invariants(batch) -> None:
    users, items, mask, k, seeds, eps = batch
    rows, scores, valid = top_k(users, items, mask, k)
    r, s, e = epsilon_greedy(
        rows, scores, valid, mask, user_vecs=users, item_vecs=items, epsilon=eps, seeds=seeds
    )
    for b in range(users.shape[0]):
        real = r[b][valid[b]]
        assert not mask[b, real].any()  # never a masked row
        assert len(set(real.tolist())) == real.size  # no duplicates
        assert not e[b][~valid[b]].any()
        exploit = valid[b] & ~e[b]
        assert np.all(np.diff(s[b][exploit]) <= 0)  # exploit slots stay sorted
        assert np.array_equal(r[b][exploit], rows[b][exploit])
        if eps == 0.0:
            assert not e[b].any()
    # Each user's list depends only on its own seed, whatever the batch around it.
    last = users.shape[0] - 1
    r1, _, e1 = epsilon_greedy(
        rows[last:],
        scores[last:],
        valid[last:],
        mask[last:],
        user_vecs=users[last:],
        item_vecs=items,
        epsilon=eps,
        seeds=seeds[last:],
    )
    assert np.array_equal(r1[0], r[last]) and np.array_equal(e1[0], e[last])


def _closest_one_user(recs: np.ndarray, history: np.ndarray, unit: np.ndarray):  # type: ignore[no-untyped-def]
    """The rule for one user, plainly: newest first, the item itself only as a last resort."""
    hist = history[history >= 0][::-1]
    out = []
    for r in recs.tolist():
        if r < 0 or hist.size == 0:
            out.append(None)
            continue
        sims = unit[hist] @ unit[r]
        ranked = np.where(hist == r, -2.0, sims)
        best = int(np.flatnonzero(ranked >= ranked.max() - 1e-6)[0])  # ties (to 1e-6): newest
        out.append((int(hist[best]), float(sims[best])))
    return out


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 6), st.integers(1, 5))
def test_batched_explain_matches_the_per_user_rule(seed, users, k) -> None:
    from pipeline.scoring import _unit

    rng = np.random.default_rng(seed)
    items = rng.standard_normal((8, 4)).astype(np.float32)
    items[5] = items[2]  # exact ties between different items
    recs = rng.integers(-1, 8, size=(users, k))
    histories = [rng.integers(-1, 8, size=int(rng.integers(0, 7))) for _ in range(users)]
    titles = [f"T{i}" for i in range(8)]
    cats = [(f"c{i % 3}",) for i in range(8)]
    ids = [f"i{i}" for i in range(8)]
    reasons = explain(recs, histories, items, titles, cats, ids, np.zeros_like(recs, dtype=bool))
    unit = _unit(items - items.mean(axis=0, keepdims=True))
    for b in range(users):
        want = _closest_one_user(recs[b], histories[b], unit)
        for j, expected in enumerate(want):
            got = reasons[b][j]
            if recs[b, j] < 0:
                assert got is None
            elif expected is None:
                assert got is not None and got["history_item_id"] is None
            else:
                assert got is not None and got["history_item_id"] == ids[expected[0]]
                assert abs(got["similarity"] - round(expected[1], 4)) < 1e-3


def test_equal_vectors_tie_by_recency_whatever_the_batch_layout() -> None:
    """A batched matmul can give two equal vectors cosines that differ in the last bit (it
    depends on the kernel path and memory alignment), which made the reason's history item
    depend on the batch; ties within 1e-6 now go to the newest item. Many small batches,
    allocations in between so alignment varies: 24 of 3,000 batches disagreed before."""
    from pipeline.scoring import _unit

    disagreements = 0
    for seed in range(1000):
        rng = np.random.default_rng(seed)
        users, k = int(rng.integers(1, 7)), int(rng.integers(1, 6))
        items = rng.standard_normal((8, 4)).astype(np.float32)
        items[5] = items[2]
        recs = rng.integers(-1, 8, size=(users, k))
        histories = [rng.integers(-1, 8, size=int(rng.integers(0, 7))) for _ in range(users)]
        _ = [np.zeros(int(rng.integers(1, 50)), dtype=np.float32) for _ in range(3)]
        reasons = explain(
            recs,
            histories,
            items,
            [f"T{i}" for i in range(8)],
            [("c",)] * 8,
            [f"i{i}" for i in range(8)],
            np.zeros_like(recs, dtype=bool),
        )
        unit = _unit(items - items.mean(axis=0, keepdims=True))
        for b in range(users):
            for j, want in enumerate(_closest_one_user(recs[b], histories[b], unit)):
                got = reasons[b][j]
                if want is not None and got["history_item_id"] != f"i{want[0]}":
                    disagreements += 1
    assert disagreements == 0
