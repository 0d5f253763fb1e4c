"""`streamrec evaluate`: streamrec's model against an in-run SASRec, under two ranking protocols.

A thin shell: dataset → protocol split (pipeline.evaluation) → per seed, fit streamrec's model
and the SASRec baseline (pipeline.baselines) with early stopping on validation NDCG@10 under the
masked protocol → test figures of both under both protocols (masked: the user's whole history
out of the ranking, the headline; unmasked: RecBole's sequential default) → most popular →
cold-start run → one dict (printed as JSON). Publishes nothing and touches no broker.

Size: one command: the split, each model's seeded fits run in parallel processes, and the
report under both protocols.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import platform
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.baselines import SASRec, SASRecBaseline
from pipeline.config import Config
from pipeline.datasets import Dataset, load_movielens_100k, synthetic
from pipeline.evaluation import (
    PROTOCOLS,
    ProtocolSplit,
    average_popularity,
    cold_start_split,
    coverage_at_k,
    item_counts,
    most_popular_ranks,
    protocol_ranks,
    protocol_split,
    random_ranking_metrics,
    ranking_metrics,
    ranks_from_scores,
    score_histories,
    seen_mask,
    split_digest,
    top_k_rows,
)
from pipeline.items import TextEncoder, encode_items
from pipeline.model import SeqRecConfig, SeqRecModel
from pipeline.training import FitProgress, UserSequence, evaluate, fit, resolve_device

__all__ = ["run"]

_KS = (10, 20)
_HEADLINE = ("hr@10", "ndcg@10", "mrr@10", "hr@20", "ndcg@20", "mrr@20")
_BEYOND = ("coverage@10", "avg_popularity@10")


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


def _train(
    model: nn.Module,
    label: str,
    training: Any,
    train: Sequence[UserSequence],
    valid: Sequence[UserSequence],
    item_text: torch.Tensor,
    *,
    patience: int | None,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """One fit with early stopping on validation NDCG@10, masked protocol; the info of the run."""
    seed = training.seed

    def on_epoch(p: FitProgress) -> None:
        if p.kind == "epoch" and p.metrics:
            log(
                f"  {label} seed {seed} epoch {p.epoch + 1}: "
                f"loss {p.loss:.3f} valid ndcg@10 (masked) {p.metrics['ndcg@10']:.4f}"
            )

    result = fit(
        model,
        train,
        item_text,
        training,
        valid_sequences=valid,
        patience=patience,
        exclude_seen=True,
        callbacks=[on_epoch],
    )
    epochs = len(result.history)
    unmasked = evaluate(model, valid, item_text, exclude_seen=False)
    bias = getattr(model, "repeat_bias", None)
    return {
        "seed": seed,
        "best_epoch": result.best_epoch + 1,
        "epochs_run": epochs,
        "valid_ndcg@10": {
            "masked": (result.best_metrics or {}).get("ndcg@10", float("nan")),
            "unmasked": unmasked["ndcg@10"],
        },
        "repeat_bias": None if bias is None else float(model.repeat_offset().detach()),
        "train_seconds": result.seconds,
        "epoch_seconds": result.seconds / max(epochs, 1),
    }


def _streamrec(
    config: Config, num_items: int, seed: int, variant: dict[str, Any]
) -> tuple[SeqRecModel, Any]:
    model_cfg = dataclasses.replace(config.model, **variant)
    torch.manual_seed(seed)
    model = SeqRecModel(SeqRecConfig.from_model_config(model_cfg, num_items=num_items))
    return model, dataclasses.replace(config.training, seed=seed)


def _sasrec(
    config: Config, baseline: SASRecBaseline, num_items: int, seed: int
) -> tuple[SASRec, Any]:
    torch.manual_seed(seed)
    model = SASRec(baseline.model_config(num_items))
    return model, dataclasses.replace(config.training, seed=seed, **baseline.training_fields())


def _test_figures(
    model: nn.Module, split: ProtocolSplit, item_text: torch.Tensor, train_counts: np.ndarray
) -> dict[str, Any]:
    """Test figures under both protocols, with coverage and popularity of the top 10."""
    test = split.split.test
    inputs = [UserSequence(s.user_id, s.items[:-1], s.types[:-1]) for s in test]
    scores = score_histories(model, inputs, item_text)  # (B, N)
    targets = np.array([int(s.items[-1]) - 1 for s in test])
    histories = [s.items[:-1] for s in test]
    ranks = protocol_ranks(scores, targets, histories)
    masks = {"masked": seen_mask(histories, split.num_items), "unmasked": None}
    out: dict[str, Any] = {}
    for protocol in PROTOCOLS:
        figures: dict[str, Any] = ranking_metrics(ranks[protocol], _KS)
        top = top_k_rows(scores, 10, masks[protocol])
        figures["coverage@10"] = coverage_at_k(top, split.num_items)
        figures["avg_popularity@10"] = average_popularity(top, train_counts)
        out[protocol] = figures
    return out


def _aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per protocol, means and sample stds over seeds; the runs themselves under "per_seed"."""
    out: dict[str, Any] = {
        p: _mean_std([r[p] for r in runs], _HEADLINE + _BEYOND) for p in PROTOCOLS
    }
    out["valid_ndcg@10"] = _mean_std([r["valid_ndcg@10"] for r in runs], PROTOCOLS)
    out["train_seconds"] = float(np.mean([r["train_seconds"] for r in runs]))
    out["per_seed"] = runs
    return out


def _most_popular(split: ProtocolSplit, counts: np.ndarray) -> dict[str, Any]:
    test, n = split.split.test, split.num_items
    return {
        protocol: ranking_metrics(
            most_popular_ranks(split.split.train, test, n, exclude_seen=protocol == "masked"), _KS
        )
        for protocol in PROTOCOLS
    }


def _cold_start(
    config: Config,
    split: ProtocolSplit,
    item_text: torch.Tensor,
    *,
    seed: int,
    fraction: float,
    patience: int | None,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Train on warm items only; rank each cold target among the cold items and the catalog."""
    cold = cold_start_split(split.split, split.num_items, fraction=fraction, seed=seed)
    warm_text = item_text[torch.from_numpy(cold.warm_rows - 1)]  # (W, T)
    model, training = _streamrec(config, len(cold.warm_rows), seed, {"use_text": True})
    info = _train(
        model, "cold-start", training, cold.train, cold.valid, warm_text, patience=patience, log=log
    )
    remap = np.zeros(split.num_items + 1, dtype=np.int64)
    remap[cold.warm_rows] = np.arange(1, len(cold.warm_rows) + 1)
    candidate_rows = torch.from_numpy(remap[1:])  # (N,) cold items → row 0: text only
    scores = score_histories(
        model,
        cold.test_histories,
        warm_text,
        candidate_rows=candidate_rows,
        candidate_text=item_text,
    )  # (B, N)
    targets = cold.test_targets - 1  # (B,) columns
    all_counts = item_counts(split.split.test, split.num_items)[1:]  # every interaction (oracle)
    col_of = {int(c): i for i, c in enumerate(cold.cold_rows - 1)}
    among = scores[:, cold.cold_rows - 1]  # (B, C)
    among_targets = np.array([col_of[int(t)] for t in targets])
    oracle = np.broadcast_to(
        all_counts[cold.cold_rows - 1] - np.arange(len(cold.cold_rows)) * 1e-9, among.shape
    )
    seen = seen_mask([cold.warm_rows[s.items - 1] for s in cold.test_histories], split.num_items)
    warm_counts = item_counts(cold.train, len(cold.warm_rows))[1:]
    return {
        "items_held_out": len(cold.cold_rows),
        "users": len(targets),
        "seed": seed,
        "best_epoch": info["best_epoch"],
        "train_seconds": info["train_seconds"],
        "among_cold_items": {
            "model": ranking_metrics(ranks_from_scores(among, among_targets), (10,)),
            "random": random_ranking_metrics(len(cold.cold_rows), (10,)),
            "popularity_oracle": ranking_metrics(
                ranks_from_scores(np.array(oracle), among_targets), (10,)
            ),
        },
        "full_catalog_seen_removed": {
            "model": ranking_metrics(ranks_from_scores(scores, targets, seen), (10,)),
            "random": random_ranking_metrics(split.num_items, (10,)),
            # Popularity from training counts puts a cold item (count 0) behind every warm
            # item with a count, even when ties among zero-count items are broken in its favour.
            "most_popular": ranking_metrics(
                np.full(len(targets), int((warm_counts > 0).sum()) + 1), (10,)
            ),
        },
    }


@dataclasses.dataclass(frozen=True)
class _Shared:
    """What every fit of one run needs (picklable, sent once to each worker process)."""

    config: Config
    sasrec: SASRecBaseline
    split: ProtocolSplit
    item_text: torch.Tensor
    counts: np.ndarray
    patience: int | None
    cold_fraction: float
    verbose: bool


_SHARED: _Shared | None = None


def _init_worker(shared: _Shared, threads: int | None) -> None:
    global _SHARED
    _SHARED = shared
    if threads:
        torch.set_num_threads(threads)


def _run_job(spec: tuple[str, int]) -> dict[str, Any]:
    """One fit of the run: ("streamrec" | "sasrec", seed) → info and test figures under both
    protocols; ("cold_start", seed) → the cold-start section."""
    assert _SHARED is not None
    sh = _SHARED
    name, seed = spec
    log = (
        (lambda msg: print(msg, file=sys.stderr, flush=True)) if sh.verbose else (lambda msg: None)
    )
    if name == "cold_start":
        return _cold_start(
            sh.config,
            sh.split,
            sh.item_text,
            seed=seed,
            fraction=sh.cold_fraction,
            patience=sh.patience,
            log=log,
        )
    if name == "streamrec":
        model, training = _streamrec(sh.config, sh.split.num_items, seed, {})
    else:
        model, training = _sasrec(sh.config, sh.sasrec, sh.split.num_items, seed)
    info = _train(
        model,
        name,
        training,
        sh.split.split.train,
        sh.split.split.valid,
        sh.item_text,
        patience=sh.patience if name == "streamrec" else None,
        log=log,
    )
    run = info | _test_figures(model, sh.split, sh.item_text, sh.counts)
    log(
        f"{name} seed {seed}: test ndcg@10 masked {run['masked']['ndcg@10']:.4f} "
        f"unmasked {run['unmasked']['ndcg@10']:.4f}"
    )
    return run


def run(
    config: Config,
    *,
    dataset: str = "ml-100k",
    seeds: Sequence[int] = (0, 1, 2),
    as_json: bool = False,
    baselines: bool = True,
    cold_start: bool = True,
    cold_fraction: float = 0.1,
    patience: int | None = None,
    threads: int | None = None,
    sasrec: SASRecBaseline | None = None,
    jobs: int = 1,
    verbose: bool = True,
) -> dict[str, Any]:
    """Evaluate streamrec's model and the SASRec baseline on `dataset`, every seed in `seeds`;
    print and return the figures.

    "models" holds {"streamrec", "sasrec"}, each with "masked" and "unmasked" test figures
    (means over seeds plus "std", sample standard deviations) and "per_seed" runs. Both are
    selected on validation NDCG@10 under the masked protocol; test is read once per seed.
    `baselines` False leaves SASRec and most popular out. `sasrec` overrides the baseline's
    settings (default SASRecBaseline()). `jobs` > 1 runs that many fits at once, each in a
    process of its own (same figures, seed for seed). `threads` sets torch's intra-op threads
    (of each process). `patience`
    overrides config.training.patience for streamrec's model. Raises ValueError for an unknown
    dataset or no seeds.
    """
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    if jobs < 1:
        raise ValueError(f"jobs={jobs} must be >= 1")
    if threads:
        torch.set_num_threads(threads)
    sasrec = sasrec or SASRecBaseline()
    started = time.monotonic()
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
    train = split.split.train

    names = ["streamrec", "sasrec"] if baselines else ["streamrec"]
    specs = [(name, seed) for name in names for seed in seeds]
    if cold_start:
        specs.append(("cold_start", seeds[0]))
    shared = _Shared(config, sasrec, split, item_text, counts, patience, cold_fraction, verbose)
    if jobs > 1:
        # Fits are independent: one process each (spawned, so no forked torch state), each on
        # torch.get_num_threads() threads of its own.
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(
            max_workers=jobs,
            mp_context=context,
            initializer=_init_worker,
            initargs=(shared, torch.get_num_threads()),
        ) as pool:
            results = list(pool.map(_run_job, specs))
    else:
        _init_worker(shared, None)
        results = [_run_job(spec) for spec in specs]
    done = dict(zip(specs, results))
    models: dict[str, Any] = {
        name: _aggregate([done[(name, seed)] for seed in seeds]) for name in names
    }

    report: dict[str, Any] = {
        "dataset": data.name,
        "protocol": {
            "split": "leave-one-out, stable sort by timestamp",
            "ranking": "full, all items",
            "masked": "every item of the user's whole history scored -inf (headline; what a scorer "
            "that excludes interacted items serves)",
            "unmasked": "history items kept in the ranking (RecBole's sequential default)",
            "selection": "valid ndcg@10, masked",
            "ties": "count against the target",
            "users": len(split.split.test),
            "items": split.num_items,
            "train_interactions": int(sum(len(s) for s in train)),
            "split_sha256": split_digest(split),
        },
        "models": models,
    }
    if baselines:
        ours, theirs = models["streamrec"], models["sasrec"]
        report["baselines"] = {"most_popular": _most_popular(split, counts)}
        report["comparison"] = {
            protocol: {
                "streamrec_over_sasrec_ndcg@10": ours[protocol]["ndcg@10"]
                / max(theirs[protocol]["ndcg@10"], 1e-12)
            }
            for protocol in PROTOCOLS
        }
    if cold_start:
        report["cold_start"] = done[("cold_start", seeds[0])]
    report |= {
        "seeds": list(seeds),
        "device": f"{device.type}"
        + (
            f" ({torch.cuda.get_device_name(device)})"
            if device.type == "cuda"
            else f" ({platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} torch threads)"
        ),
        "config": {
            "model": dataclasses.asdict(config.model),
            "training": dataclasses.asdict(config.training),
            "patience": patience or config.training.patience,
            "sasrec": dataclasses.asdict(sasrec),
        },
        "total_seconds": time.monotonic() - started,
    }
    print(json.dumps(report, indent=None if as_json else 2))
    return report
