"""The scorer: turns each UserVector into a Recommendation with reasons.

Consumes `user-vectors` (and `model-updates`, whose invalid records it dead-letters); follows the
catalog and model through the global table reader. Per micro-batch and model version it checks
the vectors and hands them to pipeline/recommend.py (exclusion, exact or ANN top-k, seeded
exploration, reasons from the user's own history), the scoring the updater's co-located path
(updater.score) shares. Stateless beyond Kafka offsets: outputs carry deterministic rec_ids.
"""

from __future__ import annotations

import functools
import logging
import threading

import numpy as np

from pipeline.codec import Decoded, encode
from pipeline.config import Config, ScorerConfig, TopicsConfig
from pipeline.errors import ConfigError, InvalidMessage
from pipeline.loop import TP, Handler, Output, Rejected
from pipeline.messages import TRENDING_ONLY, UserVector
from pipeline.metrics import WorkerMetrics
from pipeline.recommend import Recommender
from pipeline.versions import ServingModels
from workers.runtime import run_worker
from workers.spec import HandlerDeps, WorkerSpec

__all__ = ["ScorerHandler", "SPEC", "run"]

log = logging.getLogger(__name__)


class ScorerHandler(Handler):
    worker = "scorer"

    def __init__(
        self,
        *,
        cfg: ScorerConfig,
        topics: TopicsConfig,
        models: ServingModels,
        metrics: WorkerMetrics,
    ) -> None:
        self._cfg = cfg
        self._topics = topics
        self._models = models
        self._metrics = metrics
        self._recommender = Recommender(cfg, models)
        self._kinds = {
            topics.user_vectors: "user_vector",
            topics.items: "item",
            topics.model_updates: "model_update",
        }

    def kind_of(self, topic: str) -> str:
        return self._kinds[topic]

    def apply_table(self, batch: list[Decoded], now_ms: int) -> list[Output]:
        self._models.apply_table(batch)
        return []

    def on_assign(self, partitions: list[TP]) -> dict[TP, int]:
        return {}  # resume from the committed offsets

    def on_revoke(self, partitions: list[TP]) -> None:
        return None

    def on_reset(self, tp: TP) -> None:
        return None

    def checkpoint(self, offsets: dict[TP, int]) -> set[TP]:
        return set(offsets)  # no local state: the Kafka commit is the checkpoint

    def handle(self, batch: list[Decoded], now_ms: int) -> list[Output | Rejected]:
        by_version: dict[str, list[Decoded]] = {}
        for decoded in batch:
            if decoded.record.topic == self._topics.user_vectors:
                by_version.setdefault(decoded.message.model_version, []).append(decoded)
        outputs: list[Output | Rejected] = []
        for version, group in by_version.items():
            outputs += self._score(version, group, now_ms)
        return outputs

    def _score(self, version: str, group: list[Decoded], now_ms: int) -> list[Output | Rejected]:
        m = self._metrics
        item_vecs = self._recommender.item_vectors(version)
        if item_vecs is None:
            return [
                Rejected(
                    d.record,
                    InvalidMessage(
                        "unknown_model_version",
                        f"user vector names model version {version!r}, which the registry cannot "
                        "load",
                        "model_version",
                    ),
                )
                for d in group
            ]
        outputs: list[Output | Rejected] = []
        user_vecs: np.ndarray | None = None  # no model yet: trending items, text reasons
        if version != TRENDING_ONLY:
            group, user_vecs, outputs = _checked_vectors(group, item_vecs.shape[1], version)
        if not group:
            return outputs
        users: list[UserVector] = [d.message for d in group]
        with m.time_stage("score"):
            recommendations = self._recommender.recommend(users, user_vecs, version, now_ms)
        for user, message in zip(users, recommendations):
            outputs.append(
                Output(
                    self._topics.recommendations,
                    user.user_id.encode(),
                    encode(message),
                    trigger_produced_ms=user.trigger_produced_at,
                )
            )
            if user.event_ts:
                m.event_age_seconds.observe(max(0.0, (now_ms - user.event_ts) / 1000))
        return outputs


def _checked_vectors(
    group: list[Decoded], dim: int, version: str
) -> tuple[list[Decoded], np.ndarray, list[Output | Rejected]]:
    """The user vectors of `group` the model can score, as (B, dim) float32, and the refusals of
    the others (sizes that disagree, numbers beyond float32)."""
    refused: list[Output | Rejected] = []
    kept: list[Decoded] = []
    for d in group:
        error = _mismatch(d.message, dim, version)
        if error is None:
            kept.append(d)
        else:
            refused.append(Rejected(d.record, error))
    with np.errstate(over="ignore"):  # JSON numbers beyond float32 become inf: refused below
        user_vecs = np.asarray([d.message.vector for d in kept], dtype=np.float32).reshape(
            len(kept), dim
        )  # (B, D)
    finite = np.isfinite(user_vecs).all(axis=1)
    if not finite.all():
        refused += [
            Rejected(
                d.record,
                InvalidMessage(
                    "invalid_value", "vector holds values beyond the float32 range", "vector"
                ),
            )
            for d, ok in zip(kept, finite.tolist())
            if not ok
        ]
        kept, user_vecs = [d for d, ok in zip(kept, finite.tolist()) if ok], user_vecs[finite]
    return kept, user_vecs, refused


def _mismatch(user: UserVector, dim: int, version: str) -> InvalidMessage | None:
    """What the schema cannot say about a user vector: its sizes must agree with the model's
    and with each other."""
    if len(user.vector) != dim:
        return InvalidMessage(
            "wrong_dimension",
            f"vector has {len(user.vector)} dimensions, model {version} has {dim}",
            "vector",
        )
    if user.history_types and len(user.history_types) != len(user.history):
        return InvalidMessage(
            "invalid_value",
            f"history_types has {len(user.history_types)} "
            f"entries for {len(user.history)} history items",
            "history_types",
        )
    return None


def _build_handler(config: Config, deps: HandlerDeps) -> ScorerHandler:
    if config.updater.score:
        # The updater already answers every event: a scorer beside it would answer each twice.
        raise ConfigError(
            "invalid setting updater.score: the scorer runs only in the separate topology; set "
            "updater.score=false (STREAMREC_UPDATER_SCORE=false) for the updaters and scorers alike"
        )
    return ScorerHandler(
        cfg=config.scorer, topics=config.topics, models=deps.models, metrics=deps.metrics
    )


SPEC = WorkerSpec(
    name="scorer",
    inputs=lambda topics: (topics.user_vectors, topics.model_updates),
    section=lambda config: config.scorer,
    metrics=functools.partial(WorkerMetrics, "scorer"),
    build_handler=_build_handler,
    encoder_device=lambda config: config.scorer.device,
)


def run(config: Config, *, stop: threading.Event | None = None) -> None:
    """Run the scorer until `stop` is set (the CLI sets it on SIGTERM/SIGINT)."""
    run_worker(config, SPEC, stop=stop)
