"""The scorer on a catalog its model never saw: trending items carry the ranking, and each slot
says which source ranked it; on the catalog it was trained on, the model alone ranks."""

from __future__ import annotations

import orjson

from pipeline.config import ScorerConfig
from tests.workers.conftest import NOW_MS
from tests.workers.conftest import TOPICS as T
from tests.workers.conftest import event as _event


def _new_item(n: int) -> bytes:
    return orjson.dumps(
        {"item_id": f"n{n}", "ts": NOW_MS - 50_000, "title": f"Novel {n}", "categories": ["New"]}
    )


def test_a_new_users_recommendations_come_from_trending_items_the_model_never_saw(
    make_harness, bus
):
    harness = make_harness(bus, scorer_cfg=ScorerConfig(epsilon=0.0))
    for n in range(20):
        bus.produce(T.items, f"n{n}".encode(), _new_item(n))
    i = 0
    for popular, times in (("n3", 12), ("n7", 6), ("n11", 3)):
        for _ in range(times):
            user = f"crowd{i}"
            bus.produce(T.events, user.encode(), _event(i, user, popular))
            i += 1
    harness.step()
    bus.produce(T.events, b"newbie", _event(1000, "newbie", "n5"))
    harness.step()
    (rec,) = [r for r in harness.values(T.recommendations) if r["user_id"] == "newbie"]
    ranked = [(item["item_id"], item["reason"]["source"]) for item in rec["items"]]
    assert ranked[:3] == [("n3", "trending"), ("n7", "trending"), ("n11", "trending")]
    assert rec["items"][0]["reason"]["text"].startswith("Trending now")


def test_a_model_that_knows_the_catalog_ranks_alone(make_harness, bus):
    harness = make_harness(bus, scorer_cfg=ScorerConfig(epsilon=0.0))
    for i, item in enumerate(["i1", "i2", "i3", "i1", "i1"]):
        bus.produce(T.events, f"u{i}".encode(), _event(i, f"u{i}", item))
    harness.step()
    recs = harness.values(T.recommendations)
    assert recs and all(item["reason"]["source"] == "model" for r in recs for item in r["items"])


def test_trending_only_serves_popularity_whatever_the_model_knows_minus_the_exclusions(
    make_harness, bus
):
    harness = make_harness(
        bus, scorer_cfg=ScorerConfig(epsilon=0.0, trending="only", exclude_interacted=True)
    )
    i = 0
    for popular, times in (("i3", 9), ("i7", 5), ("i1", 2)):  # items the model was trained on
        for _ in range(times):
            user = f"crowd{i}"
            bus.produce(T.events, user.encode(), _event(i, user, popular))
            i += 1
    harness.step()
    bus.produce(T.events, b"fan", _event(1000, "fan", "i3"))  # i3: interacted, so excluded
    harness.step()
    (rec,) = [r for r in harness.values(T.recommendations) if r["user_id"] == "fan"]
    ranked = [(item["item_id"], item["reason"]["source"]) for item in rec["items"]]
    assert ranked[:2] == [("i7", "trending"), ("i1", "trending")]
    assert all(source == "trending" for _, source in ranked)
    assert "i3" not in [item for item, _ in ranked]


def test_trending_off_ranks_by_the_model_alone_on_a_catalog_it_never_saw(make_harness, bus):
    harness = make_harness(bus, scorer_cfg=ScorerConfig(epsilon=0.0, trending="off"))
    for n in range(20):
        bus.produce(T.items, f"n{n}".encode(), _new_item(n))
    for i in range(12):
        bus.produce(T.events, f"crowd{i}".encode(), _event(i, f"crowd{i}", "n3"))
    harness.step()
    bus.produce(T.events, b"newbie", _event(1000, "newbie", "n5"))
    harness.step()
    (rec,) = [r for r in harness.values(T.recommendations) if r["user_id"] == "newbie"]
    assert all(item["reason"]["source"] == "model" for item in rec["items"])
