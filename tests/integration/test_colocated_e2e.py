"""Co-located scoring (updater.score) with the real updater and scorer against the real broker:
the scoring updater answers the same events exactly as updater + scorer do, a hot swap mid-stream
never mixes model versions, and `streamrec bench` measures both topologies."""

from __future__ import annotations

import shutil

import numpy as np
import orjson
import pytest

from pipeline.config import ScorerConfig, UpdaterConfig
from pipeline.encoder_cache import item_vectors
from pipeline.registry import ModelRegistry
from tests.integration.support import WorkerThreads, config_for, drain, event_value, producer_for
from tests.workers.conftest import publish_reweighted
from workers.updater import SPEC as UPDATER

pytestmark = pytest.mark.integration

SCORING = UpdaterConfig(metrics_port=0, score=True, group_id="streamrec-updater-colocated")


def _answered(bootstrap, topic, triggers):
    recs = drain(bootstrap, topic, lambda vs: triggers <= {v["trigger_event_id"] for v in vs})
    assert triggers <= {r["trigger_event_id"] for r in recs}, f"unanswered on {topic}"
    return recs


def test_colocated_answers_like_updater_plus_scorer(kafka_config, topic_factory, data_dir):
    """The same events, one per user and round (each its own micro-batch trigger), into both
    topologies at once: the same rec_id, items, ranks, explore flags and reasons."""
    separate_topics, colocated_topics = topic_factory(), topic_factory()
    scorer = ScorerConfig(metrics_port=0, epsilon=0.3, seed=5)
    separate = config_for(kafka_config, separate_topics, data_dir, scorer=scorer)
    colocated = config_for(kafka_config, colocated_topics, data_dir, scorer=scorer, updater=SCORING)
    bootstrap = kafka_config.bootstrap_servers
    users = [f"user-{u}" for u in range(6)]
    n = 0
    with WorkerThreads(separate), WorkerThreads(colocated, (UPDATER,)):
        producer = producer_for(bootstrap)
        for _round in range(3):
            triggers = set()
            for u in users:
                kind = "purchase" if (n % 4 == 1) else "click"
                value = orjson.loads(event_value(n, u, f"m{(n * 7) % 40}"))
                value["type"] = kind
                for topics in (separate_topics, colocated_topics):
                    producer.send(topics.events, key=u.encode(), value=orjson.dumps(value))
                triggers.add(f"ev-{n}")
                n += 1
            producer.flush()
            expected = _answered(bootstrap, separate_topics.recommendations, triggers)
            got = _answered(bootstrap, colocated_topics.recommendations, triggers)
        producer.close()
        vectors = drain(bootstrap, colocated_topics.user_vectors, lambda vs: len(vs) >= n)
    by_trigger = {r["trigger_event_id"]: r for r in expected}
    for rec in got:
        want = by_trigger[rec["trigger_event_id"]]
        assert rec["rec_id"] == want["rec_id"] and rec["model_version"] == want["model_version"]
        assert [(i["item_id"], i["rank"], i["explore"], i["reason"]) for i in rec["items"]] == [
            (i["item_id"], i["rank"], i["explore"], i["reason"]) for i in want["items"]
        ]
        np.testing.assert_allclose(
            [i["score"] for i in rec["items"]],
            [i["score"] for i in want["items"]],
            rtol=1e-5,
            atol=1e-5,
        )
    assert len({r["trigger_event_id"] for r in got}) == n
    assert any(i["explore"] for r in got for i in r["items"])
    # The user vectors stay available to other consumers, one per answered event.
    assert {v["trigger_event_id"] for v in vectors} == {r["trigger_event_id"] for r in got}


def test_a_hot_swap_mid_stream_never_mixes_versions(
    kafka_config, topic_factory, data_dir, tmp_path
):
    """A model with other weights is announced mid-stream: every recommendation's scores are its
    user's vector against the item table of the version it names (not the other's)."""
    shutil.copytree(data_dir, tmp_path, dirs_exist_ok=True)  # a registry of its own
    topics = topic_factory()
    config = config_for(
        kafka_config,
        topics,
        tmp_path,
        updater=SCORING,
        scorer=ScorerConfig(metrics_port=0, epsilon=0.0),
    )
    registry = ModelRegistry(tmp_path / "models")
    old = registry.load()
    bootstrap = kafka_config.bootstrap_servers
    n = 0
    with WorkerThreads(config, (UPDATER,)):
        producer = producer_for(bootstrap)
        for round_ in range(6):
            if round_ == 3:
                update = publish_reweighted(registry, old)
                producer.send(topics.model_updates, value=orjson.dumps(update.to_dict()))
            triggers = set()
            for u in range(10 if round_ < 3 else 5):  # user-5..9: re-scored by the swap only
                producer.send(
                    topics.events,
                    key=f"user-{u}".encode(),
                    value=event_value(n, f"user-{u}", f"m{(n * 11) % 40}"),
                )
                triggers.add(f"ev-{n}")
                n += 1
            producer.flush()
            _answered(bootstrap, topics.recommendations, triggers)
        producer.close()
        swapped = {f"user-{u}" for u in range(5, 10)}
        recs = drain(
            bootstrap,
            topics.recommendations,
            lambda vs: swapped <= {v["user_id"] for v in vs if v.get("trigger") == "model_swap"},
        )
        vectors = drain(bootstrap, topics.user_vectors, lambda vs: len(vs) >= len(recs))
    assert {r["model_version"] for r in recs} == {old.version, update.version}
    assert swapped <= {r["user_id"] for r in recs if r.get("trigger") == "model_swap"}
    tables = {}
    for version in (old.version, update.version):
        loaded = registry.load(version)
        catalog = loaded.catalog()
        tables[version] = (catalog, item_vectors(loaded, catalog), loaded.repeat_bias)
    by_key = {
        (v["user_id"], v["trigger_event_id"], v["trigger"], v["model_version"]): v for v in vectors
    }
    other = {old.version: update.version, update.version: old.version}
    for rec in recs:
        vec = by_key[
            (rec["user_id"], rec["trigger_event_id"], rec.get("trigger"), rec["model_version"])
        ]
        scores = [i["score"] for i in rec["items"]]

        def scored(version, rec=rec, vec=vec):
            catalog, items, bias = tables[version]
            rows = catalog.rows([i["item_id"] for i in rec["items"]])
            repeat = np.isin(rows, catalog.rows(vec["history"])) * np.float32(bias)
            return items[rows] @ np.asarray(vec["vector"], np.float32) + repeat

        np.testing.assert_allclose(scores, scored(rec["model_version"]), rtol=1e-4, atol=1e-4)
        assert not np.allclose(scores, scored(other[rec["model_version"]]), atol=1e-3)


def test_bench_measures_both_topologies(kafka_config, data_dir, tmp_path):
    """`streamrec bench --topology both` at a tiny scale: each topology's latency, saturation
    and stages, the co-located one without a scorer and with the updater's score stage."""
    from tests.integration.support import tiny_bench
    from workers.lab.bench import format_table

    result = tiny_bench(
        kafka_config,
        data_dir,
        tmp_path,
        saturation_events=200,
        modes=("offered", "saturation"),
        topologies=("separate", "colocated"),
    )
    assert result["config"]["topologies"] == ["separate", "colocated"]
    for name, workers in (("separate", {"updater", "scorer"}), ("colocated", {"updater"})):
        figures = result["topologies"][name]
        assert figures["offered"]["events"] == 200 and figures["offered"]["unanswered"] == 0
        assert set(figures["offered"]["consumer_lag_at_end"]) == workers
        assert figures["saturation"]["unanswered"] == 0
        assert set(figures["saturation"]["cpu_seconds_per_1000_events"]) == workers
    assert {"encode", "score", "produce"} <= set(
        result["topologies"]["colocated"]["stage_seconds"]["updater"]
    )
    table = format_table(result)
    assert "topology separate:" in table and "topology colocated:" in table
