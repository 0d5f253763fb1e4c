"""`streamrec evaluate`: RecBole 1.2.1's sequential protocol on a dataset, with baselines.

A thin shell: dataset → protocol split (pipeline.evaluation) → per seed, fit with early stopping
on validation NDCG@10 (seen items kept, as RecBole does) → test figures with and without seen
items → most-popular and no-text baselines → cold-start run → one dict (printed as JSON or
as a short table). Publishes nothing and touches no broker.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from pipeline.config import Config
from pipeline.datasets import Dataset, load_movielens_100k, synthetic
from pipeline.evaluation import (ProtocolSplit, average_popularity, cold_start_split,
                                 coverage_at_k, item_counts, most_popular_ranks,
                                 protocol_split, random_ranking_metrics, ranking_metrics,
                                 ranks_from_scores, score_histories, seen_mask, split_digest,
                                 top_k_rows)
from pipeline.items import TextEncoder, encode_items
from pipeline.model import SeqRecConfig, SeqRecModel
from pipeline.training import FitProgress, UserSequence, fit, resolve_device

__all__ = ["run"]

_KS = (10, 20)
_HEADLINE = ("hr@10", "ndcg@10", "mrr@10", "hr@20", "ndcg@20", "mrr@20")


def _load(config: Config, dataset: str) -> Dataset:
    if dataset == "ml-100k":
        return load_movielens_100k(config.paths.cache)
    if dataset == "synthetic":
        return synthetic(n_users=1000, n_items=2000, n_events=100_000, seed=0)
    raise ValueError(f"dataset={dataset!r} is not ml-100k or synthetic")


def _mean_std(runs: Sequence[dict[str, float]], keys: Sequence[str]) -> dict[str, Any]:
    """{key: mean} plus {"std": {key: sample std}} over runs (std 0 for a single run)."""
    out: dict[str, Any] = {}
    std: dict[str, float] = {}
    for key in keys:
        values = np.array([r[key] for r in runs], dtype=np.float64)
        out[key] = float(values.mean())
        std[key] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    out["std"] = std
    return out


def _train(config: Config, train: Sequence[UserSequence], valid: Sequence[UserSequence],
           item_text: torch.Tensor, *, seed: int, variant: dict[str, Any], patience: int | None,
           log: Callable[[str], None]
           ) -> tuple[SeqRecModel, dict[str, Any]]:
    """One fit with early stopping on validation NDCG@10 (seen items kept in the ranking)."""
    model_cfg = dataclasses.replace(config.model, **variant)
    label = ",".join(f"{k}={v}" for k, v in variant.items()) or "as configured"
    seq_config = SeqRecConfig.from_model_config(model_cfg, num_items=item_text.shape[0])
    training = dataclasses.replace(config.training, seed=seed)
    torch.manual_seed(seed)
    model = SeqRecModel(seq_config)

    def on_epoch(p: FitProgress) -> None:
        if p.kind == "epoch" and p.metrics:
            log(f"  seed {seed} {label} epoch {p.epoch + 1}: "
                f"loss {p.loss:.3f} valid ndcg@10 {p.metrics['ndcg@10']:.4f}")

    result = fit(model, train, item_text, training, valid_sequences=valid, patience=patience,
                 exclude_seen=False, callbacks=[on_epoch])
    epochs = len(result.history)
    info = {"seed": seed, "best_epoch": result.best_epoch + 1, "epochs_run": epochs,
            "valid_ndcg@10": (result.best_metrics or {}).get("ndcg@10", float("nan")),
            "repeat_bias": (None if model.repeat_bias is None
                            else float(model.repeat_bias.detach())),
            "train_seconds": result.seconds, "epoch_seconds": result.seconds / max(epochs, 1)}
    return model, info


def _test_figures(model: SeqRecModel, split: ProtocolSplit, item_text: torch.Tensor,
                  train_counts: np.ndarray) -> dict[str, Any]:
    """Headline (seen kept) and seen-removed figures, with coverage and popularity of top 10."""
    test = split.split.test
    inputs = [UserSequence(s.user_id, s.items[:-1], s.types[:-1]) for s in test]
    scores = score_histories(model, inputs, item_text)  # (B, N)
    targets = np.array([int(s.items[-1]) - 1 for s in test])
    seen = seen_mask([s.items[:-1] for s in test], split.num_items)  # (B, N)
    out: dict[str, Any] = ranking_metrics(ranks_from_scores(scores, targets), _KS)
    removed = ranking_metrics(ranks_from_scores(scores, targets, seen), _KS)
    top = top_k_rows(scores, 10)
    top_removed = top_k_rows(scores, 10, seen)
    out["coverage@10"] = coverage_at_k(top, split.num_items)
    out["avg_popularity@10"] = average_popularity(top, train_counts)
    removed["coverage@10"] = coverage_at_k(top_removed, split.num_items)
    removed["avg_popularity@10"] = average_popularity(top_removed, train_counts)
    out["seen_removed"] = removed
    return out


def _aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Means and sample stds over seeds, the seen-removed set alike, and the runs themselves."""
    beyond = ("coverage@10", "avg_popularity@10")
    out = _mean_std(runs, _HEADLINE + beyond + ("valid_ndcg@10", "train_seconds", "epoch_seconds"))
    out["seen_removed"] = _mean_std([r["seen_removed"] for r in runs], _HEADLINE + beyond)
    out["per_seed"] = runs
    return out


def _most_popular(split: ProtocolSplit, counts: np.ndarray) -> dict[str, Any]:
    test, n = split.split.test, split.num_items
    out: dict[str, Any] = ranking_metrics(
        most_popular_ranks(split.split.train, test, n, exclude_seen=False), _KS)
    out["seen_removed"] = ranking_metrics(
        most_popular_ranks(split.split.train, test, n, exclude_seen=True), _KS)
    top = np.argsort(-(counts - np.arange(n) * 1e-9), kind="stable")[:10]
    out["coverage@10"] = 10 / n
    out["avg_popularity@10"] = float(counts[top].mean())
    return out


def _cold_start(config: Config, split: ProtocolSplit, item_text: torch.Tensor, *, seed: int,
                fraction: float, patience: int | None,
                log: Callable[[str], None]) -> dict[str, Any]:
    """Train on warm items only; rank each cold target among the cold items and the catalog."""
    cold = cold_start_split(split.split, split.num_items, fraction=fraction, seed=seed)
    warm_text = item_text[torch.from_numpy(cold.warm_rows - 1)]  # (W, T)
    model, info = _train(config, cold.train, cold.valid, warm_text, seed=seed,
                         variant={"use_text": True},
                         patience=patience, log=log)
    remap = np.zeros(split.num_items + 1, dtype=np.int64)
    remap[cold.warm_rows] = np.arange(1, len(cold.warm_rows) + 1)
    candidate_rows = torch.from_numpy(remap[1:])  # (N,) cold items → row 0: text only
    scores = score_histories(model, cold.test_histories, warm_text,
                             candidate_rows=candidate_rows, candidate_text=item_text)  # (B, N)
    targets = cold.test_targets - 1  # (B,) columns
    all_counts = item_counts(split.split.test, split.num_items)[1:]  # every interaction (oracle)
    col_of = {int(c): i for i, c in enumerate(cold.cold_rows - 1)}
    among = scores[:, cold.cold_rows - 1]  # (B, C)
    among_targets = np.array([col_of[int(t)] for t in targets])
    oracle = np.broadcast_to(all_counts[cold.cold_rows - 1] - np.arange(len(cold.cold_rows)) * 1e-9,
                             among.shape)
    seen = seen_mask([cold.warm_rows[s.items - 1] for s in cold.test_histories], split.num_items)
    warm_counts = item_counts(cold.train, len(cold.warm_rows))[1:]
    return {
        "items_held_out": int(len(cold.cold_rows)), "users": int(len(targets)),
        "seed": seed, "best_epoch": info["best_epoch"], "train_seconds": info["train_seconds"],
        "among_cold_items": {
            "model": ranking_metrics(ranks_from_scores(among, among_targets), (10,)),
            "random": random_ranking_metrics(len(cold.cold_rows), (10,)),
            "popularity_oracle": ranking_metrics(ranks_from_scores(np.array(oracle),
                                                                   among_targets), (10,)),
        },
        "full_catalog_seen_removed": {
            "model": ranking_metrics(ranks_from_scores(scores, targets, seen), (10,)),
            "random": random_ranking_metrics(split.num_items, (10,)),
            # Popularity from training counts puts a cold item (count 0) behind every warm
            # item with a count, even when ties among zero-count items are broken in its favour.
            "most_popular": ranking_metrics(np.full(len(targets), int((warm_counts > 0).sum()) + 1),
                                            (10,)),
        },
    }


def run(config: Config, *, dataset: str = "ml-100k", seeds: Sequence[int] = (0, 1, 2),
        as_json: bool = False, baselines: bool = True, cold_start: bool = True,
        cold_fraction: float = 0.1, patience: int | None = None, threads: int | None = None,
        tuned: bool = True, verbose: bool = True) -> dict[str, Any]:
    """Evaluate on `dataset` with every seed in `seeds`; print and return the figures.

    Headline keys ("hr@10", "ndcg@10", "mrr@10", @20) are means over seeds of test figures
    with seen items kept; "std" holds their sample standard deviations, "per_seed" the runs,
    "seen_removed" the same with history items removed. `threads` sets torch's intra-op
    threads for this process. `patience` overrides config.training.patience. The tuned
    hyper-parameters are the config defaults, so `tuned` is ignored (kept for the CLI's
    --as-configured). Raises ValueError for an unknown dataset or no seeds.
    """
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    if threads:
        torch.set_num_threads(threads)
    started = time.monotonic()
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if verbose else (lambda msg: None)
    data = _load(config, dataset)
    split = protocol_split(data)
    encoder = TextEncoder(config.model.text_encoder or None, config.paths.cache / "text")
    by_id = {item.item_id: item for item in data.items}
    known = [by_id[i] for i in split.item_ids if i in by_id]
    item_text = torch.zeros(split.num_items, config.model.text_dim)  # (N, T); no text: zeros
    rows = [r for r, i in enumerate(split.item_ids) if i in by_id]
    item_text[rows] = torch.from_numpy(encode_items(encoder, known))
    counts = item_counts(split.split.train, split.num_items)[1:]  # (N,)
    device = resolve_device(config.training.device)

    def evaluate_seeds(variant: dict[str, Any], seeds: Sequence[int] = seeds) -> dict[str, Any]:
        runs = []
        for seed in seeds:
            model, info = _train(config, split.split.train, split.split.valid, item_text,
                                 seed=seed, variant=variant, patience=patience, log=log)
            runs.append(info | _test_figures(model, split, item_text, counts))
            log(f"seed {seed} {variant or 'as configured'}: test ndcg@10 "
                f"{runs[-1]['ndcg@10']:.4f} hr@10 {runs[-1]['hr@10']:.4f}")
        return _aggregate(runs)

    report: dict[str, Any] = {"dataset": data.name, "protocol": {
        "split": "leave-one-out, stable sort by timestamp", "ranking": "full, all items",
        "headline": "seen items kept (RecBole sequential default)", "selection": "valid ndcg@10",
        "users": len(split.split.test), "items": split.num_items,
        "train_interactions": int(sum(len(s) for s in split.split.train)),
        "split_sha256": split_digest(split)}}
    report |= evaluate_seeds({})
    if baselines:
        report["baselines"] = {"most_popular": _most_popular(split, counts),
                               "no_text": evaluate_seeds({"use_text": False}),
                               # How much of the figure is the learned repeat bias; one seed,
                               # to keep the run short (see docs/QUALITY.md).
                               "no_repeat_bias": evaluate_seeds({"repeat_bias": False},
                                                                seeds[:1])}
    if cold_start:
        report["cold_start"] = _cold_start(config, split, item_text, seed=seeds[0],
                                           fraction=cold_fraction, patience=patience, log=log)
    report |= {"seeds": list(seeds), "device": f"{device.type}"
               + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda"
                  else f" ({platform.processor() or platform.machine()}, "
                       f"{torch.get_num_threads()} torch threads)"),
               "config": {"model": dataclasses.asdict(config.model),
                          "training": dataclasses.asdict(config.training),
                          "patience": patience or config.training.patience},
               "total_seconds": time.monotonic() - started}
    print(json.dumps(report, indent=None if as_json else 2))
    return report
