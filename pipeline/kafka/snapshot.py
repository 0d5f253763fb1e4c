"""`read_to_end`: what some topics hold now, from their beginning to the end each partition had
when the read started, without a group (nothing is committed, no worker's group is joined).

For `streamrec bootstrap --from-topics`. The end of each partition is fixed at the start: the
larger of ListOffsets' latest offset and the highwater of the partition's first fetch (Tansu
0.6.0's ListOffsets end falls inside the last multi-record batch: measured 1 for a partition
holding 571 records in batches), so records produced while the read goes on are left out and
the read always ends.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from pipeline.config import KafkaConfig
from pipeline.errors import BrokerError
from pipeline.kafka.client import (
    REVOKE_COMMIT_TIMEOUT_MS,
    KafkaConsumer,
    TopicPartition,
    kafka_errors,
    to_record,
    wrap_error,
)
from pipeline.kafka.settings import consumer_settings
from pipeline.messages import Record

__all__ = ["read_to_end"]


def read_to_end(
    cfg: KafkaConfig,
    bootstrap: str,
    topics: Iterable[str],
    *,
    client_id: str | None = None,
    timeout_s: float = 600.0,
    on_records: Callable[[list[Record]], None] | None = None,
    on_ends: Callable[[int], None] | None = None,
) -> list[Record]:
    """Every record of `topics` below each partition's end at the start, grouped by topic and
    partition in offset order. Missing topics count as empty. `on_ends(total)` is told how
    many records there are to read once every end is fixed, `on_records` each batch as it
    comes (progress). Raises BrokerError when the broker cannot be read or `timeout_s` passes
    first."""
    topics = tuple(topics)
    settings = consumer_settings(cfg, bootstrap, client_id)
    settings["fetch_max_wait_ms"] = max(cfg.fetch_max_wait_ms, cfg.fetch_wait_ceiling_ms)
    try:
        consumer = KafkaConsumer(**settings, group_id=None)
    except kafka_errors.KafkaError as exc:
        raise wrap_error(f"connecting a reader to {bootstrap}", exc) from exc
    try:
        try:
            consumer.topics()  # cluster metadata for every topic
            parts = [
                TopicPartition(t, p)
                for t in topics
                for p in sorted(consumer.partitions_for_topic(t) or ())
            ]
            if not parts:
                return []
            consumer.assign(parts)
            consumer.seek_to_beginning(*parts)
            starts = consumer.beginning_offsets(parts)
            ends = consumer.end_offsets(parts)
        except kafka_errors.KafkaError as exc:
            raise wrap_error(f"reading the offsets of {list(topics)}", exc) from exc
        reported = False
        fixed: set[TopicPartition] = set()  # partitions whose end took their first highwater
        out: dict[TopicPartition, list[Record]] = {p: [] for p in parts}
        deadline = time.monotonic() + timeout_s
        while True:
            pending = [
                p
                for p in parts
                if p not in fixed or (consumer.position(p, timeout_ms=0) or 0) < ends[p]
            ]
            if not pending:
                break
            if time.monotonic() >= deadline:
                raise BrokerError(
                    f"reading {list(topics)} to their end did not finish in "
                    f"{timeout_s:.0f}s; still behind: "
                    f"{[(p.topic, p.partition) for p in pending][:10]}"
                )
            done = [p for p in parts if p not in pending]
            if done:
                consumer.pause(*done)
            try:
                batches = consumer.poll(timeout_ms=200, max_records=cfg.max_poll_records)
            except kafka_errors.KafkaError as exc:
                raise wrap_error(f"reading {list(topics)}", exc) from exc
            for part in parts:
                high = consumer.highwater(part)
                if part not in fixed and high is not None:
                    ends[part] = max(ends[part], high)
                    fixed.add(part)
            if not reported and len(fixed) == len(parts):
                reported = True
                if on_ends is not None:
                    on_ends(sum(max(0, ends[p] - starts[p]) for p in parts))
            for part, messages in batches.items():
                kept = [to_record(m) for m in messages if m.offset < ends[part]]
                out[part].extend(kept)
                if kept and on_records is not None:
                    on_records(kept)
        return [r for p in parts for r in out[p]]
    finally:
        consumer.close(autocommit=False, timeout_ms=REVOKE_COMMIT_TIMEOUT_MS)
