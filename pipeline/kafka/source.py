"""`KafkaSource`: the group consumer behind every worker's loop, with rebalance hooks, commits,
pause/resume, lag, and rewinds after a broker reset.

Size: one kafka-python consumer and everything the loop's Source protocol asks of it;
what could stand alone already does (fetchwait, membership, resets, routing).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from pipeline.config import KafkaConfig
from pipeline.kafka.client import (
    REVOKE_COMMIT_TIMEOUT_MS,
    TP,
    AsyncConsumerRebalanceListener,
    ClosingClient,
    KafkaConsumer,
    OffsetAndMetadata,
    PartitionsCallback,
    TopicPartition,
    flatten,
    kafka_errors,
    wrap_error,
)
from pipeline.kafka.fetchwait import FetchWait
from pipeline.kafka.membership import MemberSlot
from pipeline.kafka.resets import EndGuard, TopicIds
from pipeline.kafka.routing import RouteCheck
from pipeline.kafka.settings import consumer_settings
from pipeline.messages import Record

__all__ = ["KafkaSource"]

log = logging.getLogger(__name__)


class _Listener(AsyncConsumerRebalanceListener):  # type: ignore[misc]  # kafka-python: untyped
    # Async so that kafka-python awaits it on its IO thread; see KafkaSource for why.
    def __init__(self, source: KafkaSource) -> None:
        self._source = source

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._source._handle_revoked(revoked, lost=False)

    async def on_partitions_lost(self, lost: set[TopicPartition]) -> None:
        await self._source._handle_revoked(lost, lost=True)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._source._handle_assigned(assigned)


class KafkaSource(ClosingClient):
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

    Routing: with `route_check`, every polled record of its topics is checked against the
    partition murmur2 gives its key (`RouteCheck`: counted and logged, still delivered).
    """

    def __init__(
        self,
        cfg: KafkaConfig,
        bootstrap: str,
        group_id: str,
        topics: Iterable[str],
        *,
        on_assign: PartitionsCallback | None = None,
        on_revoke: PartitionsCallback | None = None,
        client_id: str | None = None,
        member_dir: Path | None = None,
        route_check: RouteCheck | None = None,
    ) -> None:
        self._cfg = cfg
        self._route_check = route_check
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
        self._topic_ids = TopicIds()
        self._fetch_wait = FetchWait(cfg.fetch_max_wait_ms, cfg.fetch_wait_ceiling_ms)
        # After a replaced log (broker reset) the long logs are gone: back to the set wait.
        self._end_guard = EndGuard(self._topics, on_replaced=self._fetch_wait.reset)
        self._member_dir = member_dir
        self._slot: MemberSlot | None = None
        self._consumers_built = 0
        self._keeper: threading.Thread | None = None
        self._keeper_stop = threading.Event()
        self._hook_thread: threading.Thread | None = None
        self._holding = False  # start_join() ran and set_hooks() did not yet
        self._held: set[TP] = set()  # partitions assigned while holding
        self.assigned_at: float | None = None  # time.time() of the first assignment

    @property
    def topics(self) -> tuple[str, ...]:
        return self._topics

    def _client(self) -> KafkaConsumer:
        self._own()
        if self._consumer is None:
            try:
                consumer = KafkaConsumer(
                    **consumer_settings(self._cfg, self._bootstrap, self._client_id),
                    group_id=self._group_id,
                )
                self._rejoin_as_predecessor(consumer)
                consumer.subscribe(list(self._topics), listener=_Listener(self))
            except kafka_errors.KafkaError as exc:
                raise wrap_error(
                    f"connecting consumer group {self._group_id!r} to {self._bootstrap}", exc
                ) from exc
            self._consumer = consumer
            self._consumers_built += 1
            self._fetch_wait.reset()  # a new consumer asks for the configured wait again
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
        log.info(
            "group %s: joining as member %s, the id %s's previous holder had",
            self._group_id,
            member_id,
            self._slot.path.name,
        )

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
        self._keeper = threading.Thread(
            target=self._keep, args=(consumer,), daemon=True, name=f"join-{self._group_id}"
        )
        self._keeper.start()

    def _keep(self, consumer: KafkaConsumer) -> None:
        while not self._keeper_stop.is_set():
            try:
                batches = consumer.poll(timeout_ms=100)
            except Exception as exc:  # the first poll() on the loop's thread meets it again
                log.warning(
                    "group %s: background join stopped: %s: %s",
                    self._group_id,
                    type(exc).__name__,
                    exc,
                )
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

    def set_hooks(
        self,
        *,
        on_assign: PartitionsCallback | None = None,
        on_revoke: PartitionsCallback | None = None,
    ) -> KafkaSource:
        """Install the rebalance hooks (ends the background join). Partitions assigned since
        `start_join` reach `on_assign` inside the next `poll()`, like any assignment."""
        self._own()
        self._on_assign, self._on_revoke = on_assign, on_revoke
        self._holding = False
        return self

    def _deliver_held(self, consumer: KafkaConsumer) -> None:
        held, self._held = self._held, set()
        parts = [
            TopicPartition(*tp)
            for tp in sorted(held)
            if TopicPartition(*tp) in consumer.assignment()
        ]
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
        rebalance hook raised. `max_records` <= 0 (a caller whose batch is already full) is an
        empty list at once: kafka-python raises ValueError for it.
        """
        if max_records <= 0:
            return []
        consumer = self._client()
        if self._held and not self._holding:
            self._deliver_held(consumer)
            self._raise_hook_error()
        try:
            batches = consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        except kafka_errors.KafkaError as exc:
            self._raise_hook_error()
            raise wrap_error(f"polling {list(self._topics)}", exc) from exc
        self._raise_hook_error()
        batches = self._end_guard.check(consumer, f"group {self._group_id}", batches)
        if self._route_check is not None and batches:
            self._route_check.check(consumer._cluster, batches)  # kafka-python's metadata cache
        records = flatten(batches)
        self._fetch_wait.apply(consumer, f"group {self._group_id}", len(records) >= max_records)
        return records

    @property
    def fetch_wait_ms(self) -> int:
        """The fetch wait asked for now (raised where the broker starved the consumer)."""
        return self._fetch_wait.wait_ms

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
        to_commit = {
            TopicPartition(t, p): OffsetAndMetadata(o, "", -1)
            for (t, p), o in offsets.items()
            if TopicPartition(t, p) in owned
        }
        if not to_commit:
            return True
        try:
            consumer.commit(to_commit)
        except kafka_errors.CommitFailedError as exc:
            log.warning(
                "group %s refused the commit of %s (%s); rejoining",
                self._group_id,
                sorted(offsets.items()),
                exc,
            )
            return False
        except kafka_errors.KafkaError as exc:
            raise wrap_error(f"committing offsets of group {self._group_id!r}", exc) from exc
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
            position = self._client().position(
                TopicPartition(*tp), timeout_ms=self._cfg.request_timeout_ms
            )
            return None if position is None else int(position)
        except kafka_errors.KafkaError as exc:
            raise wrap_error(f"reading the position of {tp}", exc) from exc

    def assignment(self) -> set[TP]:
        return {(tp.topic, tp.partition) for tp in self._client().assignment()}

    def log_id(self, tp: TP) -> str | None:
        """The topic id (KIP-516) from the client's metadata: a topic recreated by a broker
        that lost its data gets a new one. None when the broker reports none."""
        topic_id = self._client()._cluster.topic_id(tp[0])  # only on kafka-python's cache
        return str(topic_id) if topic_id else None

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
                    raise wrap_error(f"closing consumer group {self._group_id!r}", exc) from exc
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
            consumer.close(autocommit=False, timeout_ms=REVOKE_COMMIT_TIMEOUT_MS)
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
        offsets = {
            TopicPartition(t, p): OffsetAndMetadata(o, "", -1)
            for (t, p), o in pending.items()
            if TopicPartition(t, p) in revoked
        }
        if not offsets or lost:
            if offsets:
                log.warning(
                    "group %s lost %s before committing; they will be re-read",
                    self._group_id,
                    sorted(offsets),
                )
            return
        if self._consumer is None:
            return
        try:
            # kafka-python 3 forbids blocking commit() on its IO thread; await the async variant.
            await self._consumer._coordinator._commit_offsets_sync_async(
                offsets, timeout_ms=REVOKE_COMMIT_TIMEOUT_MS
            )
        except Exception as exc:
            log.warning(
                "commit on revoke failed for group %s (%s); the new owner re-reads "
                "from the previous commit",
                self._group_id,
                exc,
            )

    def __repr__(self) -> str:
        return f"KafkaSource(group={self._group_id!r}, topics={list(self._topics)})"
