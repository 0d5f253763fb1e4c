"""`streamrec experiment coldstart` end to end at a tiny scale, on the real broker and workers:
bootstrap on the first era, then the three arms on only the second era's unseen catalog."""

from __future__ import annotations

import orjson
import pytest

from pipeline.config import FinetuneConfig, ScorerConfig, TrainingConfig
from tests.integration.support import config_for
from workers.lab.coldstart import ARMS
from workers.lab.coldstart import run as coldstart
from workers.lab.experiment import chunk_bounds

pytestmark = pytest.mark.integration


def test_chunks_start_with_the_first_fine_tune_then_repeat_the_last_size():
    assert chunk_bounds(1200, [100, 500]) == [(0, 100), (100, 600), (600, 1100), (1100, 1200)]
    assert chunk_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert chunk_bounds(0, [5]) == []


def test_coldstart_runs_three_arms_on_the_same_unseen_catalog(
    kafka_config, topic_factory, tmp_path, capsys
):
    config = config_for(
        kafka_config,
        topic_factory(partitions=2, create=False),
        tmp_path,
        scorer=ScorerConfig(metrics_port=0),
        finetune=FinetuneConfig(metrics_port=0, every_events=100, first_after_events=30, epochs=1),
        training=TrainingConfig(device="cpu", epochs=2, batch_size=32),
    )
    result = coldstart(config, as_json=True, n_users=12, n_items=20, n_events=240, first_events=100)
    printed = orjson.loads(capsys.readouterr().out)
    assert printed["arms"].keys() == set(ARMS) and printed["replayed_events"] == 240
    assert result["replayed_items"] <= 20 and result["bootstrap_events"] == 240
    arms = result["arms"]
    for arm in ARMS:
        a = arms[arm]
        assert a["judged"] > 0 and 0 <= a["ndcg@10"] <= a["hr@10"] <= 1
        assert 0 < a["before_first_finetune"]["judged"] <= a["first"]["judged"] <= a["judged"]
    # Fine-tune boundaries: 30, then every 100 (30, 130, 230) for the fallback; 100, 200 for
    # the baseline; none for popularity, every slot of which is trending or explore.
    assert len(arms["fallback"]["runs"]) == 3 and len(arms["baseline"]["runs"]) == 2
    assert arms["popularity"]["runs"] == [] and "model" not in arms["popularity"]["slot_sources"]
    assert "trending" not in arms["baseline"]["slot_sources"]
    # Only the second era's items are served: the first era's are retired.
    assert all(a["share_with_new_items"] == 1.0 for a in arms.values())
    same = result["same_events"]
    assert same["all"]["judged"] > 0 and set(ARMS) <= same["all"].keys()
    assert (
        same["before_first_finetune"]["judged"]
        == arms["fallback"]["before_first_finetune"]["judged"]
    )
