"""Co-located scoring (updater.score) on the in-memory bus: the updater alone answers the same
events with the same recommendations as updater + scorer, and never mixes model versions."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from pipeline.config import Config, ConfigError, FinetuneConfig, ScorerConfig, UpdaterConfig
from pipeline.encoder_cache import item_vectors
from pipeline.scoring import rec_id
from tests.workers.conftest import NOW_MS, Harness, publish_reweighted
from tests.workers.conftest import TOPICS as T
from tests.workers.conftest import event as _event
from workers.up import workers_for

COLOCATED = UpdaterConfig(history_length=5, score=True)


@pytest.fixture
def pair(registry, encoder, tmp_path):
    """Two deployments fed the same records: updater + scorer, and the updater scoring."""
    from pipeline.memorybus import MemoryBus

    def make(scorer_cfg):
        separate, colocated = (
            Harness(MemoryBus(partitions=4), registry, encoder, tmp_path, tmp_path / name, **cfgs)
            for name, cfgs in (
                ("separate", {"scorer_cfg": scorer_cfg}),
                ("colocated", {"scorer_cfg": scorer_cfg, "updater_cfg": COLOCATED}),
            )
        )
        built.extend([separate, colocated])
        return separate, colocated

    built: list[Harness] = []
    yield make
    for h in built:
        h.close()


def _updater_alone(bus, registry, encoder, tmp_path, **updater_cfg):
    """The updater scoring alone (epsilon 0, state under tmp_path / "s"), with these settings."""
    return Harness(
        bus,
        registry,
        encoder,
        tmp_path,
        tmp_path / "s",
        scorer_cfg=ScorerConfig(epsilon=0.0),
        updater_cfg=UpdaterConfig(score=True, **updater_cfg),
    )


def _feed(harnesses, topic, key, value):
    for h in harnesses:
        h.bus.produce(topic, key, value)


def _without_scores(rec):
    return {**rec, "items": [{k: v for k, v in i.items() if k != "score"} for i in rec["items"]]}


@pytest.mark.parametrize(
    "scorer_cfg",
    [
        ScorerConfig(epsilon=0.3, seed=11),
        ScorerConfig(epsilon=0.0, exclude_interacted=True, top_k=5),
        ScorerConfig(epsilon=0.2, trending="only"),
    ],
    ids=["explore", "exclude-interacted", "trending-only"],
)
def test_colocated_recommendations_equal_updater_plus_scorer(pair, scorer_cfg):
    separate, colocated = pair(scorer_cfg)
    both = (separate, colocated)
    rng = np.random.default_rng(3)
    n = 0
    for round_ in range(4):
        if round_ == 2:  # a new item (trending blend weighs the model down) and a retirement
            _feed(
                both,
                T.items,
                b"new-1",
                orjson.dumps(
                    {
                        "item_id": "new-1",
                        "title": "Brand new",
                        "categories": ["Drama"],
                        "ts": NOW_MS,
                    }
                ),
            )
            _feed(
                both,
                T.items,
                b"i3",
                orjson.dumps({"item_id": "i3", "available": False, "ts": NOW_MS}),
            )
        for u in range(6):
            for _ in range(int(rng.integers(1, 3))):
                item = "new-1" if round_ == 3 and u == 0 else f"i{int(rng.integers(0, 30))}"
                kind = "purchase" if rng.random() < 0.3 else "click"
                _feed(both, T.events, f"u{u}".encode(), _event(n, f"u{u}", item, kind))
                n += 1
        for h in both:
            h.step()
    expected = {r["rec_id"]: r for r in separate.values(T.recommendations)}
    got = {r["rec_id"]: r for r in colocated.values(T.recommendations)}
    assert len(expected) == 24 and set(got) == set(expected)
    for key, want in expected.items():
        assert _without_scores(got[key]) == _without_scores(want)
        np.testing.assert_allclose(
            [i["score"] for i in got[key]["items"]],
            [i["score"] for i in want["items"]],
            rtol=1e-5,
            atol=1e-5,
        )
    # The user vectors are still published, to the same effect, for other consumers.
    vectors = colocated.values(T.user_vectors)
    assert len(vectors) == 24
    for v in vectors:
        assert rec_id(v["user_id"], v["trigger_event_id"], v["model_version"]) in got
    assert any(i["explore"] for r in got.values() for i in r["items"]) == (scorer_cfg.epsilon > 0)


def test_a_hot_swap_mid_stream_never_mixes_versions(registry, encoder, tmp_path):
    """Across a swap to a model with other weights, each recommendation's scores are its own
    vector against the item table of the version it names, never the other one."""
    from pipeline.memorybus import MemoryBus

    bus = MemoryBus(partitions=4)
    h = _updater_alone(bus, registry, encoder, tmp_path, history_length=5)
    old = registry.load()
    update = publish_reweighted(registry, old)
    n = 0
    for step in range(6):
        if step == 3:
            bus.produce(T.model_updates, None, orjson.dumps(update.to_dict()))
        for u in range(10 if step < 3 else 5):  # u5..u9 only re-scored by the swap
            bus.produce(T.events, f"u{u}".encode(), _event(n, f"u{u}", f"i{(n * 7) % 30}"))
            n += 1
        h.step()
    h.close()
    tables = {}
    for version in (old.version, update.version):
        loaded = registry.load(version)
        tables[version] = (item_vectors(loaded, loaded.catalog()), loaded.repeat_bias)
    vectors = {
        (v["user_id"], v["trigger_event_id"], v["trigger"], v["model_version"]): v
        for v in h.values(T.user_vectors)
    }
    recs = h.values(T.recommendations)
    assert {r["model_version"] for r in recs} == {old.version, update.version}
    assert {r["user_id"] for r in recs if r.get("trigger") == "model_swap"} >= {
        f"u{u}" for u in range(5, 10)
    }
    other = {old.version: update.version, update.version: old.version}
    for rec in recs:
        vec = vectors[
            (rec["user_id"], rec["trigger_event_id"], rec.get("trigger"), rec["model_version"])
        ]
        rows = [int(i["item_id"][1:]) for i in rec["items"]]
        scores = [i["score"] for i in rec["items"]]

        def scored(version, rows=rows, vec=vec):
            items, bias = tables[version]
            history = {int(x[1:]) for x in vec["history"]}
            return items[rows] @ np.asarray(vec["vector"], np.float32) + np.asarray(
                [bias if r in history else 0.0 for r in rows], np.float32
            )

        np.testing.assert_allclose(scores, scored(rec["model_version"]), rtol=1e-4, atol=1e-4)
        assert not np.allclose(scores, scored(other[rec["model_version"]]), atol=1e-3)


def test_the_user_vectors_can_be_left_out(registry, encoder, tmp_path):
    from pipeline.memorybus import MemoryBus

    bus = MemoryBus(partitions=4)
    h = _updater_alone(bus, registry, encoder, tmp_path, publish_vectors=False)
    bus.produce(T.events, b"u", _event(1, "u", "i1", "purchase"))
    h.step()
    h.close()
    (rec,) = h.values(T.recommendations)
    assert h.values(T.user_vectors) == [] and rec["trigger_event_id"] == "e1"
    assert "i1" not in [i["item_id"] for i in rec["items"]]


def test_without_the_scorer_nothing_would_answer_so_vectors_off_needs_score():
    with pytest.raises(ConfigError, match=r"updater\.publish_vectors"):
        UpdaterConfig(score=False, publish_vectors=False)


def test_up_runs_no_scorer_when_the_updater_scores_which_is_the_default():
    separate = UpdaterConfig(score=False)
    assert workers_for(Config()) == ("updater", "finetune")
    assert workers_for(Config(updater=separate)) == ("updater", "scorer", "finetune")
    assert workers_for(Config(updater=separate, finetune=FinetuneConfig(enabled=False))) == (
        "updater",
        "scorer",
    )


def test_a_scorer_beside_a_scoring_updater_refuses_to_start_naming_the_setting(
    registry, encoder, tmp_path
):
    """Both would answer every event: the scorer fails fast instead of doubling the output."""
    from pipeline.memorybus import MemoryBus
    from tests.handlers import MemoryWorker, memory_config
    from workers import scorer

    with pytest.raises(ConfigError, match=r"updater\.score.*STREAMREC_UPDATER_SCORE=false"):
        MemoryWorker(
            scorer.SPEC, memory_config(tmp_path), MemoryBus(1), registry=registry, encoder=encoder
        )


@pytest.mark.parametrize("stage", ["encode", "score"])
def test_a_user_that_cannot_be_encoded_or_scored_costs_only_its_own_recommendation(
    stage, registry, encoder, tmp_path, monkeypatch
):
    """The micro-batch's state is applied before encoding and scoring, so the updater isolates
    a failure of either itself: that user's trigger is dead-lettered (its events stay folded
    in), the others are answered."""
    from pipeline.memorybus import MemoryBus
    from pipeline.recommend import Recommender
    from workers.updater import UpdaterHandler

    owner, name = (UpdaterHandler, "_encode") if stage == "encode" else (Recommender, "recommend")
    real = getattr(owner, name)

    def failing(self, users, *rest):
        ids = [u[0] if isinstance(u, tuple) else u.user_id for u in users]  # (id, history)
        if "bad" in ids:
            raise RuntimeError(f"cannot {stage} bad")
        return real(self, users, *rest)

    monkeypatch.setattr(owner, name, failing)
    bus = MemoryBus(partitions=4)
    h = _updater_alone(bus, registry, encoder, tmp_path, history_length=5)
    for i, user in enumerate(["a", "bad", "b"]):
        bus.produce(T.events, user.encode(), _event(i, user, f"i{i}"))
    h.step()
    folded = {u for state in h.updater.states.values() for u in state.users()}
    h.close()
    assert folded == {"a", "b", "bad"}
    assert sorted(r["user_id"] for r in h.values(T.recommendations)) == ["a", "b"]
    (letter,) = h.values(T.dlq)
    assert letter["reason"] == "processing_error" and f"cannot {stage} bad" in letter["error"]
    vectors = sorted(v["user_id"] for v in h.values(T.user_vectors))
    assert vectors == (["a", "b"] if stage == "encode" else ["a", "b", "bad"])


def test_the_demo_reports_the_latency_of_the_worker_that_answers(capsys):
    from workers.lab import demo

    def page(worker):
        return "\n".join(
            f'streamrec_end_to_end_latency_seconds_bucket{{le="{le}",worker="{worker}"}} {n}'
            for le, n in (("0.025", 5.0), ("0.05", 10.0), ("+Inf", 10.0))
        )

    colocated = Config(updater=UpdaterConfig(score=True))
    demo._report(colocated, [], {}, [], 1.0, 2.0, {"updater": page("updater")})
    out = capsys.readouterr().out
    assert "(updater metric): p50 <= 25 ms, p99 <= 50 ms" in out
    assert "/metrics (updater);" in out and "scorer" not in out
    separate = Config(updater=UpdaterConfig(score=False))
    demo._report(separate, [], {}, [], 1.0, 2.0, {"updater": "", "scorer": page("scorer")})
    assert "(scorer metric): p50 <= 25 ms" in capsys.readouterr().out
