"""pipeline.kafka against a real Tansu broker: produce, group consume + commit, resume,
rebalance, highwater after a multi-record batch, global table catch-up, broker restart."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from pipeline.broker import EmbeddedBroker
from pipeline.config import KafkaConfig, TopicsConfig
from pipeline.kafka import TP, KafkaSink, KafkaSource, TableReader, ensure_topics
from pipeline.logtracker import LogTracker
from pipeline.messages import Record

pytestmark = pytest.mark.integration

TopicFactory = Callable[..., TopicsConfig]


def _produce(sink: KafkaSink, topic: str, values: list[bytes], *, keys: int = 37) -> None:
    for i, value in enumerate(values):
        sink.send(topic, f"k{i % keys}".encode(), value)
    sink.flush(timeout_s=10)


def _poll_until(
    sources: list[KafkaSource | TableReader], done: Callable[[], bool], timeout_s: float = 20.0
) -> list[Record]:
    """Poll every source in turn until `done()`; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    got: list[Record] = []
    while not done():
        assert time.monotonic() < deadline, f"condition not met after {timeout_s}s"
        for source in sources:
            got.extend(source.poll(timeout_ms=50, max_records=500))
    return got


def _drain(source: KafkaSource | TableReader, count: int, timeout_s: float = 20.0) -> list[Record]:
    got: list[Record] = []

    def enough() -> bool:
        got.extend(source.poll(timeout_ms=50, max_records=500))
        return len(got) >= count

    _poll_until([], enough, timeout_s)
    return got


def _next_offsets(records: list[Record]) -> dict[TP, int]:
    out: dict[TP, int] = {}
    for r in records:
        out[(r.topic, r.partition)] = max(out.get((r.topic, r.partition), 0), r.offset + 1)
    return out


def test_produce_consume_commit_then_resume_in_same_group(
    kafka_config: KafkaConfig, topic_factory: TopicFactory
) -> None:
    topics = topic_factory(partitions=4)
    bootstrap = kafka_config.bootstrap_servers
    with KafkaSink(kafka_config, bootstrap) as sink:
        _produce(sink, topics.events, [f"v{i}".encode() for i in range(1000)])
        assigned: list[list[TP]] = []
        with KafkaSource(
            kafka_config, bootstrap, "g-resume", [topics.events], on_assign=assigned.append
        ) as first:
            records = _drain(first, 1000)
            assert sorted(r.value for r in records) == sorted(f"v{i}".encode() for i in range(1000))
            assert len({(r.partition, r.offset) for r in records}) == 1000
            assert assigned[0] == [(topics.events, p) for p in range(4)]
            committed = _next_offsets(records)
            assert sum(committed.values()) == 1000
            assert first.lag() == {tp: 0 for tp in committed}
            first.commit(committed)

        _produce(sink, topics.events, [f"new{i}".encode() for i in range(50)])
        with KafkaSource(kafka_config, bootstrap, "g-resume", [topics.events]) as second:
            resumed = _drain(second, 50)
            more = second.poll(timeout_ms=200, max_records=500)
    assert sorted(r.value for r in resumed + more) == sorted(f"new{i}".encode() for i in range(50))
    assert all(r.offset >= committed[(r.topic, r.partition)] for r in resumed)


class _Poller(threading.Thread):
    """Polls one KafkaSource on its own thread (as a separate worker would) until stopped."""

    def __init__(self, source: KafkaSource) -> None:
        super().__init__(daemon=True)
        self.source = source
        self.records: list[Record] = []
        self.owned: set[TP] = set()
        self.error: BaseException | None = None
        self.halt = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        try:
            while not self.halt.is_set():
                got = self.source.poll(timeout_ms=50, max_records=500)
                with self.lock:
                    self.records.extend(got)
                    self.owned = self.source.assignment()
        except BaseException as exc:  # reported by the test thread
            self.error = exc

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=30)
        assert not self.is_alive()
        if self.error is not None:
            raise self.error


def test_rebalance_splits_partitions_and_runs_revoke_before_the_move(
    kafka_config: KafkaConfig, topic_factory: TopicFactory
) -> None:
    topics = topic_factory(partitions=4)
    bootstrap = kafka_config.bootstrap_servers
    sink = KafkaSink(kafka_config, bootstrap)
    _produce(sink, topics.events, [f"v{i}".encode() for i in range(200)])
    seen: list[Record] = []
    events: list[tuple[str, str, list[TP]]] = []

    def revoke_and_commit(parts: list[TP]) -> None:
        events.append(("one", "revoke", parts))
        # Works on Kafka; Tansu 0.6.0 answers REBALANCE_IN_PROGRESS (logged, not raised).
        one.commit(_next_offsets([r for r in seen if (r.topic, r.partition) in parts]))

    def member(name: str, **hooks: Callable[[list[TP]], None]) -> KafkaSource:
        """A consumer in group g-split whose assignments are logged as `name`'s."""
        return KafkaSource(
            kafka_config,
            bootstrap,
            "g-split",
            [topics.events],
            on_assign=lambda p: events.append((name, "assign", p)),
            **hooks,
        )

    one = member("one", on_revoke=revoke_and_commit)
    two = member("two")
    try:
        seen.extend(_drain(one, 200))  # `one` owns all four partitions and reads everything
        committed = _next_offsets(seen)
        one.commit(committed)  # what the loop does after every batch
        _produce(sink, topics.events, [f"w{i}".encode() for i in range(40)])
        seen.extend(_drain(one, 40))  # read, not committed yet: on_revoke tries

        pollers = [_Poller(one), _Poller(two)]
        for poller in pollers:
            poller.start()
        deadline = time.monotonic() + 30
        while True:
            with pollers[0].lock, pollers[1].lock:
                owned = (set(pollers[0].owned), set(pollers[1].owned))
            if len(owned[0]) == len(owned[1]) == 2:
                break
            assert time.monotonic() < deadline, f"no 2/2 split after 30s: {owned}"
            assert all(p.is_alive() for p in pollers), [p.error for p in pollers]
            time.sleep(0.05)  # checking a condition on a deadline, not synchronising
        for poller in pollers:
            poller.stop()
    finally:
        one.close()
        two.close()
        sink.close()

    assert owned[0] | owned[1] == {(topics.events, p) for p in range(4)}
    assert not owned[0] & owned[1]
    revoked_at = next(i for i, e in enumerate(events) if e[:2] == ("one", "revoke"))
    assert ("two", "assign") in [e[:2] for e in events[revoked_at:]]
    assert ("two", "assign") not in [e[:2] for e in events[:revoked_at]]
    # `two` resumes from `one`'s commits: it never sees a record below them, and at most the
    # 40 records whose commit in on_revoke was refused again.
    reread = pollers[1].records
    assert all(r.offset >= committed.get((r.topic, r.partition), 0) for r in reread)
    assert {r.value for r in reread} <= {f"w{i}".encode() for i in range(40)}
    assert pollers[0].records == []


def test_highwater_after_multi_record_batch(
    kafka_config: KafkaConfig, topic_factory: TopicFactory
) -> None:
    topics = topic_factory(partitions=1)
    bootstrap = kafka_config.bootstrap_servers
    batching = KafkaConfig(**{**kafka_config.__dict__, "linger_ms": 200})
    with KafkaSink(batching, bootstrap) as sink:
        _produce(sink, topics.items, [b"a", b"b", b"c", b"d", b"e"], keys=1)  # one 5-record batch
    tp = (topics.items, 0)
    with KafkaSource(kafka_config, bootstrap, "g-hw", [topics.items]) as source:
        records = _drain(source, 5)
        assert [r.offset for r in records] == [0, 1, 2, 3, 4]
        assert source.highwater(tp) == 5  # end_offsets() says 1 here on Tansu 0.6.0
        assert source.position(tp) == 5
        assert source.lag() == {tp: 0}
    with TableReader(kafka_config, bootstrap, [topics.items]) as table:
        assert [r.value for r in table.catch_up(timeout_s=10)] == [b"a", b"b", b"c", b"d", b"e"]
        assert table.lag() == {tp: 0}


def test_table_reader_catches_up_and_finds_topics_created_later(
    kafka_config: KafkaConfig, topic_factory: TopicFactory
) -> None:
    topics = topic_factory(partitions=4)
    later = topic_factory(partitions=2, create=False)
    bootstrap = kafka_config.bootstrap_servers
    with (
        KafkaSink(kafka_config, bootstrap) as sink,
        TableReader(
            kafka_config,
            bootstrap,
            [topics.items, topics.model_updates, later.items],
            refresh_s=0.2,
        ) as table,
    ):
        _produce(sink, topics.items, [f"item{i}".encode() for i in range(300)])
        _produce(sink, topics.model_updates, [b"m1", b"m2"], keys=1)
        caught = table.catch_up(timeout_s=10)
        assert sorted(r.value for r in caught if r.topic == topics.items) == sorted(
            f"item{i}".encode() for i in range(300)
        )
        assert [r.value for r in caught if r.topic == topics.model_updates] == [b"m1", b"m2"]
        assert len(table.assignment()) == 8
        assert table.poll(timeout_ms=100, max_records=100) == []

        with TableReader(
            kafka_config, bootstrap, [topics.items, later.items], from_end=True, refresh_s=0.2
        ) as tail:
            # Starts at the end: once every partition reported its highwater, nothing old shows.
            assert tail.wait_at_end(10) and None not in tail.lag().values()
            assert tail.poll(timeout_ms=100, max_records=100) == []
            ensure_topics(kafka_config, bootstrap, later)
            _produce(sink, later.items, [b"x", b"y"])
            _produce(sink, topics.items, [b"z"])
            fresh = _drain(table, 3)
            assert sorted(r.value for r in fresh) == [b"x", b"y", b"z"]
            assert len(table.assignment()) == 10
            # The tail skips the 300 old items but reads the topic that appeared later in full.
            assert sorted(r.value for r in _drain(tail, 3)) == [b"x", b"y", b"z"]


# kafka-python 3.0.12 leaks the socket of every refused connect (kafka/net/inet.py); the GC
# closes it later with a ResourceWarning (broker_factory collects at teardown).
@pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning")
def test_broker_restart_is_detected_and_clients_continue(
    kafka_config: KafkaConfig,
    topic_factory: TopicFactory,
    broker_factory: Callable[..., EmbeddedBroker],
) -> None:
    broker = broker_factory()
    bootstrap = broker.bootstrap
    cfg = KafkaConfig(**{**kafka_config.__dict__, "bootstrap_servers": bootstrap})
    topics = topic_factory(partitions=2, create=False)
    ensure_topics(cfg, bootstrap, topics)
    with (
        KafkaSink(cfg, bootstrap) as sink,
        KafkaSource(cfg, bootstrap, "g-restart", [topics.events]) as source,
        TableReader(cfg, bootstrap, [topics.items], refresh_s=0.2) as table,
    ):
        _produce(sink, topics.events, [f"old{i}".encode() for i in range(100)])
        _produce(sink, topics.items, [f"item{i}".encode() for i in range(10)])
        expected = _next_offsets(_drain(source, 100))
        source.commit(expected)
        assert len(table.catch_up(timeout_s=10)) == 10
        assert source.check_topics() == (set(), set())

        broker.kill()
        restarted = broker_factory(port=broker.cfg.port)  # memory storage: everything is gone
        # Tansu ignores allow_auto_topic_creation=false: the clients' metadata requests may
        # already have recreated some topics (with the broker's default partition count).
        assert set(ensure_topics(cfg, bootstrap, topics)) <= set(topics.all())
        _produce(sink, topics.events, [f"new{i}".encode() for i in range(20)])  # resent inside
        _produce(sink, topics.items, [b"after"])

        after = _drain(source, 20)
        assert sorted(r.value for r in after) == sorted(f"new{i}".encode() for i in range(20))
        first = {}
        for r in after:
            first.setdefault((r.topic, r.partition), r.offset)
        logs = LogTracker()  # what the loop would conclude from these offsets
        logs.persisted(expected)
        assert any(logs.first_fetched(tp, offset) for tp, offset in first.items())
        assert source.check_topics() == (set(), {topics.events})
        # The first commit may be refused until the consumer notices it must rejoin.
        _poll_until([source], lambda: source.commit(_next_offsets(after)))
        assert [r.value for r in _drain(table, 1)] == [b"after"]
        # Tansu serves no OFFSET_OUT_OF_RANGE: the reader saw position > highwater and rewound.
        assert table.take_rewound() and set(table.take_rewound()) == set()
    assert restarted.running()


_MEMBER_SCRIPT = """
import sys, time
from pathlib import Path
from pipeline.config import KafkaConfig
from pipeline.kafka import KafkaSource
cfg = KafkaConfig(bootstrap_servers=sys.argv[1], client_id="crashing", session_timeout_ms=6000,
                  heartbeat_interval_ms=1000, request_timeout_ms=10000)
source = KafkaSource(cfg, sys.argv[1], sys.argv[2], [sys.argv[3]], member_dir=Path(sys.argv[4]))
while not source.assignment():
    source.poll(100, 100)
print("assigned", flush=True)
while True:
    source.poll(100, 100)
"""


def test_early_join_holds_partitions_and_a_successor_rejoins_as_the_dead_member(
    kafka_config: KafkaConfig, topic_factory: TopicFactory, tmp_path
) -> None:
    """start_join() joins in the background with every partition paused (no record is read or
    skipped before set_hooks); a process SIGKILLed in the group leaves its member id in its
    MemberSlot and the next source in that directory rejoins under it."""
    import signal
    import subprocess
    import sys

    from pipeline.kafka import MemberSlot

    topics = topic_factory(partitions=4)
    bootstrap = kafka_config.bootstrap_servers
    members = tmp_path / "members"
    with KafkaSink(kafka_config, bootstrap) as sink:
        _produce(sink, topics.events, [f"v{i}".encode() for i in range(60)])
    with subprocess.Popen(
        [sys.executable, "-c", _MEMBER_SCRIPT, bootstrap, "g-crash", topics.events, str(members)],
        stdout=subprocess.PIPE,
        text=True,
    ) as child:
        try:
            assert child.stdout is not None and child.stdout.readline().strip() == "assigned"
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(10)
    slot = MemberSlot.acquire(members)  # the dead child's slot, free again
    assert slot is not None
    dead_member = slot.read("g-crash")
    slot.release()
    assert dead_member

    assigned: list[list[TP]] = []
    source = KafkaSource(kafka_config, bootstrap, "g-crash", [topics.events], member_dir=members)
    try:
        source.start_join()
        deadline = time.monotonic() + 30
        while source.assigned_at is None:
            assert time.monotonic() < deadline, "no assignment in the background after 30s"
            time.sleep(0.05)  # waiting on a deadline for the background thread
        source.set_hooks(on_assign=assigned.append)
        got = _drain(source, 60)
        assert sorted(r.value for r in got) == sorted(f"v{i}".encode() for i in range(60))
        assert assigned and sorted(assigned[0]) == [(topics.events, p) for p in range(4)]
        slot_text = next(members.glob("slot-*")).read_text()
        assert dead_member in slot_text  # rejoined as the dead member
    finally:
        source.close()
    assert all(not p.read_text() for p in members.glob("slot-*"))  # left cleanly: forgotten


def test_a_join_that_finished_between_polls_is_kept_not_sent_again(
    kafka_config: KafkaConfig, topic_factory: TopicFactory, monkeypatch
) -> None:
    """kafka-python 3.0.12 discards a JoinGroup/SyncGroup exchange that completed while no
    poll() was waiting for it and joins again (pipeline.kafka.client._keep_finished_joins)."""
    from kafka.coordinator.base import BaseCoordinator

    from pipeline import kafka as adapter

    assert adapter.KEEPS_FINISHED_JOINS
    attempts: list[int] = []
    original = BaseCoordinator._do_join_and_sync_async

    async def counted(self):  # type: ignore[no-untyped-def]
        attempts.append(1)
        return await original(self)

    monkeypatch.setattr(BaseCoordinator, "_do_join_and_sync_async", counted)
    topics = topic_factory(partitions=2)
    source = KafkaSource(
        kafka_config, kafka_config.bootstrap_servers, "g-finished-join", [topics.events]
    )
    try:
        coordinator = source._client()._coordinator
        deadline = time.monotonic() + 30
        while True:  # poll briefly until an exchange is in flight, then stop polling
            source.poll(timeout_ms=10, max_records=10)
            assert not source.assignment(), "joined within a 10 ms poll; nothing to test"
            assert time.monotonic() < deadline, "no join exchange finished successfully"
            task = coordinator._join_task
            if task is None:
                continue
            while not task.is_done:  # it finishes while nobody polls
                assert time.monotonic() < deadline, "the join never finished"
                time.sleep(0.05)
            if task.succeeded():  # not the MEMBER_ID_REQUIRED round trip
                break
        sent = len(attempts)
        while not source.assignment():
            source.poll(timeout_ms=10, max_records=10)
            assert time.monotonic() < deadline
        assert len(attempts) == sent  # the finished exchange was used, no JoinGroup again
    finally:
        source.close()


def test_a_consumer_starved_by_a_long_log_raises_its_fetch_wait(
    kafka_config: KafkaConfig, topic_factory: TopicFactory
) -> None:
    """Tansu lists a partition's whole log inside every fetch and answers nothing once that
    takes longer than the fetch wait. With a 1 ms wait 8,000 one-record batches are enough
    (2,000-5,000 starved it here; with 10 ms, the default, ~20,000): a consumer near the end
    that stays at the configured wait gets nothing, one allowed to raise it reads on."""
    import dataclasses

    topics = topic_factory(partitions=1)
    bootstrap = kafka_config.bootstrap_servers
    with KafkaSink(kafka_config, bootstrap) as sink:
        for i in range(8000):
            sink.send(topics.items, b"k", f"v{i}".encode())
            sink.flush(timeout_s=10)  # one batch each
        starving = dataclasses.replace(
            kafka_config, fetch_max_wait_ms=1, fetch_max_wait_ceiling_ms=1
        )
        adaptive = dataclasses.replace(
            kafka_config, fetch_max_wait_ms=1, fetch_max_wait_ceiling_ms=1000
        )
        with (
            TableReader(starving, bootstrap, [topics.items], from_end=True) as stuck,
            TableReader(adaptive, bootstrap, [topics.items], from_end=True) as table,
        ):
            assert stuck.wait_at_end(10) and table.wait_at_end(10)
            _produce(sink, topics.items, [b"new1", b"new2"])
            assert sorted(r.value for r in _drain(table, 2, timeout_s=20)) == [b"new1", b"new2"]
            deadline, got = time.monotonic() + 3, []
            while time.monotonic() < deadline:
                got.extend(stuck.poll(timeout_ms=100, max_records=100))
            assert got == []  # the control: at the configured wait nothing ever arrives
    with KafkaSource(adaptive, bootstrap, "g-starved", [topics.items]) as source:
        _poll_until([source], lambda: bool(source.assignment()))
        source.seek((topics.items, 0), 7995)
        assert [r.offset for r in _drain(source, 7, timeout_s=20)] == list(range(7995, 8002))
        assert source.fetch_wait_ms > 1


def test_passthrough_settings_are_taken_by_real_producer_consumer_and_admin_clients(
    kafka_config: KafkaConfig, topic_factory: Callable[..., TopicsConfig]
) -> None:
    """kafka-python refuses settings it does not know: a round trip with settings only the
    producer, only the consumer, and every client knows shows each got only its own."""
    import dataclasses

    cfg = dataclasses.replace(
        kafka_config,
        passthrough=(
            ("check_crcs", "false"),
            ("connections_max_idle_ms", "60000"),
            ("delivery_timeout_ms", "60000"),
            ("metadata_max_age_ms", "10000"),
        ),
    )
    topics = topic_factory(partitions=2, create=False)
    assert len(ensure_topics(cfg, cfg.bootstrap_servers, topics)) == 6  # the admin client
    values = [f"v{i}".encode() for i in range(50)]
    with KafkaSink(cfg, cfg.bootstrap_servers) as sink:
        _produce(sink, topics.events, values)
    with KafkaSource(cfg, cfg.bootstrap_servers, "g-passthrough", [topics.events]) as source:
        got = _drain(source, len(values))
    assert sorted(r.value for r in got) == sorted(values)
