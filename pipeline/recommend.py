"""Recommendations from refreshed user vectors: the scoring both serving topologies share.

The scorer worker (user vectors read from the user-vectors topic) and the updater's co-located
path (`updater.score`: the vectors it has just computed, in the same micro-batch) both call
`recommend`, so exclusion, exploration, reasons and the rec_id derivation are written once and
the two topologies answer the same events with the same lists.

`recommend` is pure: user vectors + one model version's item table + the scoring settings in,
Recommendation messages out. `Recommender` is the thin stateful shell around it that a worker
holds between micro-batches: recency-weighted trending counts, the background ANN index builder,
and which catalog rows the served model was trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.ann import Exclusions, IndexBuilder, ann_top_k
from pipeline.config import ScorerConfig
from pipeline.items import Catalog
from pipeline.messages import TRENDING_ONLY, Recommendation, RecommendedItem, UserVector
from pipeline.registry import LoadedModel
from pipeline.scoring import (
    epsilon_greedy,
    exclusion_mask,
    explain,
    mark_sources,
    reason_vectors,
    rec_id,
    seed_for,
    top_k,
    top_k_blended,
    top_k_trending,
)
from pipeline.trending import TrendingCounts, knowledge
from pipeline.versions import ServingModels

__all__ = ["ItemTable", "Recommender", "recommend", "excluded_rows"]

# Users scored at a time on the paths that must not build a (B, N) mask over a huge catalog.
_CHUNK = 16


@dataclass(frozen=True)
class ItemTable:
    """One model version's view of the catalog, what a micro-batch is scored against.

    `item_vecs` (N, D) are the catalog's rows under `version`; `repeat_bias` is that model's
    learned offset for items a user already has, None when no model is published yet
    (TRENDING_ONLY: trending items, text vectors for the reasons); `trained` (N,) bool marks the
    rows the model was trained on; `trend` (N,) the trending scores; `index` the ANN index of
    `item_vecs` (None while it builds, or below scorer.ann_min_items)."""

    version: str
    catalog: Catalog
    item_vecs: np.ndarray
    repeat_bias: float | None
    trained: np.ndarray
    trend: np.ndarray
    index: Any = None
    reason_vecs: np.ndarray | None = None  # reason_vectors(item_vecs), kept per table


def excluded_rows(
    history_rows: np.ndarray, history_types: Sequence[str], *, exclude_interacted: bool
) -> np.ndarray:
    """The catalog rows a user may not be recommended: every history row with
    `exclude_interacted`, else the purchased ones (history_types aligned with the rows)."""
    if exclude_interacted:
        return history_rows
    if not history_types:
        return history_rows[:0]
    purchased = np.fromiter(
        (t == "purchase" for t in history_types), dtype=bool, count=len(history_types)
    )
    kept: np.ndarray = history_rows[purchased[: len(history_rows)]]
    return kept


def recommend(
    users: Sequence[UserVector],
    user_vecs: np.ndarray,
    table: ItemTable,
    *,
    cfg: ScorerConfig,
    now_ms: int,
) -> list[Recommendation]:
    """One Recommendation per user, in order, under `table.version`.

    `users` carry the history, history types and trigger; `user_vecs` (B, D) are their vectors
    (their `vector` fields are not read, so the co-located path never converts them). The rec_id
    is hash(user, trigger event or trigger, version), and seeds exploration, so the same inputs
    give the same list in any process, topology or batch.
    """
    if not users:
        return []
    catalog = table.catalog
    history_rows = [catalog.rows(list(u.history)) for u in users]
    excluded = [
        excluded_rows(rows, u.history_types, exclude_interacted=cfg.exclude_interacted)
        for u, rows in zip(users, history_rows)
    ]
    rows, scores, valid, mask, trending = _rank(table, user_vecs, excluded, history_rows, cfg)
    ids = [rec_id(u.user_id, u.trigger_event_id or u.trigger, table.version) for u in users]
    seeds = np.asarray([seed_for(i, cfg.seed) for i in ids], dtype=np.uint64)
    rows, scores, explore = epsilon_greedy(
        rows,
        scores,
        valid,
        mask,
        user_vecs=user_vecs,
        item_vecs=table.item_vecs,
        epsilon=cfg.epsilon,
        seeds=seeds,
    )
    reasons = explain(
        rows,
        history_rows,
        table.item_vecs,
        catalog.titles,
        catalog.categories,
        catalog.ids,
        explore,
        table.reason_vecs,
    )
    mark_sources(reasons, explore, trending)
    row_lists, score_lists = rows.tolist(), scores.tolist()
    explore_lists, valid_lists = explore.tolist(), valid.tolist()
    out = []
    for b, user in enumerate(users):
        # valid slots hold a catalog row, and explain() gives every such slot a reason
        slots = [
            (j, reason)
            for j, (ok, reason) in enumerate(zip(valid_lists[b], reasons[b]))
            if ok and reason is not None
        ]
        items = tuple(
            RecommendedItem(
                catalog.ids[row_lists[b][j]], score_lists[b][j], rank, explore_lists[b][j], reason
            )
            for rank, (j, reason) in enumerate(slots, start=1)
        )
        out.append(
            Recommendation(
                rec_id=ids[b],
                user_id=user.user_id,
                model_version=table.version,
                generated_at=now_ms,
                trigger_event_id=user.trigger_event_id,
                items=items,
                trigger=user.trigger,
            )
        )
    return out


def _rank(
    table: ItemTable,
    user_vecs: np.ndarray,
    excluded: list[np.ndarray],
    history_rows: list[np.ndarray],
    cfg: ScorerConfig,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, Any, np.ndarray]:
    """Exact top-k below scorer.ann_min_items items, blended with trending items where the
    model does not know the user's or the catalog's items; above, the ANN index (exact in
    user chunks while the first index builds, so no (B, N) mask is ever materialised), by
    the model alone. Items in a user's history get the model's learned repeat bias, as in
    training. The last array marks the slots the trending part ranked. scorer.trending
    "off" never blends; "only" ranks by trending items alone (_rank_trending)."""
    catalog, k, item_vecs = table.catalog, cfg.top_k, table.item_vecs
    if cfg.trending == "only" or table.repeat_bias is None:
        return _rank_trending(table, excluded, cfg)
    repeat_bias = table.repeat_bias
    if len(catalog) < cfg.ann_min_items:
        mask = exclusion_mask(len(user_vecs), len(catalog), excluded, catalog.available)
        weight = (
            knowledge(history_rows, table.trained, catalog.available)
            if cfg.trending == "blend"
            else np.ones(len(user_vecs), dtype=np.float32)
        )
        if (weight < 1).any():
            rows, scores, valid, trending = top_k_blended(
                user_vecs,
                item_vecs,
                mask,
                k,
                history_rows=history_rows,
                repeat_bias=repeat_bias,
                weight=weight,
                trend=table.trend,
            )
            return rows, scores, valid, mask, trending
        rows, scores, valid = top_k(
            user_vecs, item_vecs, mask, k, history_rows=history_rows, repeat_bias=repeat_bias
        )
        return rows, scores, valid, mask, np.zeros_like(valid)
    exclusions = Exclusions(catalog.available, excluded)
    if table.index is not None:
        rows, scores, valid = ann_top_k(
            table.index,
            user_vecs,
            item_vecs,
            exclusions,
            k,
            history_rows=history_rows,
            repeat_bias=repeat_bias,
        )
        return rows, scores, valid, exclusions, np.zeros_like(valid)
    parts = [
        top_k(
            user_vecs[i : i + _CHUNK],
            item_vecs,
            exclusion_mask(
                len(user_vecs[i : i + _CHUNK]),
                len(catalog),
                excluded[i : i + _CHUNK],
                catalog.available,
            ),
            k,
            history_rows=history_rows[i : i + _CHUNK],
            repeat_bias=repeat_bias,
        )
        for i in range(0, len(user_vecs), _CHUNK)
    ]
    rows, scores, valid = (np.concatenate(p) for p in zip(*parts))
    return rows, scores, valid, exclusions, np.zeros_like(valid)


def _rank_trending(
    table: ItemTable, excluded: list[np.ndarray], cfg: ScorerConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray, Any, np.ndarray]:
    """Trending items alone (scorer.trending = "only", or no model yet), minus what the
    exclusion rules remove for each user; each slot's source is trending. Above
    scorer.ann_min_items in user chunks, so no (B, N) mask is built."""
    catalog, k, n_users = table.catalog, cfg.top_k, len(excluded)
    if len(catalog) < cfg.ann_min_items:
        mask = exclusion_mask(n_users, len(catalog), excluded, catalog.available)
        rows, scores, valid = top_k_trending(table.trend, mask, k)
        return rows, scores, valid, mask, valid.copy()
    parts = [
        top_k_trending(
            table.trend,
            exclusion_mask(
                len(excluded[i : i + _CHUNK]),
                len(catalog),
                excluded[i : i + _CHUNK],
                catalog.available,
            ),
            k,
        )
        for i in range(0, n_users, _CHUNK)
    ]
    rows, scores, valid = (np.concatenate(p) for p in zip(*parts))
    return rows, scores, valid, Exclusions(catalog.available, excluded), valid.copy()


class Recommender:
    """What scoring keeps between micro-batches around `recommend`, for the worker that holds it
    (the scorer, or the updater with updater.score): trending counts fed by the users' new
    items, the ANN index builder, and the trained-rows cache of the version served."""

    def __init__(self, cfg: ScorerConfig, models: ServingModels) -> None:
        self.cfg = cfg
        self._models = models
        self._indexes = IndexBuilder(nprobe=cfg.ann_nprobe)
        self._trending = TrendingCounts(cfg.trending_half_life_s)
        self._trained: tuple[tuple[str, int, int], np.ndarray] | None = None
        self._reasons: tuple[np.ndarray, np.ndarray] | None = None  # (item_vecs, theirs)

    def item_vectors(self, version: str) -> np.ndarray | None:
        """(N, D) item vectors `version` scores against: the catalog's text vectors before any
        model (TRENDING_ONLY); None when the registry cannot load that version."""
        if version == TRENDING_ONLY:
            return self._models.catalog.text_vectors
        if self._models.get(version) is None:
            return None
        return self._models.item_vectors(version)

    def recommend(
        self, users: Sequence[UserVector], user_vecs: np.ndarray | None, version: str, now_ms: int
    ) -> list[Recommendation]:
        """`recommend` under `version` (which must load: check `item_vectors` first), after the
        users' new items joined the trending counts. `user_vecs` None: no model yet."""
        catalog = self._models.catalog
        for u in users:
            if u.new_items:
                self._trending.add(catalog.rows(list(u.new_items)), now_ms / 1000)
        item_vecs = self.item_vectors(version)
        if item_vecs is None:
            raise ValueError(f"model version {version!r} is not loadable")
        loaded = None if version == TRENDING_ONLY else self._models.get(version)
        if user_vecs is None or loaded is None:
            user_vecs = np.zeros((len(users), item_vecs.shape[1]), dtype=np.float32)
        index = (
            self._indexes.get(version, item_vecs)
            if loaded is not None
            and len(catalog) >= self.cfg.ann_min_items
            and self.cfg.trending != "only"
            else None
        )
        # The ANN path ranks by the model alone: no (N,) trending scores for a huge catalog.
        ranks_trending = (
            loaded is None
            or self.cfg.trending == "only"
            or (self.cfg.trending == "blend" and len(catalog) < self.cfg.ann_min_items)
        )
        trend = (
            self._trending.scores(len(catalog))
            if ranks_trending
            else np.zeros(len(catalog), dtype=np.float32)
        )
        table = ItemTable(
            version=version,
            catalog=catalog,
            item_vecs=item_vecs,
            repeat_bias=loaded.repeat_bias if loaded is not None else None,
            trained=self._trained_rows(loaded),
            trend=trend,
            index=index,
            reason_vecs=self._reason_vectors(item_vecs),
        )
        return recommend(users, user_vecs, table, cfg=self.cfg, now_ms=now_ms)

    def _reason_vectors(self, item_vecs: np.ndarray) -> np.ndarray:
        """reason_vectors of the item table, recomputed only when the table is a new array
        (ServingModels hands out the same array until the catalog or the model changes)."""
        if self._reasons is None or self._reasons[0] is not item_vecs:
            self._reasons = (item_vecs, reason_vectors(item_vecs))
        return self._reasons[1]

    def wait_for_index(self, timeout_s: float) -> None:
        """Block until a running ANN index build finished: for tests and benchmarks."""
        self._indexes.wait(timeout_s)

    def _trained_rows(self, loaded: LoadedModel | None) -> np.ndarray:
        """(N,) bool over the catalog's rows: the items `loaded` was trained on."""
        catalog = self._models.catalog
        if loaded is None:
            return np.zeros(len(catalog), dtype=bool)
        key = (loaded.version, catalog.version_counter, len(catalog))
        if self._trained is None or self._trained[0] != key:
            trained = np.zeros(len(catalog), dtype=bool)
            rows = catalog.rows(list(loaded.item_ids))
            trained[rows[rows >= 0]] = True
            self._trained = (key, trained)
        return self._trained[1]
