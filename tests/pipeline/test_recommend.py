"""pipeline/recommend.py: user vectors + an item table + the scoring settings -> Recommendations,
the function the scorer worker and the updater's co-located path share."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import ScorerConfig
from pipeline.items import Catalog
from pipeline.messages import Item, UserVector
from pipeline.recommend import ItemTable, excluded_rows, recommend
from pipeline.scoring import rec_id

GENRES = ("Action", "Comedy", "Drama")


@st.composite
def scenarios(draw):
    n_items = draw(st.integers(2, 24))
    dim = draw(st.integers(2, 5))
    catalog = Catalog(text_dim=dim)
    items = [
        Item(f"i{r}", 1, title=f"Film {r}", categories=(GENRES[r % 3],)) for r in range(n_items)
    ]
    catalog.upsert(items, np.eye(n_items, dim, dtype=np.float32))
    retired = draw(st.sets(st.integers(0, n_items - 1), max_size=n_items // 2))
    if retired:
        catalog.upsert(
            [Item(f"i{r}", 2, available=False) for r in sorted(retired)],
            np.zeros((len(retired), dim), dtype=np.float32),
        )
    # Small integers: every dot product is exact, so a batch's float rounding cannot reorder.
    item_vecs = np.asarray(
        draw(
            st.lists(
                st.lists(st.integers(-3, 3), min_size=dim, max_size=dim),
                min_size=n_items,
                max_size=n_items,
            )
        ),
        np.float32,
    )
    n_users = draw(st.integers(1, 5))
    users, vecs = [], []
    for b in range(n_users):
        history = draw(
            st.lists(st.sampled_from([f"i{r}" for r in range(n_items)] + ["unknown"]), max_size=6)
        )
        types = draw(
            st.lists(
                st.sampled_from(["click", "purchase"]), min_size=len(history), max_size=len(history)
            )
        )
        trigger = draw(st.sampled_from([f"e{b}", None]))
        users.append(
            UserVector(
                user_id=f"u{b}",
                model_version="v1",
                vector=(),
                history=tuple(history),
                event_ts=1,
                updated_at=1,
                history_types=tuple(types),
                trigger_event_id=trigger,
                trigger=None if trigger else "model_swap",
            )
        )
        vecs.append(draw(st.lists(st.integers(-3, 3), min_size=dim, max_size=dim)))
    cfg = ScorerConfig(
        top_k=draw(st.integers(1, 8)),
        epsilon=draw(st.sampled_from([0.0, 0.3, 1.0])),
        exclude_interacted=draw(st.booleans()),
        seed=draw(st.integers(0, 99)),
        trending=draw(st.sampled_from(["off", "blend", "only"])),
    )
    no_model = draw(st.booleans())
    trained = np.asarray(draw(st.lists(st.booleans(), min_size=n_items, max_size=n_items)))
    trend = (
        np.asarray(
            draw(st.lists(st.integers(0, 4), min_size=n_items, max_size=n_items)), np.float32
        )
        / 4
    )
    table = ItemTable(
        version="v1",
        catalog=catalog,
        item_vecs=item_vecs,
        repeat_bias=None if no_model else 0.5,
        trained=trained,
        trend=trend,
    )
    return users, np.asarray(vecs, np.float32), table, cfg


@settings(max_examples=80, deadline=None)
@given(scenarios())
def test_every_recommendation_keeps_the_contract(scenario):
    users, vecs, table, cfg = scenario
    catalog = table.catalog
    recs = recommend(users, vecs, table, cfg=cfg, now_ms=123)
    assert len(recs) == len(users)
    for b, (user, rec) in enumerate(zip(users, recs)):
        assert rec.rec_id == rec_id(user.user_id, user.trigger_event_id or user.trigger, "v1")
        assert (rec.user_id, rec.model_version, rec.generated_at) == (user.user_id, "v1", 123)
        assert (rec.trigger_event_id, rec.trigger) == (user.trigger_event_id, user.trigger)
        ids = [i.item_id for i in rec.items]
        purchased = {h for h, t in zip(user.history, user.history_types) if t == "purchase"}
        banned = set(user.history) if cfg.exclude_interacted else purchased
        allowed = {i for r, i in enumerate(catalog.ids) if catalog.available[r]} - banned
        assert len(ids) == len(set(ids)) == min(cfg.top_k, len(allowed))
        assert set(ids) <= allowed
        assert [i.rank for i in rec.items] == list(range(1, len(ids) + 1))
        known = [h for h in user.history if h != "unknown"]
        for item in rec.items:
            assert item.reason["text"]
            assert item.reason["source"] in ("model", "trending", "explore")
            assert item.explore == (item.reason["source"] == "explore")
            if known:
                assert item.reason["history_item_id"] in known
        if table.repeat_bias is not None and cfg.trending == "off":  # model scores, exact
            for item in rec.items:
                row = catalog.row(item.item_id)
                bias = 0.5 if item.item_id in user.history and not item.explore else 0.0
                assert item.score == float(
                    np.float32(table.item_vecs[row] @ vecs[b]) + np.float32(bias)
                )
        if cfg.epsilon == 0.0:
            assert not any(i.explore for i in rec.items)


@settings(max_examples=60, deadline=None)
@given(scenarios())
def test_a_users_list_does_not_depend_on_its_batch_mates(scenario):
    """What lets the co-located path (the updater's micro-batch) and the scorer (its own
    micro-batch of user vectors) answer the same event with the same list."""
    users, vecs, table, cfg = scenario
    together = recommend(users, vecs, table, cfg=cfg, now_ms=5)
    for b, user in enumerate(users):
        (alone,) = recommend([user], vecs[b : b + 1], table, cfg=cfg, now_ms=5)
        assert alone == together[b]


def test_excluded_rows_are_the_purchases_or_the_whole_history():
    rows = np.asarray([4, 7, -1, 9])
    types = ("click", "purchase", "purchase", "view")
    assert excluded_rows(rows, types, exclude_interacted=False).tolist() == [7, -1]
    assert excluded_rows(rows, types, exclude_interacted=True).tolist() == [4, 7, -1, 9]
    assert excluded_rows(rows, (), exclude_interacted=False).tolist() == []


def test_no_users_no_recommendations():
    table = ItemTable(
        version="v1",
        catalog=Catalog(text_dim=2),
        item_vecs=np.zeros((0, 2)),
        repeat_bias=0.0,
        trained=np.zeros(0, bool),
        trend=np.zeros(0),
    )
    assert recommend([], np.zeros((0, 2)), table, cfg=ScorerConfig(), now_ms=0) == []
