"""`--mode floor`: the latency floor of this broker and client, the figure the serving targets
are set against (issue 21). A raw pass-through process sits where the workers would: it
consumes the events, produces one answer per event to the recommendations topic (its user and
its event id as the trigger, no compute), flushes and commits; the same paced producer and
timing consumer as `--mode offered` measure it at the same rate. What it measures is what two
broker traversals cost here with no work in between.

The pass-through runs in a process of its own (`python -m workers.lab.bench.floor`), as the
workers do, with the same Kafka client settings (fetch wait, linger, batch size), so the floor
and the workers share everything but the work.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

import orjson

from pipeline.config import Config, TopicsConfig, load, to_env
from pipeline.kafka import KafkaSink, KafkaSource, TableReader, ensure_topics
from workers.lab.bench.load import EventSource, Freshness, collect, offered_load, wait_answered

__all__ = ["floor", "pass_through"]

_READY = "floor pass-through ready"


def floor(
    config: Config, *, rate: float, duration_s: float, users: int, items: int
) -> dict[str, Any]:
    """Offered load at `rate` for `duration_s` through the raw pass-through, on topics of its
    own; the same figures `--mode offered` reports for the workers."""
    topics = TopicsConfig(
        prefix=f"{config.topics.prefix}floor{uuid.uuid4().hex[:4]}.",
        partitions=config.topics.partitions,
    )
    config = config.replace(topics=topics)
    ensure_topics(config.kafka, config.bootstrap_servers, topics)
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMREC_")}
    env.update(to_env(config))
    process = subprocess.Popen(
        [sys.executable, "-m", "workers.lab.bench.floor"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    freshness = Freshness()
    reader = TableReader(
        config.kafka, config.bootstrap_servers, [topics.recommendations], client_id="floor-reader"
    )
    stop = threading.Event()
    collector = threading.Thread(target=collect, args=(reader, freshness, stop), daemon=True)
    try:
        _wait_ready(process)
        collector.start()
        source = EventSource(users, items, seed=11)
        with KafkaSink(config.kafka, config.bootstrap_servers, client_id="floor-producer") as sink:
            _warm_up(sink, topics.events, source, freshness)
            freshness.clear()
            return offered_load(sink, topics.events, source, freshness, rate, duration_s)
    finally:
        stop.set()
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        collector.join(timeout=5)
        reader.close()


def _wait_ready(process: subprocess.Popen[str], timeout_s: float = 60.0) -> None:
    """Until the pass-through has joined its group (it says so on stderr)."""
    assert process.stderr is not None
    deadline = time.monotonic() + timeout_s
    for line in process.stderr:
        if _READY in line:
            # keep draining its stderr so a chatty client can never block it on a full pipe
            threading.Thread(target=process.stderr.read, daemon=True).start()
            return
        if time.monotonic() > deadline:
            break
    raise RuntimeError(f"the floor pass-through did not start (exit status {process.poll()})")


def _warm_up(sink: KafkaSink, topic: str, source: EventSource, freshness: Freshness) -> None:
    """A few events answered end to end before timing: connections and fetch sessions open."""
    for event_id, user, value, seq in source.batch(50):
        sink.send(topic, user.encode(), value)
        freshness.sent(event_id, user, seq, time.time())
    sink.flush(10)
    wait_answered(freshness, 30)


def pass_through(config: Config, stop: threading.Event) -> None:
    """Consume events, produce one answer each (no compute), flush, commit; until `stop`."""
    topics = config.topics
    source = KafkaSource(
        config.kafka, config.bootstrap_servers, f"floor-{uuid.uuid4().hex[:6]}", [topics.events]
    )
    with source, KafkaSink(config.kafka, config.bootstrap_servers, client_id="floor") as sink:
        while not source.assignment():  # join before the bench starts producing
            source.poll(100, 1)
        print(_READY, file=sys.stderr, flush=True)
        while not stop.is_set():
            records = source.poll(config.updater.poll_timeout_ms, config.updater.batch_max_records)
            if not records:
                continue
            for record in records:
                event = orjson.loads(record.value or b"{}")
                answer = {
                    "user_id": event.get("user_id"),
                    "trigger_event_id": event.get("event_id"),
                }
                sink.send(topics.recommendations, record.key, orjson.dumps(answer))
            sink.flush(30)
            source.commit({(r.topic, r.partition): r.offset + 1 for r in records})


def _main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    pass_through(load(), stop)


if __name__ == "__main__":
    _main()
