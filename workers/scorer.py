"""The scorer: turns each UserVector into a Recommendation with reasons.

Consumes `user-vectors` (and `model-updates`, whose invalid records it dead-letters); follows the
catalog and model through the global table reader. Per micro-batch and model version: one matrix
product against every catalog item, exclusion of retired and purchased (optionally all
interacted) items, exact top-k, seeded epsilon-greedy exploration, and reasons taken from the
user's own history. Stateless beyond Kafka offsets: outputs carry deterministic rec_ids.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from pipeline.ann import Exclusions, IndexBuilder, ann_top_k
from pipeline.codec import Decoded, encode
from pipeline.config import Config, ScorerConfig, TopicsConfig
from pipeline.errors import InvalidMessage
from pipeline.loop import TP, Output, Rejected
from pipeline.messages import TRENDING_ONLY, Recommendation, RecommendedItem, UserVector
from pipeline.metrics import WorkerMetrics
from pipeline.registry import LoadedModel
from pipeline.scoring import (epsilon_greedy, exclusion_mask, explain, mark_sources, rec_id,
                              seed_for, top_k, top_k_blended, top_k_trending)
from pipeline.trending import TrendingCounts, knowledge
from pipeline.versions import ServingModels
from workers.runtime import run_worker
from workers.spec import HandlerDeps, WorkerSpec

__all__ = ["ScorerHandler", "SPEC", "run"]

log = logging.getLogger(__name__)


class ScorerHandler:
    worker = "scorer"

    def __init__(self, *, cfg: ScorerConfig, topics: TopicsConfig, models: ServingModels,
                 metrics: WorkerMetrics, clock: Callable[[], float] = time.time) -> None:
        self._cfg = cfg
        self._topics = topics
        self._models = models
        self._metrics = metrics
        self._clock = clock
        self._indexes = IndexBuilder(nprobe=cfg.ann_nprobe)
        self._trending = TrendingCounts(cfg.trending_half_life_s)
        self._trained: tuple[tuple[str, int, int], np.ndarray] | None = None
        self._kinds = {topics.user_vectors: "user_vector", topics.items: "item",
                       topics.model_updates: "model_update"}

    def kind_of(self, topic: str) -> str:
        return self._kinds[topic]

    def models_version(self) -> str | None:
        return self._models.version

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
        catalog = self._models.catalog
        outputs: list[Output | Rejected] = []
        loaded = None
        if version == TRENDING_ONLY:  # no model published yet: trending items, text reasons
            item_vecs = catalog.text_vectors
            user_vecs = np.zeros((len(group), item_vecs.shape[1]), dtype=np.float32)
        else:
            loaded = self._models.get(version)
            if loaded is None:
                return [Rejected(d.record, InvalidMessage(
                    "unknown_model_version",
                    f"user vector names model version {version!r}, which the registry cannot "
                    "load", "model_version")) for d in group]
            item_vecs = self._models.item_vectors(version)
            group, user_vecs, outputs = _checked_vectors(group, item_vecs.shape[1], version)
        if not group:
            return outputs
        with m.time_stage("score"):
            users: list[UserVector] = [d.message for d in group]
            for u in users:
                if u.new_items:
                    self._trending.add(catalog.rows(list(u.new_items)), now_ms / 1000)
            history_rows = [catalog.rows(list(u.history)) for u in users]
            excluded = [self._excluded_rows(u, rows) for u, rows in zip(users, history_rows)]
            rows, scores, valid, mask, trending = self._rank(
                version, user_vecs, item_vecs, excluded, history_rows, loaded)
            ids = [rec_id(u.user_id, u.trigger_event_id or u.trigger, version) for u in users]
            seeds = np.asarray([seed_for(i, self._cfg.seed) for i in ids], dtype=np.uint64)
            rows, scores, explore = epsilon_greedy(rows, scores, valid, mask, user_vecs=user_vecs,
                                                   item_vecs=item_vecs, epsilon=self._cfg.epsilon,
                                                   seeds=seeds)
            reasons = explain(rows, history_rows, item_vecs, catalog.titles, catalog.categories,
                              catalog.ids, explore)
            mark_sources(reasons, explore, trending)
        row_lists, score_lists = rows.tolist(), scores.tolist()
        explore_lists, valid_lists = explore.tolist(), valid.tolist()
        for b, user in enumerate(users):
            slots = [j for j, ok in enumerate(valid_lists[b]) if ok]
            items = tuple(
                RecommendedItem(catalog.ids[row_lists[b][j]], score_lists[b][j], rank,
                                explore_lists[b][j], reasons[b][j])
                for rank, j in enumerate(slots, start=1))
            message = Recommendation(rec_id=ids[b], user_id=user.user_id, model_version=version,
                                     generated_at=now_ms, trigger_event_id=user.trigger_event_id,
                                     items=items, trigger=user.trigger)
            outputs.append(Output(self._topics.recommendations, user.user_id.encode(),
                                  encode(message)))
            if user.trigger_produced_at:
                m.end_to_end_seconds.observe(max(0.0, (now_ms - user.trigger_produced_at) / 1000))
            if user.event_ts:
                m.event_age_seconds.observe(max(0.0, (now_ms - user.event_ts) / 1000))
        return outputs

    def _rank(self, version: str, user_vecs: np.ndarray, item_vecs: np.ndarray,
              excluded: list[np.ndarray], history_rows: list[np.ndarray],
              loaded: LoadedModel | None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, Any, np.ndarray]:
        """Exact top-k below scorer.ann_min_items items, blended with trending items where the
        model does not know the user's or the catalog's items; above, the ANN index (exact in
        user chunks while the first index builds, so no (B, N) mask is ever materialised), by
        the model alone. Items in a user's history get the model's learned repeat bias, as in
        training. The last array marks the slots the trending part ranked. scorer.trending
        "off" never blends; "only" ranks by trending items alone (_rank_trending)."""
        catalog, k = self._models.catalog, self._cfg.top_k
        if self._cfg.trending == "only" or loaded is None:
            return self._rank_trending(len(user_vecs), excluded)
        repeat_bias = loaded.repeat_bias
        if len(catalog) < self._cfg.ann_min_items:
            mask = exclusion_mask(len(user_vecs), len(catalog), excluded, catalog.available)
            weight = (knowledge(history_rows, self._trained_rows(loaded), catalog.available)
                      if self._cfg.trending == "blend"
                      else np.ones(len(user_vecs), dtype=np.float32))
            if (weight < 1).any():
                rows, scores, valid, trending = top_k_blended(
                    user_vecs, item_vecs, mask, k, history_rows=history_rows,
                    repeat_bias=repeat_bias, weight=weight,
                    trend=self._trending.scores(len(catalog)))
                return rows, scores, valid, mask, trending
            rows, scores, valid = top_k(user_vecs, item_vecs, mask, k, history_rows=history_rows,
                                        repeat_bias=repeat_bias)
            return rows, scores, valid, mask, np.zeros_like(valid)
        exclusions = Exclusions(catalog.available, excluded)
        index = self._indexes.get(version, item_vecs)
        if index is not None:
            rows, scores, valid = ann_top_k(index, user_vecs, item_vecs, exclusions, k,
                                            history_rows=history_rows, repeat_bias=repeat_bias)
            return rows, scores, valid, exclusions, np.zeros_like(valid)
        parts = [top_k(user_vecs[i:i + 16], item_vecs,
                       exclusion_mask(len(user_vecs[i:i + 16]), len(catalog), excluded[i:i + 16],
                                      catalog.available), k,
                       history_rows=history_rows[i:i + 16], repeat_bias=repeat_bias)
                 for i in range(0, len(user_vecs), 16)]
        rows, scores, valid = (np.concatenate(p) for p in zip(*parts))
        return rows, scores, valid, exclusions, np.zeros_like(valid)

    def _rank_trending(self, n_users: int, excluded: list[np.ndarray]
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, Any, np.ndarray]:
        """scorer.trending = "only": every user gets the trending items (the model's scores
        ignored) minus what the exclusion rules remove for them; each slot's source is
        trending. Above scorer.ann_min_items in user chunks, so no (B, N) mask is built."""
        catalog, k = self._models.catalog, self._cfg.top_k
        trend = self._trending.scores(len(catalog))
        if len(catalog) < self._cfg.ann_min_items:
            mask = exclusion_mask(n_users, len(catalog), excluded, catalog.available)
            rows, scores, valid = top_k_trending(trend, mask, k)
            return rows, scores, valid, mask, valid.copy()
        parts = [top_k_trending(trend, exclusion_mask(len(excluded[i:i + 16]), len(catalog),
                                                      excluded[i:i + 16], catalog.available), k)
                 for i in range(0, n_users, 16)]
        rows, scores, valid = (np.concatenate(p) for p in zip(*parts))
        return rows, scores, valid, Exclusions(catalog.available, excluded), valid.copy()

    def _trained_rows(self, loaded: LoadedModel) -> np.ndarray:
        """(N,) bool over the catalog's rows: the items `loaded` was trained on."""
        catalog = self._models.catalog
        key = (loaded.version, catalog.version_counter, len(catalog))
        if self._trained is None or self._trained[0] != key:
            trained = np.zeros(len(catalog), dtype=bool)
            rows = catalog.rows(list(loaded.item_ids))
            trained[rows[rows >= 0]] = True
            self._trained = (key, trained)
        return self._trained[1]

    def _excluded_rows(self, user: UserVector, rows: np.ndarray) -> np.ndarray:
        if self._cfg.exclude_interacted or not user.history_types:
            return rows if self._cfg.exclude_interacted else rows[:0]
        purchased = np.fromiter((t == "purchase" for t in user.history_types), dtype=bool,
                                count=len(user.history_types))
        return rows[purchased[: len(rows)]]


def _checked_vectors(group: list[Decoded], dim: int, version: str
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
            len(kept), dim)  # (B, D)
    finite = np.isfinite(user_vecs).all(axis=1)
    if not finite.all():
        refused += [Rejected(d.record, InvalidMessage(
            "invalid_value", "vector holds values beyond the float32 range", "vector"))
            for d, ok in zip(kept, finite.tolist()) if not ok]
        kept, user_vecs = [d for d, ok in zip(kept, finite.tolist()) if ok], user_vecs[finite]
    return kept, user_vecs, refused


def _mismatch(user: UserVector, dim: int, version: str) -> InvalidMessage | None:
    """What the schema cannot say about a user vector: its sizes must agree with the model's
    and with each other."""
    if len(user.vector) != dim:
        return InvalidMessage("wrong_dimension", f"vector has {len(user.vector)} dimensions, "
                              f"model {version} has {dim}", "vector")
    if user.history_types and len(user.history_types) != len(user.history):
        return InvalidMessage("invalid_value", f"history_types has {len(user.history_types)} "
                              f"entries for {len(user.history)} history items", "history_types")
    return None


def _build_handler(config: Config, deps: HandlerDeps) -> ScorerHandler:
    return ScorerHandler(cfg=config.scorer, topics=config.topics, models=deps.models,
                         metrics=deps.metrics, clock=deps.clock)


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
