"""`streamrec replay`: produce a dataset's catalog and events to the topics in time order.

Items go first (so workers know them), then events keyed by user_id, as fast as possible or at a
fixed rate, with a progress bar. The dataset is a built-in one, or the user's own JSON Lines
files (`--items/--events`), read and validated as `streamrec bootstrap` reads them: invalid
lines are counted and skipped, duplicates dropped, events sorted by ts (pipeline/userdata.py).
Text-less entries made for items only events name are not produced. A thin shell over
pipeline.datasets and the Kafka sink.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import orjson
from tqdm import tqdm

from pipeline.config import Config
from pipeline.datasets import Dataset, split_by_time
from pipeline.kafka import KafkaSink, ensure_topics
from pipeline.messages import Event, Item

__all__ = ["run", "load_dataset", "produce_items", "produce_events"]


def load_dataset(config: Config, name: str) -> Dataset:
    """The same dataset bootstrap trains on, so a replay continues where training stopped."""
    from workers.bootstrap import load_dataset as bootstrap_dataset

    return bootstrap_dataset(
        config.replace(training=dataclasses.replace(config.training, dataset=name))
    )


def produce_items(sink: KafkaSink, topic: str, items: Sequence[Item]) -> None:
    for item in items:
        sink.send(topic, item.item_id.encode(), orjson.dumps(item.to_dict()))
    sink.flush(60.0)


def produce_events(
    sink: KafkaSink,
    topic: str,
    events: Sequence[Event],
    *,
    rate: float = 0.0,
    progress: bool = True,
    on_sent: Callable[[Event, float], None] | None = None,
) -> float:
    """Produce `events` in order, paced to `rate` events/s (0 = unpaced). Returns seconds taken."""
    started = time.perf_counter()
    bar = tqdm(total=len(events), unit="ev", disable=not progress, mininterval=0.5)
    for n, event in enumerate(events):
        if rate > 0:
            due = started + n / rate
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        sink.send(topic, event.user_id.encode(), orjson.dumps(event.to_dict()))
        if on_sent is not None:
            on_sent(event, time.time())
        if n % 500 == 0:
            bar.update(500 if n else 1)
    sink.flush(60.0)
    bar.n = len(events)
    bar.close()
    return time.perf_counter() - started


def run(
    config: Config,
    *,
    dataset: str,
    from_fraction: float = 0.0,
    rate: float = 0.0,
    limit: int = 0,
    items: bool = True,
    items_path: str | None = None,
    events_path: str | None = None,
) -> None:
    if items_path is not None and events_path is not None:
        from workers.bootstrap import load_files

        data, report = load_files(config, items_path, events_path)
        for line in report.lines():
            print(line)
        # Only the items the files hold: an item that only events name has nothing to say.
        data = dataclasses.replace(
            data, items=tuple(i for i in data.items if i.title or not i.available)
        )
        dataset = str(events_path)
    else:
        data = load_dataset(config, dataset)
    tail = split_by_time(data, from_fraction)[1] if from_fraction > 0 else data
    events = list(tail.events[:limit] if limit else tail.events)
    bootstrap = config.bootstrap_servers
    ensure_topics(config.kafka, bootstrap, config.topics)
    with KafkaSink(config.kafka, bootstrap, client_id=f"{config.kafka.client_id}-replay") as sink:
        if items:
            produce_items(sink, config.topics.items, data.items)
        seconds = produce_events(sink, config.topics.events, events, rate=rate)
    print(
        f"replayed {len(events)} events of {dataset} in {seconds:.1f}s "
        f"({len(events) / max(seconds, 1e-9):,.0f} events/s)"
    )
