"""Train the first model from a dataset and publish it: the registry's v000001.

A thin shell: dataset → first `training.bootstrap_fraction` of events → catalog (MiniLM text,
cached under paths.cache) → leave-one-out fit with early stopping → offline HR/NDCG@10 on the
held-out last items → ModelRegistry(paths.models).publish. Prints a short summary.
"""

from __future__ import annotations

import time

import torch

from pipeline.config import Config
from pipeline.datasets import Dataset, load_movielens_100k, split_by_time, synthetic
from pipeline.items import Catalog, TextEncoder, encode_items
from pipeline.messages import ModelUpdate
from pipeline.model import SeqRecConfig, SeqRecModel
from pipeline.registry import ModelRegistry
from pipeline.training import (FitProgress, build_item_index, build_sequences, evaluate, fit,
                               leave_one_out)

__all__ = ["run", "load_dataset"]


def load_dataset(config: Config) -> Dataset:
    """The dataset `training.dataset` names (ml-100k from the recbole wheel, or synthetic)."""
    if config.training.dataset == "ml-100k":
        return load_movielens_100k(config.paths.cache)
    return synthetic(n_users=1000, n_items=2000, n_events=100_000, seed=config.training.seed)


def _progress_bar(enabled: bool):  # type: ignore[no-untyped-def]
    """A tqdm bar over all steps, driven by fit's callback (or a no-op)."""
    if not enabled:
        return None, []
    from tqdm import tqdm

    bar = tqdm(desc="training", unit="step", leave=False)

    def on_progress(p: FitProgress) -> None:
        if bar.total is None:
            bar.total = p.steps * p.epochs
        if p.kind == "step":
            bar.update(1)
            bar.set_postfix(epoch=p.epoch + 1, loss=f"{p.loss:.3f}")
        elif p.metrics:
            bar.write(f"epoch {p.epoch + 1}: loss {p.loss:.3f}  valid ndcg@10 "
                      f"{p.metrics['ndcg@10']:.4f} hr@10 {p.metrics['hr@10']:.4f}")

    return bar, [on_progress]


def run(config: Config, *, progress: bool = True, dataset: Dataset | None = None,
        max_train_seconds: float | None = None) -> ModelUpdate:
    """Train, evaluate and publish the bootstrap model; returns its ModelUpdate. `dataset`
    replaces the one `training.dataset` names (the experiment's drift scenario);
    `max_train_seconds` bounds training (the demo's time budget on a busy machine)."""
    started = time.monotonic()
    dataset = dataset if dataset is not None else load_dataset(config)
    head, _ = split_by_time(dataset, config.training.bootstrap_fraction)

    encoder = TextEncoder(config.model.text_encoder or None, config.paths.cache / "text")
    catalog = Catalog()
    catalog.upsert(dataset.items, encode_items(encoder, dataset.items))

    item_index = build_item_index(e.item_id for e in head.events)
    item_ids = list(item_index)
    rows = catalog.rows(item_ids)
    item_text = torch.zeros(len(item_ids), config.model.text_dim)  # ids missing from the catalog: no text
    known = rows >= 0
    item_text[torch.from_numpy(known)] = torch.from_numpy(catalog.text_vectors[rows[known]])

    split = leave_one_out(build_sequences(head.events, item_index))
    seq_config = SeqRecConfig.from_model_config(config.model, num_items=len(item_ids))
    torch.manual_seed(config.training.seed)
    model = SeqRecModel(seq_config)
    bar, callbacks = _progress_bar(progress)
    try:
        result = fit(model, split.train, item_text, config.training,
                     valid_sequences=split.valid, callbacks=callbacks,
                     max_seconds=max_train_seconds)
    finally:
        if bar is not None:
            bar.close()
    metrics = evaluate(model, split.test, item_text.to(next(model.parameters()).device))
    metrics["valid_ndcg@10"] = (result.best_metrics or {}).get("ndcg@10", float("nan"))
    metrics["epochs"] = float(len(result.history))
    metrics["train_seconds"] = result.seconds

    registry = ModelRegistry(config.paths.models)
    update = registry.publish(model.to("cpu"), seq_config, item_ids, catalog.meta(), metrics,
                              parent_version=registry.current_version(),
                              trained_on_events=len(head.events),
                              text_vectors=catalog.text_vectors)
    print(f"bootstrap {dataset.name}: {len(head.events)} events, {len(split.test)} test users, "
          f"{len(item_ids)} trained items / {len(catalog)} in catalog, "
          f"{len(result.history)} epochs (best {result.best_epoch + 1})")
    print(f"  test HR@10 {metrics['hr@10']:.4f}  NDCG@10 {metrics['ndcg@10']:.4f}  "
          f"MRR@10 {metrics['mrr@10']:.4f}  HR@20 {metrics['hr@20']:.4f}")
    print(f"  published {update.version} -> {update.uri} in {time.monotonic() - started:.1f}s")
    return update
