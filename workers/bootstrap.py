"""Train the first model from a dataset and publish it: the registry's v000001.

A thin shell: dataset → first `training.bootstrap_fraction` of events → catalog (MiniLM text,
cached under paths.cache) → leave-one-out fit with early stopping → offline HR/NDCG@10 on the
held-out last items, masked (the user's history out of the ranking) and unmasked →
ModelRegistry(paths.models).publish. Prints a short summary.

The user's own data (`run_own`): JSON Lines files of Item and Event messages
(`--items/--events`, pipeline/userdata.py), or what the items and events topics hold now
(`--from-topics`, read without a group), validated like the workers; all of it is trained on
(each user's newest interaction is the test target, the one before it the validation target).
A bootstrap from the topics announces its ModelUpdate on the model-updates topic, so running
workers swap to it at once (`--announce` does the same for files).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.config import Config
from pipeline.datasets import Dataset, load_movielens_100k, split_by_time, synthetic
from pipeline.errors import DatasetError
from pipeline.items import Catalog, TextEncoder, encode_items
from pipeline.messages import Event, Item, ModelUpdate
from pipeline.model import SeqRecConfig, SeqRecModel
from pipeline.registry import ModelRegistry
from pipeline.training import (
    FitProgress,
    build_item_index,
    build_sequences,
    evaluate,
    fit,
    leave_one_out,
)
from pipeline.userdata import Report

__all__ = [
    "run",
    "run_own",
    "load_dataset",
    "load_files",
    "load_topics",
    "offline_metrics",
    "announce_update",
]


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
            bar.write(
                f"epoch {p.epoch + 1}: loss {p.loss:.3f}  valid ndcg@10 "
                f"{p.metrics['ndcg@10']:.4f} hr@10 {p.metrics['hr@10']:.4f}"
            )

    return bar, [on_progress]


def offline_metrics(model: SeqRecModel, test: list, item_text: torch.Tensor) -> dict[str, float]:
    """HR/NDCG/MRR@10/20 of the held-out targets under both protocols: the plain keys are the
    masked one (every item of the user's history out of the ranking, never the target; as
    before), `unmasked_*` the one where history items compete with the rest."""
    masked = evaluate(model, test, item_text, exclude_seen=True)
    unmasked = evaluate(model, test, item_text, exclude_seen=False)
    return {**masked, **{f"unmasked_{k}": v for k, v in unmasked.items() if k != "users"}}


def run(
    config: Config,
    *,
    progress: bool = True,
    dataset: Dataset | None = None,
    max_train_seconds: float | None = None,
    fraction: float | None = None,
) -> ModelUpdate:
    """Train, evaluate and publish the bootstrap model; returns its ModelUpdate. `dataset`
    replaces the one `training.dataset` names (the experiment's drift scenario, the user's own
    data); `fraction` of its events (by time) is trained on, default
    `training.bootstrap_fraction`; `max_train_seconds` bounds training (the demo's time budget
    on a busy machine)."""
    started = time.monotonic()
    dataset = dataset if dataset is not None else load_dataset(config)
    fraction = config.training.bootstrap_fraction if fraction is None else fraction
    head, _ = split_by_time(dataset, fraction)

    encoder = TextEncoder(config.model.text_encoder or None, config.paths.cache / "text")
    catalog = Catalog()
    catalog.upsert(dataset.items, encode_items(encoder, dataset.items))

    item_index = build_item_index(e.item_id for e in head.events)
    item_ids = list(item_index)
    rows = catalog.rows(item_ids)
    item_text = torch.zeros(
        len(item_ids), config.model.text_dim
    )  # ids missing from the catalog: no text
    known = rows >= 0
    item_text[torch.from_numpy(known)] = torch.from_numpy(catalog.text_vectors[rows[known]])

    split = leave_one_out(build_sequences(head.events, item_index))
    seq_config = SeqRecConfig.from_model_config(config.model, num_items=len(item_ids))
    torch.manual_seed(config.training.seed)
    model = SeqRecModel(seq_config)
    bar, callbacks = _progress_bar(progress)
    try:
        result = fit(
            model,
            split.train,
            item_text,
            config.training,
            valid_sequences=split.valid,
            callbacks=callbacks,
            max_seconds=max_train_seconds,
        )
    finally:
        if bar is not None:
            bar.close()
    metrics = offline_metrics(model, split.test, item_text.to(next(model.parameters()).device))
    metrics["valid_ndcg@10"] = (result.best_metrics or {}).get("ndcg@10", float("nan"))
    metrics["epochs"] = float(len(result.history))
    metrics["train_seconds"] = result.seconds

    registry = ModelRegistry(config.paths.models)
    update = registry.publish(
        model.to("cpu"),
        seq_config,
        item_ids,
        catalog.meta(),
        metrics,
        parent_version=registry.current_version(),
        trained_on_events=len(head.events),
        text_vectors=catalog.text_vectors,
    )
    print(
        f"bootstrap {dataset.name}: {len(head.events)} events, {len(split.test)} test users, "
        f"{len(item_ids)} trained items / {len(catalog)} in catalog, "
        f"{len(result.history)} epochs (best {result.best_epoch + 1})"
    )
    print(
        f"  test HR@10 {metrics['hr@10']:.4f}  NDCG@10 {metrics['ndcg@10']:.4f}  "
        f"MRR@10 {metrics['mrr@10']:.4f}  HR@20 {metrics['hr@20']:.4f}  (masked: the user's "
        "history out of the ranking)"
    )
    print(
        f"  test HR@10 {metrics['unmasked_hr@10']:.4f}  NDCG@10 "
        f"{metrics['unmasked_ndcg@10']:.4f}  MRR@10 {metrics['unmasked_mrr@10']:.4f}  HR@20 "
        f"{metrics['unmasked_hr@20']:.4f}  (unmasked)"
    )
    print(f"  published {update.version} -> {update.uri} in {time.monotonic() - started:.1f}s")
    return update


# --- the user's own data ------------------------------------------------------------------------


def _line_bar(enabled: bool, desc: str, unit: str = "line"):  # type: ignore[no-untyped-def]
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(desc=desc, unit=unit, unit_scale=True, leave=False, mininterval=0.5)


def load_files(
    config: Config, items: Path | str, events: Path | str, *, progress: bool = True
) -> tuple[Dataset, Report]:
    """The user's JSON Lines files as a Dataset, validated like the workers (pipeline/userdata)."""
    from pipeline.userdata import load_files as read_files

    bars: list = []

    def bar_for(kind: str, path: Path) -> Callable[[int], None] | None:
        bar = _line_bar(progress, f"reading {kind}s {path.name}")
        if bar is None:
            return None
        bars.append(bar)
        return bar.update

    try:
        return read_files(items, events, config.validation, progress=bar_for)
    finally:
        for bar in bars:
            bar.close()


def load_topics(
    config: Config, *, progress: bool = True, timeout_s: float = 600.0
) -> tuple[Dataset, Report]:
    """What the items and events topics hold now (to each partition's end at the start, no
    group), validated like the workers, as a Dataset."""
    from pipeline.codec import Codec
    from pipeline.kafka.snapshot import read_to_end
    from pipeline.userdata import SourceReport, decode_records, to_dataset

    topics = config.topics
    bar = _line_bar(progress, "reading topics", unit="rec")

    def on_ends(total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.refresh()

    try:
        records = read_to_end(
            config.kafka,
            config.bootstrap_servers,
            [topics.items, topics.events],
            client_id=f"{config.kafka.client_id}-bootstrap",
            timeout_s=timeout_s,
            on_ends=on_ends,
            on_records=(lambda r: bar.update(len(r))) if bar is not None else None,
        )
    finally:
        if bar is not None:
            bar.close()
    codec = Codec(config.validation, worker="bootstrap")
    now_ms = int(time.time() * 1000)
    report = Report(SourceReport(topics.items, "item"), SourceReport(topics.events, "event"))
    messages: dict[str, list] = {}
    for topic, kind, src in (
        (topics.items, "item", report.items),
        (topics.events, "event", report.events),
    ):
        mine = [r for r in records if r.topic == topic]
        # The report names invalid records by their offset (in whichever partition).
        messages[kind] = decode_records(
            ((r.offset, r.value) for r in mine), kind, codec, src, now_ms
        )
    items: list[Item] = messages["item"]
    events: list[Event] = messages["event"]
    # Within a topic, records come partition by partition: the stable sort by ts in to_dataset
    # puts them in time order (ties: partition, then offset).
    return to_dataset(
        topics.events.rstrip("."), items, events, report, require_items=False, unit="record"
    ), report


def run_own(
    config: Config,
    *,
    items: Path | str | None = None,
    events: Path | str | None = None,
    from_topics: bool = False,
    announce: bool = False,
    progress: bool = True,
    max_train_seconds: float | None = None,
) -> ModelUpdate:
    """Bootstrap from the user's own data: files (`items` and `events`) or the topics. Trains on
    all of it, publishes, and with `from_topics` or `announce` produces the ModelUpdate to the
    model-updates topic so running workers swap to it."""
    if from_topics:
        dataset, report = load_topics(config, progress=progress)
        unit = "record"
    else:
        if items is None or events is None:
            raise ValueError("a bootstrap from files needs both --items and --events")
        dataset, report = load_files(config, items, events, progress=progress)
        unit = "line"
    for line in report.lines(unit):
        print(line)
    try:
        update = run(
            config,
            progress=progress,
            dataset=dataset,
            fraction=1.0,
            max_train_seconds=max_train_seconds,
        )
    except ValueError as exc:  # fit: no user with two interactions
        raise DatasetError(
            f"cannot train on {dataset.name}: {exc} ({len(dataset.events):,} valid events)"
        ) from exc
    if from_topics or announce:
        announce_update(config, update)
    return update


def announce_update(config: Config, update: ModelUpdate) -> bool:
    """Produce `update` to the model-updates topic so running workers swap to it; a broker
    that cannot be reached is reported, not fatal (the model is published either way)."""
    from pipeline.errors import BrokerError
    from workers.models import announce

    try:
        announce(config, update)
    except BrokerError as exc:
        print(
            f"streamrec bootstrap: {update.version} is CURRENT, but its ModelUpdate could not "
            f"be produced ({exc}); running workers follow on restart",
            file=sys.stderr,
        )
        return False
    print(
        f"  announced {update.version} on {config.topics.model_updates}: running workers swap to it"
    )
    return True
