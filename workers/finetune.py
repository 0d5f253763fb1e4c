"""The fine-tune worker: keeps learning from the stream and promotes what proved better.

Consumes `events` and `recommendations` (impressions) in its own consumer group, and the catalog
and model updates as global tables. `handle()` only appends to the durable FeedbackStore (whose
stored offsets are where it resumes) and scores emitted recommendations prequentially; a
fine-tune runs in a background thread every N events or T seconds: warm start from the registry's
CURRENT version, grow new items into the vocabulary, train on new + replayed sequences, evaluate
candidate vs current on held-out newest interactions, then publish + ModelUpdate or reject.

Size: just over 400 lines: the handler and the background run it starts share one lifecycle
(start, outcome, close), which reads best in one place.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from pipeline.codec import Decoded, encode
from pipeline.config import Config, FinetuneConfig, KafkaConfig, TopicsConfig, TrainingConfig
from pipeline.continual import (
    Candidate,
    OnlineEvaluator,
    TriggerPolicy,
    fine_tune,
    promotion_decision,
)
from pipeline.errors import TrainingStopped
from pipeline.feedback import EVENT, IMPRESSION, FeedbackStore
from pipeline.files import atomic_write
from pipeline.items import text_lookup
from pipeline.loop import TP, Handler, Output, Rejected
from pipeline.messages import Event, ModelUpdate, Recommendation
from pipeline.metrics import FinetuneMetrics
from pipeline.registry import ModelRegistry
from pipeline.versions import ServingModels
from workers.runtime import run_worker
from workers.spec import HandlerDeps, WorkerSpec

__all__ = ["FinetuneHandler", "RunOutcome", "SPEC", "run"]

log = logging.getLogger(__name__)

_STATE_FILE = "finetune-state.json"


@dataclass(frozen=True)
class RunOutcome:
    """What one fine-tune run ended with (also kept as `FinetuneHandler.outcomes`)."""

    outcome: str  # promoted | rejected | failed | skipped
    parent_version: str | None
    version: str | None
    candidate: dict[str, float]
    current: dict[str, float]
    loss: float
    seconds: float
    train_events: int
    new_events: int
    message: str
    update: ModelUpdate | None = None


class FinetuneHandler(Handler):
    worker = "finetune"

    def __init__(
        self,
        *,
        cfg: FinetuneConfig,
        training: TrainingConfig,
        topics: TopicsConfig,
        store: FeedbackStore,
        models: ServingModels,
        registry: ModelRegistry,
        metrics: FinetuneMetrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._cfg = cfg
        self._training = training
        self._updates_topic = topics.model_updates  # where a promotion is announced
        self._store = store
        self._models = models
        self._registry = registry
        self._metrics = metrics
        self._clock = clock
        self._policy = TriggerPolicy(cfg.every_events, cfg.every_seconds, cfg.first_after_events)
        self._kinds = {
            topics.events: "event",
            topics.recommendations: "recommendation",
            topics.items: "item",
            topics.model_updates: "model_update",
        }
        self._online = OnlineEvaluator(k=10)
        # Which input log the stored positions belong to (None: not read from the store yet),
        # and the logs being read now.
        self._stored_logs: dict[TP, str] | None = None
        self._reading_logs: dict[TP, str] = {}
        self._results: queue.Queue[RunOutcome] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._last_run_seq = 0  # store seq where the records not yet trained on start
        self._running_since = 0  # the run in flight trains on records from this seq on
        self._new_events = 0
        self._last_run_s: float | None = None
        self._runs_started = 0
        self.outcomes: list[RunOutcome] = []
        self.paused = False  # no new run starts while set (a running one finishes)
        self._stopping = threading.Event()  # set by close(): a running fine-tune is abandoned
        self._waiting_for_model = False

    # -- loop hooks ------------------------------------------------------------------------------
    def kind_of(self, topic: str) -> str:
        return self._kinds[topic]

    def apply_table(self, batch: list[Decoded], now_ms: int) -> list[Output]:
        self._models.apply_table(batch)
        return self._drain()

    def on_assign(self, partitions: list[TP]) -> dict[TP, int]:
        self._open()
        stored = self._store.positions()
        return {tp: stored[tp] for tp in partitions if tp in stored}

    def adopt_log_ids(self, current: dict[TP, str | None]) -> dict[TP, str | None]:
        self._open()
        if self._stored_logs is None:
            self._stored_logs = self._store.log_ids()
            self._reading_logs = {**self._stored_logs, **self._reading_logs}
        previous = {tp: self._stored_logs.get(tp) for tp in current}
        self._reading_logs.update({tp: i for tp, i in current.items() if i})
        return previous

    def on_revoke(self, partitions: list[TP]) -> None:
        return None  # the store is this instance's; nothing held per partition

    def on_reset(self, tp: TP) -> None:
        self._open()
        self._store.forget(*tp)

    def checkpoint(self, offsets: dict[TP, int]) -> set[TP]:
        self._store.flush()
        if self._stored_logs is not None and self._reading_logs != self._stored_logs:
            self._store.set_log_ids(self._reading_logs)  # after the positions on them are stored
            self._stored_logs = dict(self._reading_logs)
        return set(offsets)

    def handle(self, batch: list[Decoded], now_ms: int) -> list[Output | Rejected]:
        entries: list[tuple[str, str, int, int, dict[str, Any]]] = []
        for decoded in batch:
            record, message = decoded.record, decoded.message
            if isinstance(message, Event):
                entries.append(
                    (EVENT, record.topic, record.partition, record.offset, message.to_dict())
                )
            elif isinstance(message, Recommendation):
                entries.append(
                    (
                        IMPRESSION,
                        record.topic,
                        record.partition,
                        record.offset,
                        {
                            "user_id": message.user_id,
                            "rec_id": message.rec_id,
                            "trigger_event_id": message.trigger_event_id,
                            "model_version": message.model_version,
                            "generated_at": message.generated_at,
                            "items": [[i.item_id, i.rank, i.explore] for i in message.items],
                        },
                    )
                )
        self._open()
        # Stored first, all or nothing: a batch the loop retries record by record after a
        # failure here is neither stored nor judged twice.
        stored = self._store.append(entries)
        new_events = 0
        if not stored:
            return []  # delivered again: already stored and judged
        for decoded in batch:
            message = decoded.message
            if isinstance(message, Event):
                new_events += 1
                self._judge(
                    self._online.observe_event(message.user_id, message.event_id, message.item_id)
                )
            elif isinstance(message, Recommendation):
                self._judge(
                    self._online.observe_recommendation(
                        message.trigger_event_id, [i.item_id for i in message.items]
                    )
                )
        self._new_events += new_events
        self._export_store()
        return []  # runs start and finish in tick(), which the loop calls every iteration

    def tick(self, now_ms: int) -> list[Output]:
        """Called every loop iteration: start a due fine-tune, emit finished ones."""
        self._maybe_start(now_ms / 1000)
        return self._drain()

    def feedback_stats(self) -> dict[str, int]:
        """Retained events, impressions, bytes and segments of the feedback store."""
        self._open()
        return self._store.stats()

    def mark_trained(self) -> None:
        """Count everything stored so far as already trained on (the experiment calls this after
        replaying the data the bootstrap model was trained on)."""
        self._open()
        self._last_run_seq, self._new_events = self._store.next_seq, 0
        self._save_state()

    # -- runs ------------------------------------------------------------------------------------
    def _open(self) -> None:
        if self._store.opened:
            return
        self._store.open()
        state_path = self._store.root / _STATE_FILE
        if state_path.is_file():
            self._last_run_seq = int(orjson.loads(state_path.read_bytes()).get("last_run_seq", 0))
        self._new_events = len(self._store.read((EVENT,), since_seq=self._last_run_seq))
        self._export_store()

    def _maybe_start(self, now_s: float) -> None:
        if self.paused or (self._thread is not None and self._thread.is_alive()):
            return
        if self._last_run_s is None:
            self._last_run_s = now_s
        # The store's first run (nothing trained on yet) comes early: finetune.first_after_events.
        first = self._last_run_seq == 0
        if not self._store.opened or not self._policy.due(
            self._new_events, now_s - self._last_run_s, first=first
        ):
            return
        if self._models.current is None:
            # Nothing to warm-start from: keep storing (the first run after the first model
            # is still the early one) and say once what to do.
            if not self._waiting_for_model:
                log.warning(
                    "%d events stored but no model to fine-tune yet: publish one with "
                    "`streamrec bootstrap --from-topics` (or --items/--events)",
                    self._new_events,
                )
                self._waiting_for_model = True
            return
        self._waiting_for_model = False
        catalog = self._models.catalog
        snapshot = {
            "meta": catalog.meta(),
            "text": catalog.text_vectors.copy(),
            "since": self._last_run_seq,
            "until": self._store.next_seq,
            "new_events": self._new_events,
            "seed": self._training.seed + self._runs_started,
        }
        self._running_since = snapshot["since"]
        self._last_run_seq, self._new_events, self._last_run_s = snapshot["until"], 0, now_s
        self._runs_started += 1
        self._thread = threading.Thread(
            target=self._run, args=(snapshot,), daemon=True, name="finetune-train"
        )
        self._thread.start()

    def _run(self, snap: dict[str, Any]) -> None:
        started = time.monotonic()
        parent = None
        try:
            parent = self._registry.current_version()
            current = self._registry.load(parent)
            records = self._store.read((EVENT,))
            events = [Event.from_dict(r.value) for r in records if r.seq < snap["until"]]
            new_from = next(
                (i for i, r in enumerate(records) if r.seq >= snap["since"]), len(events)
            )
            cand = fine_tune(
                current.model,
                current.item_ids,
                events,
                new_from=new_from,
                text_of=text_lookup(snap["meta"]["ids"], snap["text"]),
                training=_finetune_training(self._training, self._cfg),
                replay_ratio=self._cfg.replay_ratio,
                holdout_users=self._cfg.holdout_users,
                holdout_events_per_user=self._cfg.holdout_events_per_user,
                max_seconds=self._cfg.max_train_seconds,
                seed=snap["seed"],
                stop=self._stopping.is_set,
            )
            snap["parent_items"] = len(current.item_ids)
            outcome = self._decide(cand, parent, snap, started)
        except TrainingStopped as exc:  # its events are trained on after the restart
            log.info("%s", exc)
            outcome = _ended_early("skipped", parent, started, snap["new_events"], exc)
        except Exception as exc:  # a failed run must never take the ingesting loop down
            log.exception("fine-tune run failed")
            outcome = _ended_early("failed", parent, started, snap["new_events"], exc)
        self._results.put(outcome)

    def _decide(
        self, cand: Candidate, parent: str | None, snap: dict[str, Any], started: float
    ) -> RunOutcome:
        if not cand.candidate_metrics or not cand.candidate_metrics.get("users"):
            promote, message = False, "rejected: no held-out interaction to compare on"
        else:
            promote, message = promotion_decision(
                cand.candidate_metrics, cand.current_metrics, tolerance=self._cfg.promote_tolerance
            )
        figures = {f"candidate_{k}": v for k, v in cand.candidate_metrics.items()}
        figures.update({f"current_{k}": v for k, v in cand.current_metrics.items()})
        update = None
        if promote:
            figures.update(
                {
                    "train_loss": cand.loss,
                    "train_seconds": cand.seconds,
                    "new_items": float(len(cand.item_ids) - snap["parent_items"]),
                }
            )
            update = self._registry.publish(
                cand.model,
                cand.model.config,
                cand.item_ids,
                snap["meta"],
                {**cand.candidate_metrics, **figures},
                parent_version=parent,
                trained_on_events=cand.data.train_events,
                text_vectors=snap["text"],
                now_ms=int(self._clock() * 1000),
            )
        return RunOutcome(
            "promoted" if promote else "rejected",
            parent,
            update.version if update else None,
            cand.candidate_metrics,
            cand.current_metrics,
            cand.loss,
            time.monotonic() - started,
            cand.data.train_events,
            snap["new_events"],
            message,
            update,
        )

    def _drain(self) -> list[Output]:
        outputs: list[Output] = []
        while True:
            try:
                outcome = self._results.get_nowait()
            except queue.Empty:
                return outputs
            self._record(outcome)
            if outcome.update is not None:
                outputs.append(Output(self._updates_topic, None, encode(outcome.update)))

    def _record(self, o: RunOutcome) -> None:
        m = self._metrics
        m.runs.labels(outcome=o.outcome).inc()
        m.run_seconds.observe(o.seconds)
        if o.loss == o.loss:
            m.loss.set(o.loss)
        for model, figures in (("candidate", o.candidate), ("current", o.current)):
            for metric in ("hr@10", "ndcg@10"):
                if metric in figures:
                    m.evaluation.labels(model=model, metric=metric).set(figures[metric])
        if o.outcome == "promoted":
            m.promotions.inc()
            log.info(
                "fine-tune %s -> %s %s; %d events trained, loss %.4f, %.1fs",
                o.parent_version,
                o.version,
                o.message,
                o.train_events,
                o.loss,
                o.seconds,
            )
        elif o.outcome == "rejected":
            m.rejections.inc()
            log.warning(
                "fine-tune candidate from %s %s; %d events trained, loss %.4f, %.1fs",
                o.parent_version,
                o.message,
                o.train_events,
                o.loss,
                o.seconds,
            )
        self.outcomes.append(o)
        self._save_state()

    def _save_state(self) -> None:
        # While a run is in flight (one can start in the tick that records the previous one)
        # its records count as trained only once it ends: a stop abandons it.
        trained = self._running_since if self.training else self._last_run_seq
        atomic_write(
            self._store.root / _STATE_FILE,
            orjson.dumps({"last_run_seq": trained, "runs": len(self.outcomes)}),
            fsync=False,
        )

    def _judge(self, judged: tuple[float, float] | None) -> None:
        if judged is None:
            return
        m = self._metrics
        m.online_judged.inc()
        m.online_hits.inc(judged[0])
        m.online_ndcg_sum.inc(judged[1])
        figures = self._online.figures()
        m.online_hr.set(figures["hr@10"])
        m.online_ndcg.set(figures["ndcg@10"])

    def _export_store(self) -> None:
        stats = self._store.stats()
        self._metrics.feedback_events.set(stats["events"])
        self._metrics.feedback_impressions.set(stats["impressions"])
        self._metrics.feedback_bytes.set(stats["bytes"])

    # -- lifecycle ---------------------------------------------------------------------------------
    @property
    def training(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no fine-tune runs (tests, the experiment); True when idle."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout_s)
        return not self.training

    def close(self) -> None:
        """Stop promptly: a running fine-tune is abandoned at its next training step (its
        events stay untrained in the stored state, so the restarted worker trains on them);
        one that is already evaluating or publishing finishes."""
        self._stopping.set()
        if not self.wait_idle(60):
            log.warning("fine-tune run still busy after 60 s; closing anyway")
        self._store.close()


def _finetune_training(training: TrainingConfig, cfg: FinetuneConfig) -> TrainingConfig:
    # A fine-tune is a few epochs at a fixed rate (measured that way in docs/CONTINUAL.md); the
    # cosine of a from-scratch fit would decay it within those few epochs.
    return dataclasses.replace(
        training, epochs=cfg.epochs, learning_rate=cfg.learning_rate, lr_schedule="constant"
    )


def _ended_early(
    status: str, parent: str | None, started: float, new_events: int, exc: BaseException
) -> RunOutcome:
    """The outcome of a run that stopped before a candidate was judged (skipped or failed)."""
    return RunOutcome(
        status,
        parent,
        None,
        {},
        {},
        float("nan"),
        time.monotonic() - started,
        0,
        new_events,
        str(exc),
    )


def _build_handler(config: Config, deps: HandlerDeps) -> FinetuneHandler:
    """The handler over config.paths.feedback and config.paths.models (no I/O until used)."""
    store = FeedbackStore(
        Path(config.paths.feedback),
        retention_events=config.finetune.retention_events,
        segment_events=config.finetune.segment_events,
    )
    return FinetuneHandler(
        cfg=config.finetune,
        training=config.training,
        topics=config.topics,
        store=store,
        models=deps.models,
        registry=ModelRegistry(config.paths.models),
        metrics=deps.metrics_as(FinetuneMetrics),
        clock=deps.clock,
    )


def _consumer(config: Config) -> KafkaConfig:
    """Fine-tuning wants throughput, not latency: fewer, fuller fetches (each costs the broker
    work)."""
    return dataclasses.replace(
        config.kafka,
        fetch_min_bytes=config.finetune.fetch_min_bytes,
        fetch_max_wait_ms=config.finetune.fetch_max_wait_ms,
    )


SPEC = WorkerSpec(
    name="finetune",
    inputs=lambda topics: (topics.events, topics.recommendations),
    section=lambda config: config.finetune,
    metrics=FinetuneMetrics,
    build_handler=_build_handler,
    consumer=_consumer,
    # The updater owns the DLQ of events: this worker reads the same topic and must not
    # dead-letter a bad record a second time.
    dead_letters=False,
    # Training must not take CPU from the serving roles on the same host.
    nice=lambda config: config.finetune.nice,
)


def run(config: Config, *, stop: threading.Event | None = None) -> None:
    """Run the fine-tune worker until `stop` is set (the CLI sets it on SIGTERM/SIGINT)."""
    run_worker(config, SPEC, stop=stop)
