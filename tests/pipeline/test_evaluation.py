"""The RecBole-protocol split, baselines, beyond-accuracy metrics and the cold-start split."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import evaluation
from pipeline.datasets import Dataset, load_movielens_100k
from pipeline.messages import Event, Item
from pipeline.model import SeqRecConfig, SeqRecModel

_DIGEST = "c6a90f98baeeac14f5274db8818f6c0858f97816d7b8bc20002f695b837c47e9"


def _dataset(rows: list[tuple[str, str, int]]) -> Dataset:
    """(user, item, ts seconds) in file order; events sorted stably by ts like the loader does."""
    events = [
        Event(event_id=f"e{n}", user_id=u, item_id=i, type="rating", ts=ts * 1000, value=4.0)
        for n, (u, i, ts) in enumerate(rows)
    ]
    events.sort(key=lambda e: e.ts)  # stable: ties keep file order
    items = tuple(Item(item_id=i, ts=0, title=f"Movie {i}") for i in ("a", "b", "c", "d", "e"))
    return Dataset("tiny", tuple(events), items)


def test_split_sorts_stably_and_holds_out_the_last_two() -> None:
    # User 2 rates c, a, b at the same second (file order must win), then d later; user 1's
    # lines arrive out of time order.
    ds = _dataset(
        [
            ("2", "c", 5),
            ("1", "e", 9),
            ("2", "a", 5),
            ("1", "a", 1),
            ("2", "b", 5),
            ("1", "b", 3),
            ("2", "d", 7),
            ("10", "a", 1),
            ("1", "c", 2),
        ]
    )
    ps = evaluation.protocol_split(ds)
    assert ps.item_ids == ("a", "b", "c", "d", "e") and ps.num_items == 5
    names = {t.user_id: [ps.item_ids[r - 1] for r in t.items] for t in ps.split.test}
    assert names == {"1": ["a", "c", "b", "e"], "2": ["c", "a", "b", "d"]}
    assert [t.user_id for t in ps.split.test] == ["1", "2"]  # numeric user order; "10" too short
    train = {s.user_id: [ps.item_ids[r - 1] for r in s.items] for s in ps.split.train}
    assert train == {"1": ["a", "c"], "2": ["c", "a"], "10": ["a"]}
    assert [ps.item_ids[v.items[-1] - 1] for v in ps.split.valid] == ["b", "b"]


def test_ranking_metrics_and_random_expectation() -> None:
    m = evaluation.ranking_metrics(np.array([1, 3, 11]), (10,))
    assert m["hr@10"] == pytest.approx(2 / 3)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / np.log2(4)) / 3)
    assert m["mrr@10"] == pytest.approx((1 + 1 / 3) / 3)
    r = evaluation.random_ranking_metrics(100, (10,))
    assert r["hr@10"] == pytest.approx(0.1)
    assert r["mrr@10"] == pytest.approx(sum(1 / k for k in range(1, 11)) / 100)


def test_most_popular_with_and_without_seen_items() -> None:
    # Users 1, 2, 3 rate these items at seconds 1, 2, 3, 4.
    walks = {"1": "abcd", "2": "abce", "3": "aebc"}
    ds = _dataset([(u, i, ts) for u, walk in walks.items() for ts, i in enumerate(walk, 1)])
    ps = evaluation.protocol_split(ds)
    counts = evaluation.item_counts(ps.split.train, ps.num_items)
    assert counts.tolist() == [0, 3, 2, 0, 0, 1]  # row 0 unknown, a=3, b=2, e=1
    ranks = evaluation.most_popular_ranks(
        ps.split.train, ps.split.test, ps.num_items, exclude_seen=False
    )
    # Order a, b, e, then c before d (equal counts: the lower row first, as a stable top-k).
    assert ranks.tolist() == [5, 3, 4]
    removed = evaluation.most_popular_ranks(
        ps.split.train, ps.split.test, ps.num_items, exclude_seen=True
    )
    # Users 1 and 2 saw a, b, c: e then d remain. User 3 saw a, e, b: c then d remain.
    assert removed.tolist() == [2, 1, 1]


def test_ranks_count_ties_against_the_target_and_respect_exclusion() -> None:
    scores = np.array([[0.5, 0.9, 0.5, 0.1], [0.2, 0.1, 0.3, 0.4]])
    assert evaluation.ranks_from_scores(scores, np.array([0, 3])).tolist() == [3, 1]
    mask = evaluation.seen_mask([np.array([2]), np.array([0])], 4)  # rows → columns 1 and (none)
    assert mask.tolist() == [[False, True, False, False], [False] * 4]
    assert evaluation.ranks_from_scores(scores, np.array([0, 3]), mask).tolist() == [2, 1]


def test_coverage_and_popularity_of_top_lists() -> None:
    scores = np.array([[0.1, 0.9, 0.8, 0.0], [0.9, 0.1, 0.8, 0.0]])
    top = evaluation.top_k_rows(scores, 2)
    assert top.tolist() == [[1, 2], [0, 2]]
    assert evaluation.coverage_at_k(top, 4) == pytest.approx(0.75)
    assert evaluation.average_popularity(top, np.array([10, 20, 30, 40])) == pytest.approx(22.5)
    excluded = evaluation.top_k_rows(scores, 2, np.array([[False, True, False, False]] * 2))
    assert excluded.tolist() == [[2, 0], [0, 2]]


def test_cold_start_split_removes_cold_items_from_training() -> None:
    rng = np.random.default_rng(0)
    rows = [
        (str(u), str(i), t)
        for u in range(30)
        for t, i in enumerate(rng.choice(40, size=12, replace=False))
    ]
    ds = Dataset(
        "cold",
        tuple(
            Event(event_id=f"e{n}", user_id=u, item_id=i, type="rating", ts=t * 1000)
            for n, (u, i, t) in enumerate(rows)
        ),
        tuple(Item(item_id=str(i), ts=0, title=f"m{i}") for i in range(40)),
    )
    ps = evaluation.protocol_split(ds)
    cold = evaluation.cold_start_split(ps.split, ps.num_items, fraction=0.1, seed=3)
    assert len(cold.cold_rows) == 4 and len(cold.warm_rows) == 36
    assert set(cold.cold_rows) | set(cold.warm_rows) == set(range(1, 41))
    for s in cold.train + cold.valid + cold.test_histories:
        assert s.items.max() <= 36 and s.items.min() >= 1  # warm model rows only
    assert all(t in set(cold.cold_rows) for t in cold.test_targets)
    expected = sum(1 for t in ps.split.test if t.items[-1] in set(cold.cold_rows))
    assert len(cold.test_targets) == expected > 0
    assert (
        evaluation.cold_start_split(ps.split, ps.num_items, seed=3).cold_rows.tolist()
        == cold.cold_rows.tolist()
    )
    with pytest.raises(ValueError, match="fraction"):
        evaluation.cold_start_split(ps.split, ps.num_items, fraction=1.0)


def test_score_histories_matches_candidates() -> None:
    torch.manual_seed(0)
    model = SeqRecModel(
        SeqRecConfig(num_items=6, hidden_size=16, num_heads=2, text_dim=8, max_length=4)
    )
    text = torch.randn(6, 8)
    ds = _dataset([("1", "a", 1), ("1", "b", 2), ("1", "c", 3)])
    hist = evaluation.protocol_split(ds).split.test
    scores = evaluation.score_histories(model, hist, text)
    assert scores.shape == (1, 6)
    unknown = evaluation.score_histories(
        model, hist, text, candidate_rows=torch.zeros(6, dtype=torch.long), candidate_text=text
    )
    assert unknown.shape == (1, 6) and not np.allclose(unknown, scores)


@pytest.fixture(scope="module")
def movielens(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    return load_movielens_100k(tmp_path_factory.mktemp("cache"))


def test_movielens_split_matches_design(movielens: Dataset) -> None:
    ps = evaluation.protocol_split(movielens)
    assert len(ps.split.test) == len(ps.split.valid) == 943 and ps.num_items == 1682
    assert sum(len(s) for s in ps.split.train) == 98_114
    assert evaluation.split_digest(ps) == _DIGEST
    pop = evaluation.ranking_metrics(
        evaluation.most_popular_ranks(
            ps.split.train, ps.split.test, ps.num_items, exclude_seen=False
        ),
        (10,),
    )
    assert pop["hr@10"] == pytest.approx(0.0498, abs=5e-4)  # RecBole's Pop: 0.0498
