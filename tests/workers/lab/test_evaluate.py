"""`streamrec evaluate` end to end on a small synthetic dataset: one JSON object with both models
(streamrec's and the SASRec baseline) under both protocols, most popular, the cold-start
section and the device (figures come from the
real command; this checks their shape and that they are sane, not their size)."""

from __future__ import annotations

import json

import pytest

import workers.lab.evaluate as evaluate_module
from pipeline.baselines import SASRecBaseline
from pipeline.config import Config, ModelConfig, PathsConfig, TrainingConfig
from pipeline.datasets import synthetic


def _tiny(monkeypatch, tmp_path, data, hidden, max_length, epochs):
    """Make `_load` give the synthetic dataset of `data` (no drift); the config and the SASRec
    baseline of one layer and head, `hidden` wide, trained `epochs` epochs on the CPU."""
    monkeypatch.setattr(
        evaluate_module, "_load", lambda config, dataset: synthetic(**data, drift_at=None)
    )
    config = Config().replace(
        model=ModelConfig(hidden_size=hidden, num_layers=1, num_heads=1, max_length=max_length),
        training=TrainingConfig(epochs=epochs, batch_size=32, device="cpu", patience=1),
        paths=PathsConfig(data_dir=str(tmp_path)),
    )
    size = {"hidden_size": hidden, "inner_size": 2 * hidden, "max_length": max_length}
    return config, SASRecBaseline(**size, num_layers=1, num_heads=1, epochs=epochs, patience=1)


def test_evaluate_reports_both_models_under_both_protocols(tmp_path, monkeypatch, capsys):
    data = {"n_users": 60, "n_items": 80, "n_events": 2400, "seed": 1}
    config, sasrec = _tiny(monkeypatch, tmp_path, data, hidden=16, max_length=12, epochs=2)
    report = evaluate_module.run(
        config, dataset="synthetic", seeds=(0, 1), as_json=True, sasrec=sasrec, verbose=False
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(report))
    assert set(report["models"]) == {"streamrec", "sasrec"}
    for name, model in report["models"].items():
        for protocol in ("masked", "unmasked"):
            for key in ("hr@10", "ndcg@10", "mrr@10", "hr@20", "ndcg@20", "mrr@20"):
                assert 0.0 <= model[protocol][key] <= 1.0, (name, protocol, key)
                assert key in model[protocol]["std"]
            # Masking the history can only lift the target.
            assert model["masked"]["hr@20"] >= model["unmasked"]["hr@20"]
        assert [r["seed"] for r in model["per_seed"]] == [0, 1]
        for run in model["per_seed"]:
            assert set(run["valid_ndcg@10"]) == {"masked", "unmasked"}
            assert run["masked"]["ndcg@10"] >= 0 and run["unmasked"]["ndcg@10"] >= 0
    assert all(r["repeat_bias"] is not None for r in report["models"]["streamrec"]["per_seed"])
    assert all(r["repeat_bias"] is None for r in report["models"]["sasrec"]["per_seed"])
    assert report["protocol"]["users"] == 60
    assert report["protocol"]["selection"] == "valid ndcg@10, masked"
    popular = report["baselines"]["most_popular"]
    assert popular["masked"]["ndcg@10"] >= popular["unmasked"]["ndcg@10"] >= 0
    assert set(report["comparison"]) == {"masked", "unmasked"}
    cold = report["cold_start"]
    assert cold["items_held_out"] == 8 and cold["users"] >= 0
    assert report["device"].startswith("cpu")
    assert report["config"]["model"]["repeat_bias"] is True
    assert report["config"]["sasrec"]["epochs"] == 2


def test_unknown_dataset_and_no_seeds_are_refused():
    with pytest.raises(ValueError, match="seeds"):
        evaluate_module.run(Config(), seeds=())
    with pytest.raises(ValueError, match="dataset"):
        evaluate_module._load(Config(), "nope")


def test_jobs_run_fits_in_processes_with_the_same_figures(tmp_path, monkeypatch):
    data = {"n_users": 40, "n_items": 50, "n_events": 1200, "seed": 2}
    config, sasrec = _tiny(monkeypatch, tmp_path, data, hidden=8, max_length=8, epochs=1)
    kwargs = dict(
        dataset="synthetic", seeds=(0,), sasrec=sasrec, cold_start=False, verbose=False, threads=1
    )
    one = evaluate_module.run(config, jobs=1, **kwargs)
    two = evaluate_module.run(config, jobs=2, **kwargs)
    for name in ("streamrec", "sasrec"):
        for protocol in ("masked", "unmasked"):
            assert two["models"][name][protocol]["ndcg@10"] == pytest.approx(
                one["models"][name][protocol]["ndcg@10"]
            )
    with pytest.raises(ValueError, match="jobs"):
        evaluate_module.run(config, jobs=0, **kwargs)
