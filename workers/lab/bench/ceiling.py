"""`--mode ceiling`: a plain consume -> parse -> produce pass-through with the same Kafka client,
the yardstick the worker figures are reported against (absolute figures on shared machines vary)."""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson

from pipeline.config import Config, TopicsConfig
from pipeline.kafka import KafkaSink, KafkaSource, ensure_topics
from workers.lab.bench.load import EventSource

__all__ = ["ceiling"]


def ceiling(config: Config, n: int) -> dict[str, Any]:
    """Plain consume -> orjson parse -> produce, one process, the client library's own pace."""
    topics = TopicsConfig(
        prefix=f"{config.topics.prefix}ceiling.", partitions=config.topics.partitions
    )
    ensure_topics(config.kafka, config.bootstrap_servers, topics)
    source = EventSource(1000, 100, seed=1)
    with KafkaSink(config.kafka, config.bootstrap_servers, client_id="bench-ceiling") as sink:
        for _event_id, user, value, _seq in source.batch(n):
            sink.send(topics.events, user.encode(), value)
        sink.flush(120)
        consumer = KafkaSource(
            config.kafka, config.bootstrap_servers, f"bench-{uuid.uuid4().hex[:6]}", [topics.events]
        )
        done = 0
        started = None
        try:
            deadline = time.monotonic() + 120
            while done < n and time.monotonic() < deadline:
                records = consumer.poll(50, 5000)
                if records and started is None:
                    started = time.perf_counter()
                for record in records:
                    parsed = orjson.loads(record.value or b"{}")
                    sink.send(topics.user_vectors, record.key, orjson.dumps(parsed))
                done += len(records)
                if records:
                    sink.flush(60)
                    consumer.commit({(r.topic, r.partition): r.offset + 1 for r in records})
            seconds = time.perf_counter() - (started or time.perf_counter())
        finally:
            consumer.close()
    return {
        "messages": done,
        "seconds": round(seconds, 3),
        "msgs_per_s": round(done / seconds, 1) if seconds > 0 else None,
    }
