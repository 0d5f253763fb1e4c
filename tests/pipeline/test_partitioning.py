"""murmur2 partitioning (the contract's partitioner) and the consumers' check of it."""

from __future__ import annotations

import logging
from collections import namedtuple

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.kafka.routing import RouteCheck  # first: its package imports kafka-python quietly
from pipeline.partitioning import KeyRouting, murmur2, partition_for

from kafka.partitioner.default import DefaultPartitioner  # isort: skip
from kafka.partitioner.default import murmur2 as kafka_python_murmur2  # isort: skip

TP = namedtuple("TP", "topic partition")
Message = namedtuple("Message", "key offset")


def _signed(value: int) -> int:
    return value - (1 << 32) if value >= 1 << 31 else value


def test_murmur2_matches_the_java_clients_published_values():
    # org.apache.kafka.common.utils.UtilsTest#testMurmur2 (signed Java ints)
    cases = {
        b"21": -973932308,
        b"foobar": -790332482,
        b"a-little-bit-long-string": -985981536,
        b"a-little-bit-longer-string": -1486304829,
        b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
        b"abc": 479470107,
    }
    assert {key: _signed(murmur2(key)) for key in cases} == cases


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=64))
def test_murmur2_equals_kafka_pythons_for_any_key(key):
    assert murmur2(key) == kafka_python_murmur2(key)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40), st.integers(min_value=1, max_value=64))
def test_partition_for_is_kafka_pythons_default_partitioner(user_id, partitions):
    key = user_id.encode()

    class Cluster:
        def topics(self):
            return {"t"}

        def partitions_for_topic(self, topic):
            return set(range(partitions))

        def available_partitions_for_topic(self, topic):
            return set(range(partitions))

    expected = DefaultPartitioner().partition("t", key, key, b"", b"", Cluster())
    assert partition_for(key, partitions) == expected
    assert KeyRouting().partition_for(key, partitions) == expected


def test_the_memo_stays_bounded_and_right():
    routing = KeyRouting(capacity=8)
    keys = [f"user-{i}".encode() for i in range(50)]
    for _ in range(2):
        assert [routing.partition_for(k, 7) for k in keys] == [partition_for(k, 7) for k in keys]
    assert len(routing._hashes) <= 8


class _Cluster:
    def __init__(self, counts):
        self.counts = counts

    def partitions_for_topic(self, topic):
        n = self.counts.get(topic)
        return None if n is None else set(range(n))


def _batch(topic, keys, partitions, wrong=()):
    """{TP: [Message]} putting each key on its murmur2 partition, or the next one if in `wrong`."""
    out: dict[TP, list[Message]] = {}
    for offset, key in enumerate(keys):
        p = partition_for(key, partitions)
        if key in wrong:
            p = (p + 1) % partitions
        out.setdefault(TP(topic, p), []).append(Message(key, offset))
    return out


def test_route_check_counts_only_misrouted_keyed_records_of_its_topics(caplog):
    seen = []
    check = RouteCheck(["ev"], lambda topic, n: seen.append((topic, n)))
    keys = [f"user-{i}".encode() for i in range(40)]
    cluster = _Cluster({"ev": 4, "items": 4})
    assert check.check(cluster, _batch("ev", keys, 4)) == 0
    assert check.check(cluster, _batch("items", keys, 4, wrong=keys)) == 0  # not checked
    batch = _batch("ev", keys, 4, wrong=keys[:3])
    batch.setdefault(TP("ev", 0), []).append(Message(None, 99))  # no key: no promise
    with caplog.at_level(logging.WARNING, logger="pipeline.kafka.routing"):
        assert check.check(cluster, batch) == 3
    assert seen == [("ev", 3)] and check.total == 3
    assert "murmur2_random" in caplog.text and "ev: 3" in caplog.text


def test_route_check_judges_by_the_current_partition_count_and_skips_unknown_topics():
    check = RouteCheck(["ev"])
    keys = [f"user-{i}".encode() for i in range(40)]
    on_two = _batch("ev", keys, 2)
    assert check.check(_Cluster({"ev": 2}), on_two) == 0
    assert check.check(_Cluster({"ev": 4}), on_two) > 0  # the topic came back with 4
    assert check.check(_Cluster({}), on_two) == 0  # no metadata: no verdict
    assert check.check(_Cluster({"ev": 1}), on_two) == 0


def test_route_check_logs_at_most_once_per_interval_with_the_count(caplog):
    now = [1000.0]
    check = RouteCheck(["ev"], log_every_s=60.0, clock=lambda: now[0])
    keys = [f"user-{i}".encode() for i in range(20)]
    cluster = _Cluster({"ev": 4})
    with caplog.at_level(logging.WARNING, logger="pipeline.kafka.routing"):
        for _ in range(10):  # the first logs at once; the next nine wait for the interval
            check.check(cluster, _batch("ev", keys, 4, wrong=keys[:2]))
            now[0] += 5
        assert len(caplog.records) == 1 and "2 record(s)" in caplog.messages[0]
        now[0] += 60
        check.check(cluster, _batch("ev", keys, 4))  # nothing new: the held count is logged
    assert len(caplog.records) == 2 and "18 record(s)" in caplog.messages[1]
    assert check.total == 20
