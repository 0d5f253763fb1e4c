"""Workers started on an empty registry (what `streamrec up` does now before any bootstrap), on
the in-memory bus: nothing crashes, the updater keeps folding events into user state, the scorer
and fine-tune worker wait, and the first model announced later is picked up: every held user is
re-scored under it and recommended from its catalog."""

from __future__ import annotations

import logging

import orjson
import pytest

from pipeline.config import Config, FinetuneConfig, PathsConfig
from pipeline.memorybus import MemoryBus
from pipeline.registry import ModelRegistry
from tests.workers.test_finetune import Pipeline, _event
from workers.up import ensure_model

T = Config().topics


@pytest.mark.parametrize("score", [True, False], ids=["colocated", "separate"])
def test_workers_run_without_a_model_and_swap_to_the_first_one_published(
    tmp_path, encoder, registry, caplog, score
):
    empty_dir = tmp_path / "empty-models"
    p = Pipeline(
        MemoryBus(partitions=2),
        ModelRegistry(empty_dir),
        encoder,
        tmp_path,
        FinetuneConfig(every_events=20, every_seconds=1e6),
        score=score,
    )
    caplog.set_level(logging.WARNING)
    try:
        for worker in p.workers.values():
            assert worker.models.version is None
        for n in range(7):  # the user's catalog, which no model knows yet
            p.bus.produce(
                T.items,
                f"i{n}".encode(),
                orjson.dumps({"item_id": f"i{n}", "ts": 1_600_000_000_000, "title": f"Thing {n}"}),
            )
        for n in range(30):
            user = f"u{n % 3}"
            p.bus.produce(T.events, user.encode(), _event(n, user, f"i{n % 7}"))
        for _ in range(3):
            p.step()
        p.handlers["finetune"].wait_idle(30)
        p.step()
        # Events folded into state and answered with trending items, nothing dead-lettered.
        updater = p.handlers["updater"]
        assert sum(len(s) for s in updater.states.values()) == 3
        early = p.values(T.recommendations)
        assert {r["user_id"] for r in early} == {"u0", "u1", "u2"}
        assert all(r["model_version"] == "trending" for r in early)
        assert all(
            i["reason"]["source"] in ("trending", "explore") for r in early for i in r["items"]
        )
        assert any(r["items"] for r in early)
        assert p.values(T.dlq) == []
        # A fine-tune that came due had no model to start from: none started, it said so.
        assert ModelRegistry(empty_dir).current_version() is None
        assert p.handlers["finetune"].outcomes == []
        assert "no model to fine-tune yet" in caplog.text

        # The first model is published (as `streamrec bootstrap --announce` does) and announced.
        loaded = registry.load()
        first = ModelRegistry(empty_dir).publish(
            loaded.model,
            loaded.seq_config,
            loaded.item_ids,
            loaded.catalog_meta,
            {"ndcg@10": 0.1},
            None,
            30,
            text_vectors=loaded.text_vectors,
        )
        p.bus.produce(T.model_updates, None, orjson.dumps(first.to_dict()))
        for _ in range(3):
            p.step()
        for worker in p.workers.values():
            assert worker.models.version == first.version
        vectors = [v for v in p.values(T.user_vectors) if v["model_version"] != "trending"]
        assert sorted(v["user_id"] for v in vectors) == ["u0", "u1", "u2"]
        assert all(
            v["trigger"] == "model_swap" and v["model_version"] == first.version for v in vectors
        )
        recs = [r for r in p.values(T.recommendations) if r["model_version"] != "trending"]
        assert sorted(r["user_id"] for r in recs) == ["u0", "u1", "u2"]
        # The catalog is the items topic's plus the model's (titles and all).
        assert all(r["items"] for r in recs)
        assert all(i["item_id"] in loaded.item_ids for r in recs for i in r["items"])
        assert any(
            'Because you interacted with "Thing' in i["reason"]["text"]
            for r in recs
            for i in r["items"]
        )
    finally:
        p.close()


def test_up_without_a_model_or_a_dataset_trains_nothing_and_says_how(tmp_path, caplog):
    config = Config().replace(paths=PathsConfig(data_dir=str(tmp_path)))
    with caplog.at_level(logging.WARNING):
        assert ensure_model(config) is False
    assert "streamrec bootstrap --items" in caplog.text and "--from-topics" in caplog.text
    assert ModelRegistry(config.paths.models).current_version() is None
    assert not (tmp_path / "cache" / "ml-100k").exists()  # MovieLens was not even fetched
