"""The Kafka adapter: the only module that imports kafka-python.

Builds producers, consumers and admin clients from `KafkaConfig` plus a bootstrap string, with the
latency/group knobs measured in DESIGN.md and one shared security block (`client_settings`).
Offers `ensure_topics`, `KafkaSource` (group consumer with rebalance hooks), `TableReader` (every
partition from the beginning, no group), `KafkaSink` (producer) and `detect_reset`. Wraps
kafka-python errors into BrokerError; records leave as `pipeline.messages.Record`. No loops.

Broker restart, measured on Tansu 0.6.0 (memory) with kafka-python 3.0.12 (every topic, message
and committed offset is lost); the clients survive it without being recreated:
  1. Clients reconnect by themselves (backoff capped at 1 s here).
  2. Tansu ignores allow_auto_topic_creation=false: a group consumer's metadata request recreates
     its topics with the broker's default count (4 partitions, not settable); call
     `ensure_topics` at once anyway. With topics.partitions != 4 (the default is 2) a consumer
     that reached the new broker first would bring a topic back with 4 partitions, and users
     whose partition changes would start from empty state there. Creating the topics right after
     the restart wins that race in practice (chaos broker-loss with 2 partitions: 0 lost, 0 state
     mismatches), but nothing closes it; ensure_topics warns when a count differs.
  3. The idempotent producer's re-init fails fatally; `KafkaSink.flush` resends on a new producer.
  4. The group coordinator forgot the member: commit() returns False until the heartbeat notices
     and the next poll() rejoins (on_revoke/on_assign run again); no committed offsets remain.
  5. Every topic comes back with a new topic id, and a fetch beyond the new log end returns no
     records and no OFFSET_OUT_OF_RANGE, only a lower highwater. Sources rewind the partitions
     of a topic whose id changed, and any partition whose position is beyond its log end, to
     their beginning (`take_rewound()`). The id check also catches a client that reconnects
     only after the new log grew past its old position (the end check cannot).
  6. kafka-python leaks the socket of each refused connect (ResourceWarning when collected).

Tansu 0.6.0 (memory storage) stops serving fetches near the end of a partition that holds more
than ~20,000 record batches (19,000: 66 ms; 19,500: 1.2 s; 21,000: no answer in 90 s), whatever
the record count (60,000 records in 1,200 batches: 2 ms); other partitions are unaffected. The
consumer sees empty fetches and no error. Producers on the embedded broker should batch.

Group membership after a crash, measured on Tansu 0.6.0 with kafka-python 3.0.12 (4 partitions):
  - A JoinGroup is held ~3 s with session_timeout_ms=6000 (~2 s with 2500-4000, ~1 s with 2000).
  - A process that joins while its SIGKILLed predecessor's session is still alive is handed a
    generation led by the dead member, waits in SyncGroup until that session expires, and joins
    again: 10-15 s instead of 3 s. Joining again under the dead member's id (`MemberSlot`) makes
    it one plain join (3 s), whenever it happens, and the other members keep their partitions.
  - Static membership (group_instance_id) costs a 3 s JoinGroup plus a 3 s SyncGroup on every
    join (6 s), and static members send no LeaveGroup on close, so it is not used.
  - The JoinGroup/SyncGroup exchange only advances inside poll(); `KafkaSource.start_join`
    polls in a thread while the worker still imports and loads its model.
  - kafka-python 3.0.12 throws away a join that finished between two polls and joins again
    (+3 s, and a new round for every member); `_keep_finished_joins` patches that.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

with warnings.catch_warnings():
    # kafka-python 3.0.12 loads its schemas with the deprecated importlib.resources.read_text.
    warnings.filterwarnings("ignore", r"(read|open)_text is deprecated", DeprecationWarning)
    from kafka import (AsyncConsumerRebalanceListener, KafkaAdminClient, KafkaConsumer,
                       KafkaProducer, OffsetAndMetadata, TopicPartition)
    from kafka import errors as kafka_errors

from pipeline.config import KafkaConfig, TopicsConfig
from pipeline.errors import BrokerError
from pipeline.messages import Record

__all__ = [
    "client_settings",
    "ensure_topics",
    "describe_group",
    "detect_reset",
    "KafkaSource",
    "TableReader",
    "KafkaSink",
    "MemberSlot",
    "TP",
]

log = logging.getLogger(__name__)

TP = tuple[str, int]
PartitionsCallback = Callable[[list[TP]], None]

# Reconnect quickly after a broker restart (kafka-python's default backs off up to 30 s).
_RECONNECT_BACKOFF_MAX_MS = 1000
_REVOKE_COMMIT_TIMEOUT_MS = 5000
_TABLE_REFRESH_S = 5.0
_END_CHECK_S = 1.0


def _keep_finished_joins() -> bool:
    """Work around kafka-python 3.0.12 throwing away a group join that finished between polls.

    `BaseCoordinator.join_group_async` starts the JoinGroup+SyncGroup exchange as a task and
    awaits it for the poll's timeout only; the next poll re-awaits a task still running, but
    starts a NEW JoinGroup when the task has already finished, discarding its assignment
    (`if self._join_task is None or self._join_task.is_done`). Measured on Tansu: each such join
    costs another ~3 s and makes every other member rejoin too; a worker that is busy between
    polls (start-up, a long batch, a loaded machine) can go round this several times, which is
    how a rebalance storm never settled. The wrapper below finishes a join that succeeded while
    nobody awaited it exactly as the awaiting path would have, then lets kafka-python go on.
    Applied to kafka-python 3.0.x only (checked against 3.0.12's code); returns whether it was.
    """
    try:
        import kafka
        from kafka.coordinator.base import BaseCoordinator
        from kafka.structs import MemberState
    except ImportError:  # pragma: no cover - another kafka-python layout
        return False
    original = getattr(BaseCoordinator, "join_group_async", None)
    if (not str(getattr(kafka, "__version__", "")).startswith("3.0.") or original is None
            or getattr(original, "_streamrec_keeps_finished_joins", False)):
        return False

    async def join_group_async(self: Any, timeout_ms: Any = None) -> Any:
        task = getattr(self, "_join_task", None)
        if task is not None and task.is_done and task.succeeded() and self.need_rejoin():
            self._join_task = None
            with self._lock:
                self.rejoining = False
                self.rejoin_needed = False
                self.state = MemberState.STABLE
                self._enable_heartbeat()
            await self._on_join_complete_async(
                self._generation.generation_id, self._generation.member_id,
                self._generation.protocol, task.value)
            return True
        return await original(self, timeout_ms)

    join_group_async._streamrec_keeps_finished_joins = True  # type: ignore[attr-defined]
    BaseCoordinator.join_group_async = join_group_async  # type: ignore[method-assign]
    return True


KEEPS_FINISHED_JOINS = _keep_finished_joins()


class _Secret(str):
    """A str that prints as *** in repr() (so in dict reprs and kafka-python's debug logs)."""

    def __repr__(self) -> str:
        return "'***'"


def client_settings(cfg: KafkaConfig, bootstrap: str) -> dict[str, Any]:
    """Connection and security kwargs shared by every producer, consumer and admin client.

    Empty settings are left out so kafka-python keeps its defaults. Passwords are passed as a
    str subclass whose repr() is masked: `repr(client_settings(...))` never shows a secret.
    """
    if not bootstrap:
        raise BrokerError("no bootstrap servers given")
    settings: dict[str, Any] = {
        "bootstrap_servers": [part.strip() for part in bootstrap.split(",") if part.strip()],
        "client_id": cfg.client_id,
        "security_protocol": cfg.security_protocol,
        "request_timeout_ms": cfg.request_timeout_ms,
        "reconnect_backoff_max_ms": _RECONNECT_BACKOFF_MAX_MS,
    }
    if cfg.security_protocol.startswith("SASL"):
        settings["sasl_mechanism"] = cfg.sasl_mechanism
        settings["sasl_plain_username"] = cfg.sasl_username
        settings["sasl_plain_password"] = _Secret(cfg.sasl_password)
    if cfg.security_protocol in ("SSL", "SASL_SSL"):
        settings["ssl_check_hostname"] = cfg.ssl_check_hostname
        for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            if getattr(cfg, key):
                settings[key] = getattr(cfg, key)
        if cfg.ssl_password:
            settings["ssl_password"] = _Secret(cfg.ssl_password)
    return settings


def detect_reset(expected_next_offset: int, first_fetched_offset: int | None,
                 highwater: int | None) -> bool:
    """True when a partition's log restarted below what we already consumed (broker reset).

    `expected_next_offset` is the next offset our state needs (committed or snapshotted);
    `first_fetched_offset` the first record offset fetched after resuming (None if none);
    `highwater` the high watermark from the fetch response (None if unknown). On Tansu a
    restart empties every log, so new records arrive again from offset 0.
    """
    if first_fetched_offset is not None and first_fetched_offset < expected_next_offset:
        return True
    return highwater is not None and highwater < expected_next_offset


def _wrap(action: str, exc: Exception) -> BrokerError:
    return BrokerError(f"{action} failed: {type(exc).__name__}: {exc}")


def _admin(cfg: KafkaConfig, bootstrap: str, timeout_s: float) -> KafkaAdminClient:
    try:
        return KafkaAdminClient(**client_settings(cfg, bootstrap),
                                bootstrap_timeout_ms=int(timeout_s * 1000))
    except kafka_errors.KafkaError as exc:
        raise _wrap(f"connecting an admin client to {bootstrap}", exc) from exc


def ensure_topics(cfg: KafkaConfig, bootstrap: str, topics: TopicsConfig, *,
                  timeout_s: float = 30.0) -> list[str]:
    """Create the six streamrec topics that are missing; return the names it created.

    Idempotent (existing topics are kept as they are, whatever their partition count). Waits
    until metadata lists every topic with its partitions. Raises BrokerError.
    """
    names = list(topics.all())
    deadline = time.monotonic() + timeout_s
    admin = _admin(cfg, bootstrap, timeout_s)
    try:
        existing = set(admin.list_topics())
        missing = [name for name in names if name not in existing]
        created: list[str] = []
        if missing:
            spec = {name: {"num_partitions": topics.partitions,
                           "replication_factor": topics.replication_factor} for name in missing}
            response = admin.create_topics(spec, timeout_ms=int(timeout_s * 1000),
                                           raise_errors=False)
            created = _created_topics(response, missing)
        while True:
            described = {t["name"]: t for t in admin.describe_topics(names)}
            ready = [n for n in names if n in described and described[n].get("error_code", 0) == 0
                     and described[n].get("partitions")]
            if len(ready) == len(names):
                break
            if time.monotonic() >= deadline:
                raise BrokerError(f"topics {sorted(set(names) - set(ready))} not visible in "
                                  f"metadata of {bootstrap} after {timeout_s:.0f}s")
            time.sleep(0.05)  # metadata propagation backoff
        if created:
            log.info("created topics %s (%d partitions)", created, topics.partitions)
        for name in names:
            if (count := len(described[name]["partitions"])) != topics.partitions:
                log.warning("topic %s has %d partitions, not the configured %d (created "
                            "elsewhere, or auto-created by a Tansu broker)", name, count,
                            topics.partitions)
        return created
    except kafka_errors.KafkaError as exc:
        raise _wrap(f"creating topics on {bootstrap}", exc) from exc
    finally:
        admin.close()


def describe_group(cfg: KafkaConfig, bootstrap: str, group_id: str, *,
                   timeout_s: float = 10.0) -> dict[str, Any]:
    """The broker's view of a consumer group, for diagnostics (`streamrec chaos`): state and
    each member's id, client id and assigned partitions. Never raises: a failure is returned
    as {"error": ...}. (kafka-python's describe_groups() fails on Tansu 0.6.0, which reports
    authorized operations kafka-python cannot parse, so the request is sent without them.)"""
    from kafka.protocol.admin import DescribeGroupsRequest
    from kafka.protocol.consumer.metadata import ConsumerProtocolAssignment

    try:
        admin = _admin(cfg, bootstrap, timeout_s)
    except BrokerError as exc:
        return {"error": str(exc)}

    async def fetch() -> Any:
        coordinator = (await admin._find_coordinator_ids([group_id]))[group_id]
        request = DescribeGroupsRequest(groups=[group_id], include_authorized_operations=False)
        return await admin._manager.send(request, node_id=coordinator)

    try:
        group = admin._manager.run(fetch).groups[0]
        members = []
        for member in group.members:
            parts: list[list[Any]] = []
            if member.member_assignment:
                decoded = ConsumerProtocolAssignment.decode(member.member_assignment)
                parts = [[topic, sorted(ps)] for topic, ps in decoded.assigned_partitions]
            members.append({"member_id": member.member_id, "client_id": member.client_id,
                            "partitions": parts})
        return {"state": group.group_state, "error_code": group.error_code, "members": members}
    except Exception as exc:  # diagnostics only
        return {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        admin.close()


def _created_topics(response: Any, requested: list[str]) -> list[str]:
    created = []
    for topic in _field(response, "topics"):
        name, code = _field(topic, "name"), _field(topic, "error_code")
        if code == 0:
            created.append(name)
        elif code != kafka_errors.TopicAlreadyExistsError.errno:
            message = _field(topic, "error_message", "")
            raise BrokerError(f"cannot create topic {name!r}: error {code} {message}")
    return [name for name in requested if name in created]


def _field(obj: Any, name: str, default: Any = None) -> Any:
    return obj.get(name, default) if isinstance(obj, Mapping) else getattr(obj, name, default)


def _to_record(message: Any) -> Record:
    return Record(topic=message.topic, partition=message.partition, offset=message.offset,
                  key=message.key, value=message.value, timestamp_ms=int(message.timestamp or 0))


def _flatten(batches: Mapping[TopicPartition, list[Any]]) -> list[Record]:
    return [_to_record(m) for tp in sorted(batches) for m in batches[tp]]


def _consumer_settings(cfg: KafkaConfig, bootstrap: str, client_id: str | None) -> dict[str, Any]:
    settings = client_settings(cfg, bootstrap)
    settings.update(
        client_id=client_id or cfg.client_id,
        enable_auto_commit=False,
        auto_offset_reset=cfg.auto_offset_reset,
        allow_auto_create_topics=False,
        fetch_max_wait_ms=cfg.fetch_max_wait_ms,
        fetch_min_bytes=cfg.fetch_min_bytes,
        max_poll_records=cfg.max_poll_records,
        session_timeout_ms=cfg.session_timeout_ms,
        heartbeat_interval_ms=cfg.heartbeat_interval_ms,
        max_poll_interval_ms=cfg.max_poll_interval_ms,
    )
    return settings


class _TopicIds:
    """Remembers each topic's id (KIP-516) to notice a topic deleted and created again."""

    def __init__(self) -> None:
        self._seen: dict[str, Any] = {}

    def check(self, consumer: KafkaConsumer, topics: Iterable[str]) -> tuple[set[str], set[str]]:
        """(missing, recreated since the last check) among `topics`, from cached metadata."""
        cluster = consumer._cluster  # kafka-python exposes topic ids only on its metadata cache
        known = cluster.topics(exclude_internal_topics=True)
        missing, recreated = set(), set()
        for topic in topics:
            if topic not in known:
                missing.add(topic)
                continue
            topic_id = cluster.topic_id(topic)
            if topic_id is None:
                continue
            previous = self._seen.get(topic)
            if previous is not None and previous != topic_id:
                recreated.add(topic)
            self._seen[topic] = topic_id
        return missing, recreated


class _EndGuard:
    """Rewinds partitions whose log is no longer the one their position points into (a broker
    reset on Tansu), in two ways:

    - the topic was recreated (its id changed): checked after every poll against the client's
      metadata, and the records that poll fetched from those topics are dropped (read again
      from the new log's beginning), so no new record is skipped however long the new log grew
      before we reconnected. Records fetched before the metadata showed the new id are passed
      on; the rewind then reads the ones below them too (late, not lost) and again themselves
      (duplicates, which the updater's dedup drops). Every partition of such a
      topic is reported, owned or not: a rebalance may hand one over later;
    - the position is beyond the log end (checked once a second): real Kafka answers such a
      fetch with OFFSET_OUT_OF_RANGE and kafka-python applies `auto_offset_reset`; Tansu 0.6.0
      answers with no records and a lower highwater. This catches a reset this process did not
      see the old topic id of (it started after the loss).
    """

    def __init__(self, topics: Iterable[str]) -> None:
        self._topics = tuple(topics)
        self._ids = _TopicIds()
        self._next_check = 0.0
        self._rewound: list[TP] = []

    def check(self, consumer: KafkaConsumer, name: str,
              batches: Mapping[TopicPartition, list[Any]]) -> Mapping[TopicPartition, list[Any]]:
        """`batches` less what was fetched from a recreated topic."""
        _, recreated = self._ids.check(consumer, self._topics)
        if recreated:
            parts = [p for p in consumer.assignment() if p.topic in recreated]
            log.warning("%s: topic(s) %s were recreated (new topic id; broker reset?); reading "
                        "%d partition(s) again from the beginning", name, sorted(recreated),
                        len(parts))
            self._rewind(consumer, parts)
            owned = set(parts)
            self._rewound.extend((t, p) for t in sorted(recreated)
                                 for p in sorted(consumer.partitions_for_topic(t) or ())
                                 if TopicPartition(t, p) not in owned)
            batches = {tp: m for tp, m in batches.items() if tp.topic not in recreated}
        now = time.monotonic()
        if now < self._next_check:
            return batches
        self._next_check = now + _END_CHECK_S
        stale = []
        for part in consumer.assignment():
            high = consumer.highwater(part)
            pos = consumer.position(part, timeout_ms=0) if high is not None else None
            if high is not None and pos is not None and pos > high:
                log.warning("%s: %s[%d] position %d is beyond the log end %d (broker reset?); "
                            "reading it again from the beginning", name, part.topic,
                            part.partition, pos, high)
                stale.append(part)
        self._rewind(consumer, stale)
        return batches

    def _rewind(self, consumer: KafkaConsumer, parts: list[TopicPartition]) -> None:
        if parts:
            consumer.seek_to_beginning(*parts)
            self._rewound.extend((part.topic, part.partition) for part in parts)

    def take(self) -> list[TP]:
        rewound, self._rewound = self._rewound, []
        return rewound


class MemberSlot:
    """The group member id one process used, kept on disk so that its successor rejoins as it.

    A SIGKILLed member stays in the group until its session expires; a new process that joins
    meanwhile waits for that (see the module docstring). Its successor instead takes over the
    dead member's id. Slots are files `slot-<k>` in a directory per group, each held with an
    exclusive flock for the life of the process: the kernel drops the lock when the process
    dies, however it dies, so a live process's slot is never taken, and a restarted process
    takes the first free slot, a dead predecessor's. Two live processes never share a member
    id. A stale id costs nothing on Tansu (an unknown id joins as a new member) and one extra
    round trip on Kafka (UNKNOWN_MEMBER_ID, then a fresh join).
    """

    _MAX_SLOTS = 256

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd
        self._written: str | None = None

    @classmethod
    def acquire(cls, directory: Path) -> "MemberSlot | None":
        """The first free slot in `directory` (created if missing); None if none can be had."""
        try:
            directory.mkdir(parents=True, exist_ok=True)
            for k in range(cls._MAX_SLOTS):
                path = directory / f"slot-{k}"
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                return cls(path, fd)
        except OSError as exc:
            log.warning("no member slot under %s (%s); joining as a new member", directory, exc)
        return None

    def read(self, group_id: str) -> str | None:
        """The member id the slot's previous holder had in `group_id`, if any."""
        if self._fd is None:
            return None
        try:
            text = os.pread(self._fd, 4096, 0).decode("utf-8")
        except (OSError, UnicodeDecodeError):
            return None
        group, _, member_id = text.partition("\n")
        member_id = member_id.strip()
        return member_id if group == group_id and member_id else None

    def write(self, group_id: str, member_id: str) -> None:
        """Remember `member_id` (a torn write reads back as no id: a fresh join)."""
        if self._fd is None or not member_id or member_id == self._written:
            return
        data = f"{group_id}\n{member_id}\n".encode()
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, data, 0)
            self._written = member_id
        except OSError as exc:
            log.warning("cannot write member slot %s: %s", self.path, exc)

    def clear(self) -> None:
        """Forget the id (the member left the group cleanly; nobody should rejoin as it)."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
            self._written = None
        except OSError as exc:
            log.warning("cannot clear member slot %s: %s", self.path, exc)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # drops the lock


class _Listener(AsyncConsumerRebalanceListener):
    # Async so that kafka-python awaits it on its IO thread; see KafkaSource for why.
    def __init__(self, source: "KafkaSource") -> None:
        self._source = source

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._source._handle_revoked(revoked, lost=False)

    async def on_partitions_lost(self, lost: set[TopicPartition]) -> None:
        await self._source._handle_revoked(lost, lost=True)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._source._handle_assigned(assigned)


class KafkaSource:
    """A group consumer over `topics`: poll records, commit what was processed.

    No auto-commit: `commit()` takes the next offset to read per partition and commits only
    partitions still assigned. Rebalance hooks: `on_revoke(partitions)` runs before the
    partitions move (persist state there and call `commit()`), `on_assign(partitions)` after
    the new assignment (restore state, maybe `seek()`). Both run inside `poll()` or `close()`
    from the caller's point of view, but kafka-python 3 runs them on its IO thread while the
    caller waits, so a hook may call only `seek()`, `assignment()`, `highwater()` and
    `commit()` (blocking calls such as `position()` would deadlock and raise). A `commit()`
    inside `on_revoke` is sent right after the hook returns, before the partitions are released;
    it is best effort (Tansu answered REBALANCE_IN_PROGRESS once in our tests: logged, and the
    new owner re-reads from the previous commit). After a lost membership (on_partitions_lost)
    the hook still runs but its commit is dropped. A hook's exception is re-raised by the next
    `poll()`. The consumer is created lazily on first use (constructors do no I/O).

    Fast restarts: with `member_dir`, the member id is kept in a `MemberSlot` and a restarted
    process rejoins under its dead predecessor's id. `start_join()` joins in a background
    thread while the caller still loads; partitions assigned before `set_hooks()` are paused
    and handed to `on_assign` when the hooks are set. The background thread ends the moment
    any other thread uses the source.
    """

    def __init__(self, cfg: KafkaConfig, bootstrap: str, group_id: str, topics: Iterable[str], *,
                 on_assign: PartitionsCallback | None = None,
                 on_revoke: PartitionsCallback | None = None,
                 client_id: str | None = None, member_dir: Path | None = None) -> None:
        self._cfg = cfg
        self._bootstrap = bootstrap
        self._group_id = group_id
        self._topics = tuple(topics)
        self._on_assign = on_assign
        self._on_revoke = on_revoke
        self._client_id = client_id
        self._consumer: KafkaConsumer | None = None
        self._io_thread_revoking: threading.Thread | None = None
        self._pending_commit: dict[TP, int] = {}
        self._hook_error: BaseException | None = None
        self._topic_ids = _TopicIds()
        self._end_guard = _EndGuard(self._topics)
        self._member_dir = member_dir
        self._slot: MemberSlot | None = None
        self._consumers_built = 0
        self._keeper: threading.Thread | None = None
        self._keeper_stop = threading.Event()
        self._hook_thread: threading.Thread | None = None
        self._holding = False       # start_join() ran and set_hooks() did not yet
        self._held: set[TP] = set()  # partitions assigned while holding
        self.assigned_at: float | None = None  # time.time() of the first assignment

    @property
    def topics(self) -> tuple[str, ...]:
        return self._topics

    def _client(self) -> KafkaConsumer:
        self._own()
        if self._consumer is None:
            try:
                consumer = KafkaConsumer(**_consumer_settings(self._cfg, self._bootstrap,
                                                              self._client_id),
                                         group_id=self._group_id)
                self._rejoin_as_predecessor(consumer)
                consumer.subscribe(list(self._topics), listener=_Listener(self))
            except kafka_errors.KafkaError as exc:
                raise _wrap(f"connecting consumer group {self._group_id!r} to "
                            f"{self._bootstrap}", exc) from exc
            self._consumer = consumer
            self._consumers_built += 1
        return self._consumer

    def _rejoin_as_predecessor(self, consumer: KafkaConsumer) -> None:
        if self._member_dir is None:
            return
        if self._slot is None:
            self._slot = MemberSlot.acquire(self._member_dir)
        if self._slot is None or self._consumers_built:  # a rebuilt consumer (broker reset)
            return
        member_id = self._slot.read(self._group_id)
        if member_id is None:
            return
        try:
            consumer._coordinator.reset_generation(member_id=member_id)  # kafka-python 3 internal
        except AttributeError as exc:
            log.warning("group %s: cannot rejoin as %s (%s)", self._group_id, member_id, exc)
            return
        log.info("group %s: joining as member %s, the id %s's previous holder had", self._group_id,
                 member_id, self._slot.path.name)

    def _remember_member_id(self) -> None:
        if self._slot is None or self._consumer is None:
            return
        try:
            member_id = self._consumer._coordinator._generation.member_id  # kafka-python 3 internal
        except AttributeError:
            return
        if isinstance(member_id, str):
            self._slot.write(self._group_id, member_id)

    # -- joining early ---------------------------------------------------------------------------
    def start_join(self) -> None:
        """Start joining the group now, polling in a background thread until another thread
        uses this source (normally `set_hooks`). Partitions assigned meanwhile are paused, so
        the thread reads no record. Raises BrokerError when the consumer cannot be built."""
        if self._keeper is not None or self._consumer is not None:
            return
        self._holding = True
        consumer = self._client()
        self._keeper_stop.clear()
        self._keeper = threading.Thread(target=self._keep, args=(consumer,), daemon=True,
                                        name=f"join-{self._group_id}")
        self._keeper.start()

    def _keep(self, consumer: KafkaConsumer) -> None:
        while not self._keeper_stop.is_set():
            try:
                batches = consumer.poll(timeout_ms=100)
            except Exception as exc:  # the first poll() on the loop's thread meets it again
                log.warning("group %s: background join stopped: %s: %s", self._group_id,
                            type(exc).__name__, exc)
                return
            for part, messages in batches.items():
                if messages:  # none expected (paused); never skip a record: fetch it again
                    consumer.seek(part, messages[0].offset)

    def _own(self) -> None:
        """Stop the background join before another thread touches the consumer."""
        keeper = self._keeper
        if keeper is None:
            return
        current = threading.current_thread()
        if current is keeper or current is self._hook_thread:
            return
        self._keeper_stop.set()
        keeper.join()
        self._keeper = None

    def set_hooks(self, *, on_assign: PartitionsCallback | None = None,
                  on_revoke: PartitionsCallback | None = None) -> "KafkaSource":
        """Install the rebalance hooks (ends the background join). Partitions assigned since
        `start_join` reach `on_assign` inside the next `poll()`, like any assignment."""
        self._own()
        self._on_assign, self._on_revoke = on_assign, on_revoke
        self._holding = False
        return self

    def _deliver_held(self, consumer: KafkaConsumer) -> None:
        held, self._held = self._held, set()
        parts = [TopicPartition(*tp) for tp in sorted(held)
                 if TopicPartition(*tp) in consumer.assignment()]
        if not parts:
            return
        consumer.resume(*parts)  # as a fresh assignment: on_assign may pause them itself
        if self._on_assign is not None:
            try:
                self._on_assign([(tp.topic, tp.partition) for tp in parts])
            except BaseException as exc:
                self._hook_error = exc

    def poll(self, timeout_ms: int, max_records: int) -> list[Record]:
        """Up to `max_records` records, grouped by partition in (topic, partition) order.

        Joins the group on first call (~3 s on Tansu). Raises BrokerError, or whatever a
        rebalance hook raised.
        """
        consumer = self._client()
        if self._held and not self._holding:
            self._deliver_held(consumer)
            self._raise_hook_error()
        try:
            batches = consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        except kafka_errors.KafkaError as exc:
            self._raise_hook_error()
            raise _wrap(f"polling {list(self._topics)}", exc) from exc
        self._raise_hook_error()
        return _flatten(self._end_guard.check(consumer, f"group {self._group_id}", batches))

    def take_rewound(self) -> list[TP]:
        """Partitions whose log was replaced since the last call (a broker reset; see the module
        docstring): owned ones already rewound to their beginning (topic recreated, or position
        beyond the log end), and the other partitions of a recreated topic. The caller must not
        resume any of them from offsets stored before."""
        return self._end_guard.take()

    def commit(self, offsets: Mapping[TP, int]) -> bool:
        """Commit `offsets` (next offset to read per partition) for partitions still assigned.

        Returns False when the group refused the commit because this member was rebalanced
        out meanwhile (CommitFailedError, e.g. after a broker reset): the next poll() rejoins,
        and whoever owns the partitions re-reads from the last successful commit. Inside
        on_revoke the commit is queued and sent right after the hook (returns True).
        Raises BrokerError on any other failure.
        """
        if threading.current_thread() is self._io_thread_revoking:
            self._pending_commit.update(offsets)  # sent by _handle_revoked after on_revoke
            return True
        consumer = self._client()
        owned = consumer.assignment()
        to_commit = {TopicPartition(t, p): OffsetAndMetadata(o, "", -1)
                     for (t, p), o in offsets.items() if TopicPartition(t, p) in owned}
        if not to_commit:
            return True
        try:
            consumer.commit(to_commit)
        except kafka_errors.CommitFailedError as exc:
            log.warning("group %s refused the commit of %s (%s); rejoining", self._group_id,
                        sorted(offsets.items()), exc)
            return False
        except kafka_errors.KafkaError as exc:
            raise _wrap(f"committing offsets of group {self._group_id!r}", exc) from exc
        return True

    def seek(self, tp: TP, offset: int) -> None:
        """Make the next poll of `tp` start at `offset`."""
        self._client().seek(TopicPartition(*tp), offset)

    def pause(self, partitions: list[TP]) -> None:
        """Fetch nothing for `partitions` until `resume` (safe inside a rebalance hook: it only
        changes local subscription state)."""
        owned = self._client().assignment()
        parts = [TopicPartition(*tp) for tp in partitions if TopicPartition(*tp) in owned]
        if parts:
            self._client().pause(*parts)

    def resume(self, partitions: list[TP]) -> None:
        owned = self._client().assignment()
        parts = [TopicPartition(*tp) for tp in partitions if TopicPartition(*tp) in owned]
        if parts:
            self._client().resume(*parts)

    def position(self, tp: TP) -> int | None:
        """The next offset poll() returns for `tp` (an assigned partition); None when it could
        not be resolved within request_timeout_ms (broker unreachable)."""
        try:
            return self._client().position(TopicPartition(*tp),
                                           timeout_ms=self._cfg.request_timeout_ms)
        except kafka_errors.KafkaError as exc:
            raise _wrap(f"reading the position of {tp}", exc) from exc

    def assignment(self) -> set[TP]:
        return {(tp.topic, tp.partition) for tp in self._client().assignment()}

    def highwater(self, tp: TP) -> int | None:
        """The log end from the last fetch response for `tp` (None before the first fetch).

        Never `end_offsets()`: on Tansu 0.6.0 it undercounts after a multi-record batch.
        """
        consumer = self._client()
        part = TopicPartition(*tp)
        return consumer.highwater(part) if part in consumer.assignment() else None

    def lag(self) -> dict[TP, int]:
        """Records not yet polled, per assigned partition whose highwater is known."""
        consumer = self._client()
        out: dict[TP, int] = {}
        for part in consumer.assignment():
            high = consumer.highwater(part)
            if high is None:
                continue
            pos = consumer.position(part, timeout_ms=0)
            if pos is not None:
                out[(part.topic, part.partition)] = max(0, high - pos)
        return out

    def check_topics(self) -> tuple[set[str], set[str]]:
        """(missing, recreated) subscribed topics, from the consumer's metadata cache.

        A broker reset shows as topics missing (until `ensure_topics` runs) and then as topics
        recreated (their topic id changed). The recreated set is reported once per change.
        """
        return self._topic_ids.check(self._client(), self._topics)

    def recreate(self) -> None:
        """Close the consumer (without committing) and build a fresh one on the next call.

        For a broker reset: the new consumer rejoins and starts from the committed offsets
        (none on a reset Tansu, so `auto_offset_reset`).
        """
        self._own()
        consumer = self._consumer
        if consumer is not None:
            try:
                self._close_quietly(consumer)
            finally:
                self._consumer = None

    def close(self) -> None:
        """Leave the group (on_revoke runs first, so its commit still counts)."""
        self._own()
        consumer = self._consumer
        try:
            if consumer is not None:
                try:
                    consumer.close(autocommit=False, timeout_ms=self._cfg.request_timeout_ms)
                except kafka_errors.KafkaError as exc:
                    raise _wrap(f"closing consumer group {self._group_id!r}", exc) from exc
                finally:
                    self._consumer = None
        finally:
            if self._slot is not None:  # left the group: a successor must not rejoin as us
                self._slot.clear()
                self._slot.release()
                self._slot = None
        self._raise_hook_error()

    def _close_quietly(self, consumer: KafkaConsumer) -> None:
        if self._slot is not None:
            self._slot.clear()  # that member id belonged to the broker that was lost
        hooks, self._on_revoke = self._on_revoke, None
        try:
            consumer.close(autocommit=False, timeout_ms=_REVOKE_COMMIT_TIMEOUT_MS)
        except Exception as exc:  # the broker is gone; nothing left to release
            log.warning("closing consumer of group %s after broker loss: %s", self._group_id, exc)
        finally:
            self._on_revoke = hooks

    def _raise_hook_error(self) -> None:
        error, self._hook_error = self._hook_error, None
        if error is not None:
            raise error

    def _handle_assigned(self, assigned: set[TopicPartition]) -> None:
        if self.assigned_at is None and assigned:
            self.assigned_at = time.time()
        self._remember_member_id()
        if self._holding:  # before set_hooks: keep them paused for on_assign
            if assigned and self._consumer is not None:
                self._consumer.pause(*assigned)
            self._held.update((tp.topic, tp.partition) for tp in assigned)
            return
        if self._on_assign is None:
            return
        self._hook_thread = threading.current_thread()
        try:
            self._on_assign(sorted((tp.topic, tp.partition) for tp in assigned))
        except BaseException as exc:  # re-raised by poll() on the caller's thread
            self._hook_error = exc
        finally:
            self._hook_thread = None

    async def _handle_revoked(self, revoked: set[TopicPartition], lost: bool) -> None:
        self._held.difference_update((tp.topic, tp.partition) for tp in revoked)
        if self._holding:
            return
        if not revoked or self._on_revoke is None:
            return
        self._io_thread_revoking = self._hook_thread = threading.current_thread()
        try:
            self._on_revoke(sorted((tp.topic, tp.partition) for tp in revoked))
        except BaseException as exc:
            self._hook_error = exc
        finally:
            self._io_thread_revoking = self._hook_thread = None
        pending, self._pending_commit = self._pending_commit, {}
        offsets = {TopicPartition(t, p): OffsetAndMetadata(o, "", -1)
                   for (t, p), o in pending.items() if TopicPartition(t, p) in revoked}
        if not offsets or lost:
            if offsets:
                log.warning("group %s lost %s before committing; they will be re-read",
                            self._group_id, sorted(offsets))
            return
        if self._consumer is None:
            return
        try:
            # kafka-python 3 forbids blocking commit() on its IO thread; await the async variant.
            await self._consumer._coordinator._commit_offsets_sync_async(
                offsets, timeout_ms=_REVOKE_COMMIT_TIMEOUT_MS)
        except Exception as exc:
            log.warning("commit on revoke failed for group %s (%s); the new owner re-reads "
                        "from the previous commit", self._group_id, exc)

    def __enter__(self) -> "KafkaSource":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"KafkaSource(group={self._group_id!r}, topics={list(self._topics)})"


class TableReader:
    """Every partition of `topics` from the beginning, no group, no commits (a global table).

    Every worker instance reads the whole catalog and every model update. Partitions (and
    topics) that appear later are picked up within `refresh_s` and read from their beginning.
    `from_end=True` (for tailing) starts the partitions known at the first call at their end
    instead; on Tansu 0.6.0 that end may fall inside the last multi-record batch, so a few
    old records can show up. Created lazily on first use.
    """

    def __init__(self, cfg: KafkaConfig, bootstrap: str, topics: Iterable[str], *,
                 client_id: str | None = None, refresh_s: float = _TABLE_REFRESH_S,
                 from_end: bool = False) -> None:
        self._from_end = from_end
        self._first_assignment = True
        self._to_skip: set[TopicPartition] = set()
        self._cfg = cfg
        self._bootstrap = bootstrap
        self._topics = tuple(topics)
        self._client_id = client_id
        self._refresh_s = refresh_s
        self._consumer: KafkaConsumer | None = None
        self._next_refresh = 0.0
        self._topic_ids = _TopicIds()
        self._end_guard = _EndGuard(self._topics)

    def _client(self) -> KafkaConsumer:
        if self._consumer is None:
            try:
                self._consumer = KafkaConsumer(**_consumer_settings(self._cfg, self._bootstrap,
                                                                    self._client_id),
                                               group_id=None)
            except kafka_errors.KafkaError as exc:
                raise _wrap(f"connecting a table reader to {self._bootstrap}", exc) from exc
            self._next_refresh = 0.0
        if time.monotonic() >= self._next_refresh:
            self._refresh_assignment(self._consumer)
        return self._consumer

    def _refresh_assignment(self, consumer: KafkaConsumer) -> None:
        self._next_refresh = time.monotonic() + self._refresh_s
        try:
            consumer.topics()  # refreshes cluster metadata for every topic
        except kafka_errors.KafkaError as exc:
            if not getattr(exc, "retriable", False):
                raise _wrap(f"reading metadata from {self._bootstrap}", exc) from exc
            # A stalled or restarting broker: keep reading what is assigned, try again soon.
            log.warning("table reader: metadata from %s not available (%s); retrying",
                        self._bootstrap, exc)
            self._next_refresh = time.monotonic() + _END_CHECK_S
            return
        wanted = {TopicPartition(topic, p) for topic in self._topics
                  for p in consumer.partitions_for_topic(topic) or ()}
        current = consumer.assignment()
        if wanted - current:
            consumer.assign(sorted(wanted | current))  # keeps positions of kept partitions
            added = sorted(wanted - current)
            if self._from_end and self._first_assignment:
                consumer.seek_to_end(*added)  # approximate on Tansu; see _skip_old
                self._to_skip.update(added)
            else:  # partitions that appear later are read in full
                consumer.seek_to_beginning(*added)
        self._first_assignment = False

    def assignment(self) -> set[TP]:
        return {(tp.topic, tp.partition) for tp in self._client().assignment()}

    def poll(self, timeout_ms: int, max_records: int) -> list[Record]:
        """Up to `max_records` records, grouped by partition in (topic, partition) order."""
        consumer = self._client()
        if not consumer.assignment():
            time.sleep(timeout_ms / 1000)  # nothing to read yet; honour the caller's timeout
            return []
        try:
            batches = consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        except kafka_errors.KafkaError as exc:
            raise _wrap(f"polling table {list(self._topics)}", exc) from exc
        batches = self._end_guard.check(consumer, "table reader", batches)
        if self._to_skip:
            batches = self._skip_old(consumer, batches)
        return _flatten(batches)

    def _skip_old(self, consumer: KafkaConsumer, batches: Mapping[TopicPartition, list[Any]]
                  ) -> dict[TopicPartition, list[Any]]:
        """from_end: drop what lies below the first highwater a fetch reports (the true end;
        Tansu's ListOffsets end can fall inside the last batch), then read on from there."""
        kept = dict(batches)
        for part in list(self._to_skip):
            high = consumer.highwater(part)
            if high is None:
                kept.pop(part, None)
                continue
            kept[part] = [m for m in kept.get(part, []) if m.offset >= high]
            if (pos := consumer.position(part, timeout_ms=0)) is not None and pos < high:
                consumer.seek(part, high)
            self._to_skip.discard(part)
        return kept

    def take_rewound(self) -> list[TP]:
        """Partitions re-read from their beginning since the last call (see KafkaSource)."""
        return self._end_guard.take()

    def lag(self) -> dict[TP, int | None]:
        """Records not yet read per partition; None until a fetch reported its highwater."""
        consumer = self._client()
        out: dict[TP, int | None] = {}
        for part in consumer.assignment():
            high = consumer.highwater(part)
            pos = consumer.position(part, timeout_ms=0)
            out[(part.topic, part.partition)] = None if high is None or pos is None else max(
                0, high - pos)
        return out

    def _behind(self) -> dict[TP, tuple[int | None, int | None]]:
        consumer = self._client()
        out = {}
        for part in consumer.assignment():
            high, pos = consumer.highwater(part), consumer.position(part, timeout_ms=0)
            if high is None or pos is None or pos != high:  # pos > high: rewound on next poll
                out[(part.topic, part.partition)] = (pos, high)
        return out

    def catch_up(self, timeout_s: float, *, max_records: int = 10_000) -> list[Record]:
        """Read until every partition's position reaches its highwater; return what was read.

        Topics that do not exist yet count as empty. Raises BrokerError naming the partitions
        still behind after `timeout_s`.
        """
        deadline = time.monotonic() + timeout_s
        self._next_refresh = 0.0
        records: list[Record] = []
        while True:
            records.extend(self.poll(timeout_ms=50, max_records=max_records))
            behind = self._behind()
            if not behind:
                return records
            if time.monotonic() >= deadline:
                raise BrokerError(f"table {list(self._topics)} not caught up after "
                                  f"{timeout_s:.1f}s; (position, highwater) behind: {behind}")

    def check_topics(self) -> tuple[set[str], set[str]]:
        """(missing, recreated) table topics; see KafkaSource.check_topics."""
        return self._topic_ids.check(self._client(), self._topics)

    def recreate(self) -> None:
        """Drop the consumer; the next call builds a fresh one reading from the beginning."""
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            try:
                consumer.close(autocommit=False, timeout_ms=_REVOKE_COMMIT_TIMEOUT_MS)
            except Exception as exc:
                log.warning("closing table reader after broker loss: %s", exc)

    def close(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            consumer.close(autocommit=False, timeout_ms=self._cfg.request_timeout_ms)

    def __enter__(self) -> "TableReader":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TableReader(topics={list(self._topics)})"


class KafkaSink:
    """A producer: `send()` queues, `flush()` waits and raises if any delivery failed.

    acks and linger come from KafkaConfig; the producer is idempotent (Tansu supports it).
    Topics are never auto-created by producing: a missing topic fails the send after
    `max_block_ms`. Created lazily on first send.

    Broker reset (measured on Tansu): the idempotent producer's id is unknown to the new broker,
    kafka-python's re-init fails fatally ("InitProducerIdRequest: UnknownError") and aborts
    every pending batch. So when records fail, `flush()` replaces the producer and sends the
    failed records once more (at-least-once; their order relative to records already
    delivered may change) before it gives up and raises.
    """

    def __init__(self, cfg: KafkaConfig, bootstrap: str, *, client_id: str | None = None,
                 idempotent: bool = True, max_block_ms: int | None = None,
                 resend_on_failure: bool = True) -> None:
        self._cfg = cfg
        self._bootstrap = bootstrap
        self._client_id = client_id
        self._idempotent = idempotent
        self._max_block_ms = max_block_ms if max_block_ms is not None else cfg.request_timeout_ms
        self._resend = resend_on_failure
        self._producer: KafkaProducer | None = None
        self._failed: list[tuple[tuple[str, bytes | None, bytes], BaseException]] = []
        self._lock = threading.Lock()

    def _client(self) -> KafkaProducer:
        if self._producer is None:
            settings = client_settings(self._cfg, self._bootstrap)
            settings.update(
                client_id=self._client_id or self._cfg.client_id,
                acks=-1 if self._cfg.acks == "all" else int(self._cfg.acks),
                linger_ms=self._cfg.linger_ms,
                batch_size=self._cfg.producer_batch_bytes,
                enable_idempotence=self._idempotent and self._cfg.acks == "all",
                allow_auto_create_topics=False,
                max_block_ms=self._max_block_ms,
            )
            try:
                self._producer = KafkaProducer(**settings)
            except kafka_errors.KafkaError as exc:
                raise _wrap(f"connecting a producer to {self._bootstrap}", exc) from exc
        return self._producer

    def send(self, topic: str, key: bytes | None, value: bytes) -> None:
        """Queue one record (partitioned by key). Delivery errors surface in `flush()`.

        Raises BrokerError when the record cannot even be queued (e.g. unknown topic).
        """
        try:
            future = self._client().send(topic, key=key, value=value)
        except kafka_errors.KafkaError as exc:
            raise _wrap(f"producing to {topic!r}", exc) from exc
        future.add_errback(self._on_failed, (topic, key, value))

    def _on_failed(self, record: tuple[str, bytes | None, bytes], exc: BaseException) -> None:
        with self._lock:  # runs on kafka-python's IO thread
            self._failed.append((record, exc))

    def _take_failed(self) -> list[tuple[tuple[str, bytes | None, bytes], BaseException]]:
        with self._lock:
            failed, self._failed = self._failed, []
        return failed

    def flush(self, timeout_s: float) -> None:
        """Wait until every queued record is acknowledged.

        Raises BrokerError when the wait times out or records since the last flush failed
        (after one resend on a fresh producer, see the class docstring).
        """
        if self._producer is None:
            return
        deadline = time.monotonic() + timeout_s
        self._flush_until(deadline)
        failed = self._take_failed()
        if failed and self._resend:
            log.warning("%d record(s) failed (%s: %s); resending them on a new producer",
                        len(failed), type(failed[0][1]).__name__, failed[0][1])
            self.recreate()
            for (topic, key, value), _ in failed:
                self.send(topic, key, value)
            self._flush_until(deadline)
            failed = self._take_failed()
        if failed:
            error = failed[0][1]
            raise BrokerError(f"{len(failed)} record(s) not delivered to {self._bootstrap}; "
                              f"first error: {type(error).__name__}: {error}")

    def _flush_until(self, deadline: float) -> None:
        assert self._producer is not None
        timeout_s = max(0.0, deadline - time.monotonic())
        try:
            self._producer.flush(timeout=timeout_s)
        except kafka_errors.KafkaError as exc:
            raise _wrap(f"flushing the producer to {self._bootstrap}", exc) from exc

    def recreate(self) -> None:
        """Drop the producer (records not yet delivered are lost); the next send builds one."""
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                producer.close(timeout=1.0)
            except Exception as exc:  # a producer in a fatal state may fail to close cleanly
                log.warning("closing a failed producer: %s", exc)

    def close(self, timeout_s: float = 10.0) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            producer.close(timeout=timeout_s)

    def __enter__(self) -> "KafkaSink":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"KafkaSink({self._bootstrap})"
