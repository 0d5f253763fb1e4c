"""The updater: folds events into per-user histories and publishes fresh UserVectors.

Consumes `events` (and `items`, whose invalid records it dead-letters; the catalog itself comes
from the global table reader), keeps each partition's histories and dedup window in a
PartitionStore together with the offsets that produced them, and refreshes every touched user's
vector with batched forward passes per micro-batch: incremental (new positions only, over cached
attention keys/values) where the user's window extends the cached one, full otherwise.
Before any model is published it only folds events into state, and publishes every held
user's vector once the first model arrives (the swap's re-score).

With `updater.score` it also scores the users it has just refreshed, in the same micro-batch and
against the same model version's item table (pipeline/recommend.py, the scoring the scorer
worker runs), and produces their Recommendations first: the event reaches a recommendation in
one Kafka hop. The UserVectors follow them (`updater.publish_vectors`), off that critical path.

Size: the handler's fold, its batched refresh and its co-located scoring share the partition
stores and the one model version of a micro-batch; apart, each would reach into the others.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np

from pipeline.codec import Decoded, encode
from pipeline.config import Config, TopicsConfig, UpdaterConfig
from pipeline.encoder_cache import EncoderCache
from pipeline.errors import OwnershipLost
from pipeline.loop import INFRASTRUCTURE_ERRORS, TP, Handler, Output, Rejected, processing_error
from pipeline.messages import EVENT_TYPES, TRENDING_ONLY, Event, Recommendation, Record, UserVector
from pipeline.metrics import UpdaterMetrics
from pipeline.recommend import Recommender
from pipeline.state import Applied, History, PartitionState, window_start
from pipeline.store import PartitionStore
from pipeline.versions import RateBudget, RescoreQueue, ServingModels
from workers.runtime import run_worker
from workers.spec import HandlerDeps, WorkerSpec

__all__ = ["UpdaterHandler", "SPEC", "run"]

log = logging.getLogger(__name__)


T = TypeVar("T")


def batch_or_each(
    what: str, count: int, batch: Callable[[], list[T]], one: Callable[[int], T]
) -> tuple[list[T | None], dict[int, Exception]]:
    """batch(), and when it raises anything but an infrastructure error, one(i) for each of the
    `count` items: an item that cannot be processed costs only its own result (None, with its
    exception under its index)."""
    try:
        return list(batch()), {}
    except INFRASTRUCTURE_ERRORS:
        raise
    except Exception as exc:
        log.warning(
            "%s %d users failed (%s: %s); retrying them one by one",
            what,
            count,
            type(exc).__name__,
            exc,
        )
    out: list[T | None] = []
    failures: dict[int, Exception] = {}
    for i in range(count):
        try:
            out.append(one(i))
        except INFRASTRUCTURE_ERRORS:
            raise
        except Exception as exc:
            failures[i] = exc
            out.append(None)
    return out, failures


class UpdaterHandler(Handler):
    worker = "updater"

    def __init__(
        self,
        *,
        cfg: UpdaterConfig,
        topics: TopicsConfig,
        state_dir: Path,
        models: ServingModels,
        metrics: UpdaterMetrics,
        fault: Callable[[str], None] | None = None,
        recommender: Recommender | None = None,
    ) -> None:
        """`recommender` (holding the scorer.* settings): score the refreshed users here and
        produce their Recommendations (updater.score); None leaves that to the scorer."""
        self._cfg = cfg
        self._recommender = recommender
        self._fault = fault
        self._topics = topics
        self._state_dir = Path(state_dir)
        self._models = models
        self._metrics = metrics
        self._kinds = {
            topics.events: "event",
            topics.items: "item",
            topics.model_updates: "model_update",
        }
        self.states: dict[TP, PartitionState] = {}
        self._stores: dict[TP, PartitionStore] = {}
        self._stored_offset: dict[TP, int | None] = {}
        # Which input log the stored offsets belong to, and the one being read now.
        self._stored_log: dict[TP, str | None] = {}
        self._reading_log: dict[TP, str] = {}
        self._pending: dict[TP, Applied] = {}
        self._cache = EncoderCache(cfg.encoder_cache_mb * 1024 * 1024)
        # Users still to be re-scored under the newest model version, and how many may be
        # re-scored now (refilled at swap_rescore_per_s, capped at one chunk); per partition,
        # the version every held user has a vector of (stored with the offsets).
        self._rescore = RescoreQueue()
        self._rescore_budget = RateBudget(cfg.swap_rescore_per_s, cfg.swap_rescore_batch)
        self._scored: dict[TP, str | None] = {}

    # -- loop hooks ------------------------------------------------------------------------------
    def kind_of(self, topic: str) -> str:
        return self._kinds[topic]

    def apply_table(self, batch: list[Decoded], now_ms: int) -> list[Output]:
        if self._models.apply_table(batch):
            self._rescore.replace(
                (user_id, tp) for tp, state in self.states.items() for user_id in state.users()
            )
            log.info(
                "model swap to %s: re-scoring %d users, %g per second",
                self._models.version,
                len(self._rescore),
                self._cfg.swap_rescore_per_s,
            )
            self._metrics.rescore_pending.set(len(self._rescore))
        return []

    def tick(self, now_ms: int) -> list[Output]:
        """After a model swap, the next held users' vectors under the new version, so every
        user is re-scored without waiting for an event of theirs. Throttled (swap_rescore_per_s),
        because re-encoding them all at once held fresh events back for seconds (8,000 users:
        p99 3.8 s at 1,000 events/s); users whose own events refresh them first leave the queue.
        No recommendation mixes versions either way: each vector names its own."""
        if not self._rescore:
            return []
        allowed = self._rescore_budget.take(now_ms / 1000, len(self._rescore))
        taken = self._rescore.take(allowed)
        histories = [(user_id, self.states[tp].history(user_id)) for user_id, tp in taken]
        chunk = [(user_id, history) for user_id, history in histories if history.item_ids]
        self._mark_scored({tp for _, tp in taken})
        self._metrics.rescore_pending.set(len(self._rescore))
        if not chunk:
            return []
        with self._metrics.time_stage("encode"):
            vectors, version = self._encode(chunk)
        if not self._rescore:
            log.info("model swap to %s: every held user re-scored", version)
        users = [
            self._user_vector(user_id, history, version, now_ms, trigger="model_swap")
            for user_id, history in chunk
        ]
        outputs, failures = self._publish(
            users, np.asarray(vectors, dtype=np.float32), version, now_ms
        )
        for user_id, exc in failures.items():  # no record to dead-letter: its next event will
            log.warning(
                "re-scoring %s under %s failed: %s: %s", user_id, version, type(exc).__name__, exc
            )
        return outputs

    def _user_vector(
        self,
        user_id: str,
        history: History,
        version: str,
        now_ms: int,
        *,
        trigger_event_id: str | None = None,
        trigger_produced_at: int | None = None,
        trigger: str | None = None,
        new_items: Sequence[str] = (),
    ) -> UserVector:
        """The user's UserVector message, its `vector` left empty: `_publish` fills it in only
        when the vector is produced (the co-located path scores the array itself)."""
        return UserVector(
            user_id=user_id,
            model_version=version,
            vector=(),
            history=tuple(history.item_ids),
            event_ts=max(history.ts),
            updated_at=now_ms,
            history_types=tuple(EVENT_TYPES[t] for t in history.types),
            trigger_event_id=trigger_event_id,
            trigger_produced_at=trigger_produced_at,
            trigger=trigger,
            new_items=tuple(new_items),
        )

    def _publish(
        self, users: list[UserVector], vectors: np.ndarray | None, version: str, now_ms: int
    ) -> tuple[list[Output], dict[str, Exception]]:
        """The outputs of refreshed users: with updater.score their Recommendations first (the
        critical path), then their UserVectors unless updater.publish_vectors is off; and the
        users whose scoring raised. `vectors` (B, D) under `version`; None before any model
        (TRENDING_ONLY)."""
        outputs: list[Output] = []
        failures: dict[str, Exception] = {}
        if self._recommender is not None:
            m = self._metrics
            with m.time_stage("score"):
                recommendations, failures = self._recommend_isolated(
                    users, vectors, version, now_ms
                )
                produced = {u.user_id: u.trigger_produced_at for u in users}
                outputs += [
                    Output(
                        self._topics.recommendations,
                        r.user_id.encode(),
                        encode(r),
                        trigger_produced_ms=produced[r.user_id],
                    )
                    for r in recommendations
                ]
            for user in users:
                m.event_age_seconds.observe(max(0.0, (now_ms - user.event_ts) / 1000))
        if self._cfg.publish_vectors:
            rows = vectors.tolist() if vectors is not None else [[0.0]] * len(users)
            outputs += [
                Output(
                    self._topics.user_vectors,
                    u.user_id.encode(),
                    encode(dataclasses.replace(u, vector=tuple(row))),
                    # the end-to-end latency is the answer's: the vector's only without scoring
                    trigger_produced_ms=None if self._recommender else u.trigger_produced_at,
                )
                for u, row in zip(users, rows)
            ]
        return outputs, failures

    def _recommend_isolated(
        self, users: list[UserVector], vectors: np.ndarray | None, version: str, now_ms: int
    ) -> tuple[list[Recommendation], dict[str, Exception]]:
        """The users' Recommendations, and when scoring the batch raises, each user alone: the
        micro-batch's state is applied by then, so a retry of its records would find only
        duplicates and answer nobody; one user that cannot be scored costs its own."""
        recommender = self._recommender
        assert recommender is not None

        def one(b: int) -> Recommendation:
            user_vecs = vectors[b : b + 1] if vectors is not None else None
            return recommender.recommend([users[b]], user_vecs, version, now_ms)[0]

        results, failures = batch_or_each(
            "scoring",
            len(users),
            lambda: recommender.recommend(users, vectors, version, now_ms),
            one,
        )
        return [r for r in results if r is not None], {
            users[b].user_id: exc for b, exc in failures.items()
        }

    def on_assign(self, partitions: list[TP]) -> dict[TP, int]:
        resume: dict[TP, int] = {}
        for tp in partitions:
            if tp[0] != self._topics.events:
                continue
            store = PartitionStore(
                self._state_dir,
                tp[0],
                tp[1],
                compact_bytes=self._cfg.snapshot_every_bytes,
                fault=self._fault,
            )
            store.claim()
            restored = store.restore()
            sizes = {
                "max_length": self._cfg.history_length,
                "dedup_capacity": self._cfg.dedup_capacity,
            }
            state = (
                PartitionState.from_snapshot(restored.state, **sizes)
                if restored.state is not None
                else PartitionState(**sizes)
            )
            for delta in restored.deltas:
                state.apply_delta(delta)
            if restored.snapshot_corrupt:
                log.warning(
                    "corrupt snapshot for %s[%d]; using the previous one and re-reading "
                    "from offset %s",
                    tp[0],
                    tp[1],
                    restored.offset,
                )
            self.states[tp], self._stores[tp] = state, store
            self._stored_offset[tp] = restored.offset
            self._stored_log[tp] = restored.log_id
            # No local state: rebuild it from the start of the log (outputs are idempotent).
            resume[tp] = restored.offset if restored.offset is not None else 0
            # Users whose vectors may predate the current version (the previous owner, or
            # this process before a restart, had not re-scored them all) join the re-score.
            scored, current = restored.meta.get("scored"), self._models.version
            if len(state) and scored != current:
                self._rescore.add((user_id, tp) for user_id in state.users())
                log.info(
                    "%s[%d]: %d users last scored under %s, re-scoring under %s",
                    tp[0],
                    tp[1],
                    len(state),
                    scored,
                    current,
                )
            self._scored[tp] = scored if len(state) else current
            log.info(
                "assigned %s[%d]: %d users restored, resuming at %d",
                tp[0],
                tp[1],
                len(state),
                resume[tp],
            )
        self._metrics.state_users.set(sum(len(s) for s in self.states.values()))
        self._metrics.rescore_pending.set(len(self._rescore))
        return resume

    def _mark_scored(self, partitions: set[TP]) -> None:
        """Partitions whose last queued user left the re-score queue now hold only vectors of
        the current version."""
        for tp in partitions:
            if tp in self.states and not self._rescore.left(tp):
                self._scored[tp] = self._models.version

    def adopt_log_ids(self, current: dict[TP, str | None]) -> dict[TP, str | None]:
        for tp, log_id in current.items():
            if tp in self.states and log_id:
                self._reading_log[tp] = log_id
        return {tp: self._stored_log.get(tp) for tp in current}

    def on_revoke(self, partitions: list[TP]) -> None:
        for tp in partitions:
            self._forget(tp)
        self._metrics.state_users.set(sum(len(s) for s in self.states.values()))

    def on_reset(self, tp: TP) -> None:
        log.warning(
            "keeping %d users of %s[%d] across the broker reset",
            len(self.states[tp]) if tp in self.states else 0,
            tp[0],
            tp[1],
        )

    def _forget(self, tp: TP) -> None:
        store = self._stores.pop(tp, None)
        if store is not None:
            store.close()
        state = self.states.pop(tp, None)
        if state is not None:
            self._cache.discard(list(state.users()))
        self._stored_offset.pop(tp, None)
        self._stored_log.pop(tp, None)
        self._reading_log.pop(tp, None)
        self._pending.pop(tp, None)
        self._rescore.drop(tp)
        self._scored.pop(tp, None)

    # -- the work --------------------------------------------------------------------------------
    def handle(self, batch: list[Decoded], now_ms: int) -> list[Output | Rejected]:
        m = self._metrics
        with m.time_stage("state_update"):
            by_partition: dict[TP, list[Event]] = {}
            records: dict[str, Record] = {}  # event id -> its record
            for decoded in batch:
                record = decoded.record
                if record.topic != self._topics.events:
                    continue  # items: validated (DLQ) here, applied by the table reader
                tp = (record.topic, record.partition)
                if tp not in self.states:
                    continue  # revoked mid-batch; the new owner re-reads it
                by_partition.setdefault(tp, []).append(decoded.message)
                records[decoded.message.event_id] = record
            touched: dict[str, tuple[TP, Event]] = {}
            new_items: dict[str, list[str]] = {}  # user -> items of its events applied now
            for tp, events in by_partition.items():
                applied = self.states[tp].apply(events)
                for event in applied.events:
                    new_items.setdefault(event.user_id, []).append(event.item_id)
                # Merged, not replaced: the loop may hand over a failed batch's records again
                # one by one, and the write-ahead log must get every event applied since the
                # last checkpoint.
                self._pending[tp] = (
                    self._pending[tp].merge(applied) if tp in self._pending else applied
                )
                m.duplicates.inc(applied.duplicates)
                for user_id, trigger in applied.touched.items():
                    touched[user_id] = (tp, trigger)
        if not touched:
            return []
        if self._models.current is None:
            # No model published yet: the events are folded into state (and persisted with
            # their offsets), and each touched user gets an empty vector the scorer answers
            # with trending items; the first model's swap re-scores every held user.
            self._metrics.state_users.set(sum(len(s) for s in self.states.values()))
            published, failures = self._publish(
                [
                    self._user_vector(
                        user_id,
                        self.states[tp].history(user_id),
                        TRENDING_ONLY,
                        now_ms,
                        trigger_event_id=trigger.event_id,
                        trigger_produced_at=records[trigger.event_id].timestamp_ms or None,
                        new_items=new_items.get(user_id, ()),
                    )
                    for user_id, (tp, trigger) in touched.items()
                ],
                None,
                TRENDING_ONLY,
                now_ms,
            )
            return [*published, *self._scoring_rejections(failures, touched, records)]
        with m.time_stage("encode"):
            histories = [self.states[tp].history(user) for user, (tp, _) in touched.items()]
            vectors, version, failures = self._encode_isolated(list(zip(touched, histories)))
        outputs: list[Output | Rejected] = []
        refreshed: list[UserVector] = []
        refreshed_vectors: list[np.ndarray] = []
        rescoring = len(self._rescore) > 0
        for (user_id, (_tp, trigger)), history, vector in zip(touched.items(), histories, vectors):
            if vector is None:  # its events are folded in; its trigger is dead-lettered
                outputs.append(
                    Rejected(records[trigger.event_id], processing_error(failures[user_id]))
                )
                continue
            produced = records[trigger.event_id].timestamp_ms or None
            refreshed.append(
                self._user_vector(
                    user_id,
                    history,
                    version,
                    now_ms,
                    trigger_event_id=trigger.event_id,
                    trigger_produced_at=produced,
                    new_items=new_items.get(user_id, ()),
                )
            )
            refreshed_vectors.append(vector)
            if rescoring:
                self._rescore.discard(user_id)  # already under the newest version
        if refreshed:
            published, failures = self._publish(
                refreshed, np.stack(refreshed_vectors), version, now_ms
            )
            outputs += published
            outputs += self._scoring_rejections(failures, touched, records)
        if rescoring:
            self._mark_scored({tp for tp, _ in touched.values()})
        m.rescore_pending.set(len(self._rescore))
        self._metrics.state_users.set(sum(len(s) for s in self.states.values()))
        return outputs

    @staticmethod
    def _scoring_rejections(
        failures: dict[str, Exception],
        touched: dict[str, tuple[TP, Event]],
        records: dict[str, Record],
    ) -> list[Rejected]:
        """The trigger records of users whose scoring raised, dead-lettered (their events are
        folded in, their vectors produced)."""
        return [
            Rejected(records[touched[user_id][1].event_id], processing_error(exc))
            for user_id, exc in failures.items()
        ]

    def _encode_isolated(
        self, users: list[tuple[str, History]]
    ) -> tuple[list[np.ndarray | None], str, dict[str, Exception]]:
        """`_encode`, and when the batched forward pass raises, each user alone: one user whose
        window cannot be encoded costs its own vector, not the micro-batch's."""

        def encoded(batch: list[tuple[str, History]]) -> list[tuple[np.ndarray, str]]:
            vectors, version = self._encode(batch)
            return [(vector, version) for vector in vectors]

        results, failures = batch_or_each(
            "encoding", len(users), lambda: encoded(users), lambda b: encoded([users[b]])[0]
        )
        versions = [r[1] for r in results if r is not None]
        version = versions[-1] if versions else self._models.version or ""
        return (
            [r[0] if r is not None else None for r in results],
            version,
            {users[b][0]: exc for b, exc in failures.items()},
        )

    def _encode(self, users: list[tuple[str, History]]) -> tuple[np.ndarray, str]:
        """Vectors of every touched user of the micro-batch, under the current version."""
        current = self._models.current
        assert current is not None, "ServingModels.start() must run before the loop"
        catalog = self._models.catalog
        item_vectors = self._models.item_vectors(current.version)
        max_length, slide = current.seq_config.max_length, self._cfg.window_slide
        starts = [window_start(len(h.item_ids), h.count, max_length, slide) for _, h in users]
        rows = [catalog.rows(h.item_ids[s:]) for (_, h), s in zip(users, starts)]
        types = [np.asarray(h.types[s:], dtype=np.int64) for (_, h), s in zip(users, starts)]
        refresh = self._cache.encode(
            current,
            [user for user, _ in users],
            rows,
            types,
            item_vectors,
            catalog.text_stamps,
            catalog.version_counter,
        )
        m = self._metrics
        m.user_encodes.labels(mode="incremental").inc(refresh.incremental)
        m.user_encodes.labels(mode="full").inc(refresh.full)
        m.encoder_cache_bytes.set(self._cache.nbytes)
        m.encoder_cache_users.set(len(self._cache))
        return refresh.vectors, current.version

    def checkpoint(self, offsets: dict[TP, int]) -> set[TP]:
        persisted: set[TP] = set()
        for tp, offset in offsets.items():
            if tp[0] != self._topics.events:
                persisted.add(tp)  # no local state for items partitions: Kafka commit only
                continue
            if tp not in self.states:
                continue
            state, store = self.states[tp], self._stores[tp]
            applied = self._pending.pop(tp, Applied())
            # The log the offset is on is stored with it (a restart after a broker reset must
            # not resume the new log at the old log's offset), and the version every user of
            # the partition has a vector of.
            reading = self._reading_log.get(tp) or self._stored_log.get(tp)
            meta = {k: v for k, v in (("log", reading), ("scored", self._scored.get(tp))) if v}
            try:
                wal_bytes = store.append(
                    self._stored_offset[tp], offset, state.delta(applied), meta
                )
                if store.needs_compaction(wal_bytes):
                    store.compact(offset, state.to_snapshot(), meta)
                self._stored_log[tp] = reading
            except OwnershipLost:
                log.warning("lost ownership of %s[%d] while paused; dropping it", tp[0], tp[1])
                self._forget(tp)
                continue
            self._stored_offset[tp] = offset
            persisted.add(tp)
        return persisted

    def close(self) -> None:
        for tp in list(self._stores):
            self._forget(tp)


def _build_handler(config: Config, deps: HandlerDeps) -> UpdaterHandler:
    # updater.score: score the refreshed users here, under the scorer.* settings
    recommender = Recommender(config.scorer, deps.models) if config.updater.score else None
    return UpdaterHandler(
        cfg=config.updater,
        topics=config.topics,
        state_dir=config.paths.state / "updater",
        models=deps.models,
        metrics=deps.metrics_as(UpdaterMetrics),
        fault=deps.fault,
        recommender=recommender,
    )


SPEC = WorkerSpec(
    name="updater",
    inputs=lambda topics: (topics.events, topics.items),
    section=lambda config: config.updater,
    metrics=UpdaterMetrics,
    build_handler=_build_handler,
    encoder_device=lambda config: config.updater.device,
)


def run(config: Config, *, stop: threading.Event | None = None) -> None:
    """Run the updater until `stop` is set (the CLI sets it on SIGTERM/SIGINT)."""
    run_worker(config, SPEC, stop=stop)
