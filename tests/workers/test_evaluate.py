"""`streamrec evaluate` end to end on a small synthetic dataset: one JSON object with the
protocol figures, the baselines, the cold-start section and the device (figures come from the
real command; this checks their shape and that they are sane, not their size)."""

from __future__ import annotations

import json

import pytest

import workers.evaluate as evaluate_module
from pipeline.config import Config, ModelConfig, PathsConfig, TrainingConfig
from pipeline.datasets import synthetic


def test_evaluate_prints_one_json_object_with_every_section(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(evaluate_module, "_load",
                        lambda config, dataset: synthetic(n_users=60, n_items=80, n_events=2400,
                                                          seed=1, drift_at=None))
    config = Config().replace(
        model=ModelConfig(hidden_size=16, num_layers=1, num_heads=1, max_length=12),
        training=TrainingConfig(epochs=2, batch_size=32, device="cpu", patience=1),
        paths=PathsConfig(data_dir=str(tmp_path)))
    report = evaluate_module.run(config, dataset="synthetic", seeds=(0, 1), as_json=True,
                                 verbose=False)
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(report))
    for key in ("hr@10", "ndcg@10", "mrr@10", "hr@20", "ndcg@20", "mrr@20"):
        assert 0.0 <= report[key] <= 1.0, key
        assert key in report["std"] and key in report["seen_removed"]
    assert [r["seed"] for r in report["per_seed"]] == [0, 1]
    assert all(r["repeat_bias"] is not None for r in report["per_seed"])
    assert report["protocol"]["users"] == 60
    baselines = report["baselines"]
    assert baselines["most_popular"]["ndcg@10"] >= 0
    assert [r["seed"] for r in baselines["no_text"]["per_seed"]] == [0, 1]
    assert [r["repeat_bias"] for r in baselines["no_repeat_bias"]["per_seed"]] == [None]
    cold = report["cold_start"]
    assert cold["items_held_out"] == 8 and cold["users"] >= 0
    assert report["device"].startswith("cpu")
    assert report["config"]["model"]["repeat_bias"] is True


def test_unknown_dataset_and_no_seeds_are_refused():
    with pytest.raises(ValueError, match="seeds"):
        evaluate_module.run(Config(), seeds=())
    with pytest.raises(ValueError, match="dataset"):
        evaluate_module._load(Config(), "nope")
