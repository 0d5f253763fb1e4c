"""Issue 17 item 6, every standard producer is readable: batches a librdkafka client
(confluent-kafka) compressed with gzip, snappy, lz4 or zstd are decoded by the consumers every
worker runs, and by the workers themselves end to end; a producer that does not partition by
murmur2 is counted."""

from __future__ import annotations

import dataclasses
import time
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import orjson
import pytest

confluent_kafka = pytest.importorskip("confluent_kafka")

from pipeline.broker import free_port  # noqa: E402
from pipeline.config import FinetuneConfig, KafkaConfig, TopicsConfig, UpdaterConfig  # noqa: E402
from pipeline.kafka import KafkaSource, RouteCheck, TableReader  # noqa: E402
from pipeline.messages import Record  # noqa: E402
from pipeline.partitioning import partition_for  # noqa: E402
from tests.integration.support import NOW_MS, WITH_FINETUNE, WorkerThreads, config_for, drain  # noqa: E402  # noqa: E402

# After pipeline.kafka, which imports kafka-python with its deprecation warnings silenced.
from kafka import KafkaConsumer, TopicPartition  # noqa: E402  isort: skip
from kafka.record.default_records import DefaultRecordBatch  # noqa: E402  isort: skip

pytestmark = pytest.mark.integration

CODECS = ("gzip", "snappy", "lz4", "zstd")
# kafka-python's codes for the attribute bits of a v2 record batch.
CODEC_IDS = {
    "gzip": DefaultRecordBatch.CODEC_GZIP,
    "snappy": DefaultRecordBatch.CODEC_SNAPPY,
    "lz4": DefaultRecordBatch.CODEC_LZ4,
    "zstd": DefaultRecordBatch.CODEC_ZSTD,
}


def produce_with_librdkafka(
    bootstrap: str,
    codec: str,
    records: list[tuple[str, bytes, bytes]],
    *,
    partitioner: str = "murmur2_random",
    timeout_s: float = 20.0,
) -> None:
    """Produce as a third-party application would: librdkafka, `codec`, and the contract's
    partitioner unless told otherwise; lingers so that batches hold many records."""
    producer = confluent_kafka.Producer(
        {
            "bootstrap.servers": bootstrap,
            "compression.type": codec,
            "partitioner": partitioner,
            "linger.ms": 20,
            "acks": "all",
            "log_level": 3,
        }
    )
    errors: list[object] = []
    try:
        for topic, key, value in records:
            producer.produce(
                topic,
                key=key,
                value=value,
                on_delivery=lambda err, _msg: errors.append(err) if err else None,
            )
            producer.poll(0)
        assert producer.flush(timeout_s) == 0, "records still queued after the flush deadline"
    finally:
        close = getattr(producer, "close", None)  # older releases: freed when collected
        if close is not None:
            close()
    assert not errors, errors


@contextmanager
def codecs_decoded(monkeypatch: pytest.MonkeyPatch) -> Iterator[set[int]]:
    """The compression codes of every compressed batch kafka-python decoded meanwhile (its
    codec check runs once per compressed batch, right before decompressing it)."""
    seen: set[int] = set()
    original = DefaultRecordBatch._assert_has_codec

    def spy(self, compression_type):
        seen.add(compression_type)
        return original(self, compression_type)

    monkeypatch.setattr(DefaultRecordBatch, "_assert_has_codec", spy)
    yield seen


def poll_until(
    source: KafkaSource | TableReader, done: Callable[[list[Record]], bool], timeout_s: float = 30.0
) -> list[Record]:
    deadline = time.monotonic() + timeout_s
    got: list[Record] = []
    while not done(got):
        assert time.monotonic() < deadline, f"only {len(got)} records after {timeout_s}s"
        got.extend(source.poll(timeout_ms=50, max_records=1000))
    return got


def event_value(event_id: str, user: str, item: str, i: int) -> bytes:
    return orjson.dumps(
        {
            "event_id": event_id,
            "user_id": user,
            "item_id": item,
            "type": "click",
            "ts": NOW_MS - 10_000 + i,
        }
    )


def _events(topics: TopicsConfig, tag: str, users: int, per_user: int):
    out = []
    for i in range(users * per_user):
        user = f"{tag}-u{i % users}"
        out.append((topics.events, user.encode(), event_value(f"{tag}-{i}", user, f"m{i % 40}", i)))
    return out


@pytest.mark.parametrize("codec", CODECS)
def test_librdkafka_batches_are_decoded_by_the_workers_consumers(
    kafka_config: KafkaConfig,
    topic_factory: Callable[..., TopicsConfig],
    monkeypatch: pytest.MonkeyPatch,
    codec: str,
) -> None:
    topics = topic_factory(partitions=4)
    bootstrap = kafka_config.bootstrap_servers
    items = [
        (
            topics.items,
            f"{codec}-i{i}".encode(),
            orjson.dumps(
                {
                    "item_id": f"{codec}-i{i}",
                    "title": f"Film {i} " + "long title words " * 8,
                    "ts": NOW_MS,
                }
            ),
        )
        for i in range(60)
    ]
    events = _events(topics, codec, users=17, per_user=12)
    produce_with_librdkafka(bootstrap, codec, items + events)
    misrouted: list[tuple[str, int]] = []
    with codecs_decoded(monkeypatch) as seen:
        with TableReader(kafka_config, bootstrap, [topics.items]) as table:
            read_items = table.catch_up(30.0)
        with KafkaSource(
            kafka_config,
            bootstrap,
            f"g-{codec}",
            [topics.events],
            route_check=RouteCheck([topics.events], lambda t, n: misrouted.append((t, n))),
        ) as source:
            read_events = poll_until(source, lambda got: len(got) >= len(events))
    assert CODEC_IDS[codec] in seen, f"no {codec} batch was decoded (seen: {seen})"
    assert sorted((r.key, r.value) for r in read_items) == sorted((k, v) for _, k, v in items)
    assert sorted((r.key, r.value) for r in read_events) == sorted((k, v) for _, k, v in events)
    # murmur2_random put every user's events where murmur2 says: nothing counted.
    assert all(r.partition == partition_for(r.key, 4) for r in read_events)
    assert misrouted == []


@pytest.mark.parametrize(("setting", "codec"), [("auto", "lz4"), ("lz4", "lz4"), ("zstd", "zstd")])
def test_streamrecs_own_producer_compresses_and_tansu_keeps_the_batches_whole(
    kafka_config: KafkaConfig,
    topic_factory: Callable[..., TopicsConfig],
    monkeypatch: pytest.MonkeyPatch,
    setting: str,
    codec: str,
) -> None:
    """KafkaSink with kafka.compression_type=`setting` through the embedded Tansu: the batches
    read back are still compressed with `codec` (Tansu stores them as sent) and every record
    comes back intact."""
    from pipeline.kafka import KafkaSink

    topics = topic_factory(partitions=2)
    bootstrap = kafka_config.bootstrap_servers
    events = _events(topics, f"own-{setting}", users=9, per_user=20)
    with KafkaSink(dataclasses.replace(kafka_config, compression_type=setting), bootstrap) as sink:
        for topic, key, value in events:
            sink.send(topic, key, value)
        sink.flush(20.0)
    with (
        codecs_decoded(monkeypatch) as seen,
        TableReader(kafka_config, bootstrap, [topics.events]) as table,
    ):
        read = table.catch_up(30.0)
    assert seen == {CODEC_IDS[codec]}
    assert sorted((r.key, r.value) for r in read) == sorted((k, v) for _, k, v in events)


def test_a_producer_that_does_not_partition_by_murmur2_is_counted(
    kafka_config: KafkaConfig, topic_factory: Callable[..., TopicsConfig]
) -> None:
    topics = topic_factory(partitions=4)
    bootstrap = kafka_config.bootstrap_servers
    # librdkafka's own default: CRC32 of the key, so many users land elsewhere than murmur2 says.
    events = _events(topics, "crc", users=40, per_user=3)
    produce_with_librdkafka(bootstrap, "lz4", events, partitioner="consistent_random")
    misplaced = sum(1 for _, key, _ in events if partition_for(key, 4) != _crc_partition(key, 4))
    assert misplaced > 0  # the test means something only if CRC32 disagrees for some keys
    counted: list[int] = []
    with KafkaSource(
        kafka_config,
        bootstrap,
        "g-crc",
        [topics.events],
        route_check=RouteCheck([topics.events], lambda t, n: counted.append(n)),
    ) as source:
        got = poll_until(source, lambda got: len(got) >= len(events))
    assert len(got) == len(events)  # still delivered, to be applied where they arrived
    assert sum(counted) == sum(1 for r in got if r.partition != partition_for(r.key, 4))
    assert sum(counted) == misplaced


def committed_until(
    kafka_config: KafkaConfig,
    group_id: str,
    topic: str,
    done: Callable[[int], bool],
    timeout_s: float = 60.0,
) -> int:
    """The sum of `group_id`'s committed offsets over `topic`, read (without joining the
    group) until `done(sum)` or the deadline."""
    consumer = KafkaConsumer(
        bootstrap_servers=kafka_config.bootstrap_servers,
        group_id=group_id,
        enable_auto_commit=False,
    )
    deadline = time.monotonic() + timeout_s
    try:
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
        while True:
            total = sum(consumer.committed(tp) or 0 for tp in parts)
            if done(total) or time.monotonic() >= deadline:
                return total
            time.sleep(0.1)  # polling the broker's committed offsets, under the deadline
    finally:
        consumer.close()


def _crc_partition(key: bytes, partitions: int) -> int:
    """librdkafka's consistent_random partitioner for a keyed record: CRC32 of the key."""
    return zlib.crc32(key) % partitions


def test_workers_serve_users_whose_events_librdkafka_compressed(
    kafka_config: KafkaConfig,
    topic_factory: Callable[..., TopicsConfig],
    data_dir,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The real updater, scorer and fine-tune worker: items and events in every codec, user
    vectors and recommendations out; the workers' own producers compress with zstd meanwhile.
    A worker that cannot decode a batch dies, and WorkerThreads fails the test with its error.
    Events of a producer on librdkafka's default partitioner are applied where they arrive and
    counted by both workers that read events."""
    topics = topic_factory(partitions=2)
    bootstrap = kafka_config.bootstrap_servers
    ports = {"updater": free_port(), "finetune": free_port()}
    config = config_for(
        dataclasses.replace(kafka_config, compression_type="zstd"),
        topics,
        data_dir,
        updater=UpdaterConfig(metrics_port=ports["updater"], score=False),  # the scorer runs too
    )
    config = config.replace(finetune=FinetuneConfig(metrics_port=ports["finetune"]))
    users = {codec: [f"{codec}-u{u}" for u in range(3)] for codec in CODECS + ("crc",)}
    with codecs_decoded(monkeypatch) as seen, WorkerThreads(config, WITH_FINETUNE):
        for codec in CODECS:
            item = (
                topics.items,
                f"new-{codec}".encode(),
                orjson.dumps(
                    {
                        "item_id": f"new-{codec}",
                        "title": f"Comedy film new in {codec}",
                        "categories": ["Comedy"],
                        "ts": NOW_MS,
                    }
                ),
            )
            produce_with_librdkafka(bootstrap, codec, [item] + _user_events(topics, users[codec]))
        crc = _user_events(topics, users["crc"])
        produce_with_librdkafka(bootstrap, "lz4", crc, partitioner="consistent_random")
        misrouted = sum(1 for _, key, _ in crc if _crc_partition(key, 2) != partition_for(key, 2))
        assert misrouted > 0
        wanted = {u for us in users.values() for u in us}

        def complete(values: list[dict]) -> set[str]:  # users whose 4 events were all applied
            return {v["user_id"] for v in values if len(v["history"]) == 4}

        vectors = drain(
            bootstrap, topics.user_vectors, lambda vs: wanted <= complete(vs), timeout_s=90
        )
        recs = drain(
            bootstrap,
            topics.recommendations,
            lambda vs: wanted <= {r["user_id"] for r in vs},
            timeout_s=90,
        )
        # The fine-tune worker commits only what it consumed: all events, every codec.
        finetune_read = committed_until(
            kafka_config, config.finetune.group_id, topics.events, lambda n: n >= len(wanted) * 4
        )
        counted = {
            name: metric_until(port, "streamrec_misrouted_total", name, topics.events, misrouted)
            for name, port in ports.items()
        }
    assert finetune_read == len(wanted) * 4
    assert wanted <= complete(vectors)
    assert wanted <= {r["user_id"] for r in recs}
    assert all(len(r["items"]) == 10 for r in recs)
    assert {CODEC_IDS[c] for c in CODECS} <= seen  # zstd: also the updater's own vectors
    assert counted == {"updater": misrouted, "finetune": misrouted}


def _user_events(topics: TopicsConfig, users: list[str]) -> list[tuple[str, bytes, bytes]]:
    """Four events for each of `users`, interleaved."""
    return [
        (topics.events, u.encode(), event_value(f"{u}-{i}", u, f"m{i * 7 % 40}", i))
        for i, u in enumerate(users * 4)
    ]


def metric_until(
    port: int, name: str, worker: str, topic: str, want: float, timeout_s: float = 30.0
) -> float:
    """The value of counter `name{topic=..., worker=...}` on a worker's metrics page, read until
    it is `want` or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    prefix = f'{name}{{topic="{topic}",worker="{worker}"}} '
    value = 0.0
    while True:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
            for line in page.read().decode().splitlines():
                if line.startswith(prefix):
                    value = float(line[len(prefix) :])
        if value == want or time.monotonic() >= deadline:
            return value
        time.sleep(0.1)  # between scrapes, under the deadline


def test_bench_codecs_measures_each_codec_on_its_own_broker() -> None:
    """`python -m workers.lab.bench.codecs` at a tiny scale: every figure of every codec."""
    from workers.lab.bench.codecs import format_table, run

    result = run(["none", "lz4"], records=200, rounds=3, repeats=1)
    for payload in ("user_vectors", "events"):
        none, lz4 = (result["median"][payload][c] for c in ("none", "lz4"))
        assert none["compression_rate"] == 1.0 and 0 < lz4["compression_rate"] < 1.0
        assert none["produce_cpu_ms_per_1k"] > 0 and lz4["send_flush_20"]["p50_ms"] > 0
    assert "user_vectors  lz4" in format_table(result)
