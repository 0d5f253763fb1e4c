"""The catalog and model versions a serving worker (updater, scorer) holds, kept in step.

A worker follows the global tables: item upserts grow or retire catalog rows (text vectors from
the cached MiniLM encoder), and ModelUpdate messages swap the model it serves. A swap replaces one
reference after the new version loaded and verified, so a micro-batch never mixes two versions;
the previous version stays loaded for messages still in flight that name it.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Hashable, Iterable, Sequence
from typing import Any

import numpy as np

from pipeline.codec import Decoded
from pipeline.encoder_cache import item_vectors
from pipeline.errors import RegistryError
from pipeline.items import Catalog, TextEncoder, encode_items
from pipeline.messages import Item, ModelUpdate
from pipeline.metrics import WorkerMetrics
from pipeline.registry import LoadedModel, ModelRegistry

__all__ = ["ServingModels", "RateBudget", "RescoreQueue", "catalog_from_model"]

log = logging.getLogger(__name__)


class RateBudget:
    """A token bucket for background work on the serving path (re-scoring users after a swap):
    `per_s` units a second, at most `burst` at a time, starting full."""

    def __init__(self, per_s: float, burst: int) -> None:
        self.per_s, self.burst = per_s, burst
        self._tokens = float(burst)
        self._at: float | None = None

    def take(self, now_s: float, wanted: int) -> int:
        """Units that may be spent now, at most `wanted`; they are spent."""
        if self._at is not None:
            elapsed = max(0.0, now_s - self._at)  # a clock stepped back refills nothing
            self._tokens = min(float(self.burst), self._tokens + elapsed * self.per_s)
        self._at = now_s
        granted = max(0, min(wanted, int(self._tokens)))
        self._tokens -= granted
        return granted


class RescoreQueue:
    """Users still to be re-scored under the newest model version, oldest first, each with its
    partition, counted per partition: a partition whose count reaches 0 holds only vectors of
    the newest version, which its store records (so a restart or the next owner knows)."""

    def __init__(self) -> None:
        self._users: OrderedDict[str, Hashable] = OrderedDict()
        self._left: Counter[Hashable] = Counter()

    def replace(self, entries: Iterable[tuple[str, Hashable]]) -> None:
        self._users.clear()
        self._left.clear()
        self.add(entries)

    def add(self, entries: Iterable[tuple[str, Hashable]]) -> None:
        for user_id, partition in entries:
            previous = self._users.get(user_id)
            if previous == partition:
                continue
            if previous is not None:  # queued under another partition: now behind the rest
                del self._users[user_id]
                self._left[previous] -= 1
            self._users[user_id] = partition
            self._left[partition] += 1

    def take(self, n: int) -> list[tuple[str, Hashable]]:
        """The `n` oldest entries, removed."""
        out: list[tuple[str, Hashable]] = []
        while self._users and len(out) < n:
            user_id, partition = self._users.popitem(last=False)
            self._left[partition] -= 1
            out.append((user_id, partition))
        return out

    def discard(self, user_id: str) -> None:
        """The user got a vector of the newest version some other way (an event of theirs)."""
        partition = self._users.pop(user_id, None)
        if partition is not None:
            self._left[partition] -= 1

    def drop(self, partition: Hashable) -> None:
        """Forget a revoked partition's users (its next owner queues them)."""
        if self._left.pop(partition, 0):
            self._users = OrderedDict((u, p) for u, p in self._users.items() if p != partition)

    def left(self, partition: Hashable) -> int:
        return self._left.get(partition, 0)

    def __len__(self) -> int:
        return len(self._users)

    def __contains__(self, user_id: object) -> bool:
        return user_id in self._users

    def users(self) -> list[str]:
        return list(self._users)


def catalog_from_model(loaded: LoadedModel) -> Catalog:
    """The catalog a version was trained with: the starting point before the items topic."""
    return loaded.catalog()


class ServingModels:
    """Holds the catalog, the current model and a few previous ones, with cached item vectors."""

    def __init__(
        self,
        *,
        registry: ModelRegistry,
        encoder: TextEncoder,
        metrics: WorkerMetrics,
        keep_versions: int = 2,
    ) -> None:
        self._registry = registry
        self._encoder = encoder
        self._metrics = metrics
        self._keep = keep_versions
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()
        self._item_vectors: dict[str, tuple[int, np.ndarray]] = {}
        self.current: LoadedModel | None = None
        self.catalog = Catalog()

    @property
    def version(self) -> str | None:
        """The version currently served (None before start())."""
        return self.current.version if self.current else None

    def start(self) -> None:
        """Load the registry's current version and its catalog. With no version published yet
        the worker starts without a model (`current` None, an empty catalog the items topic
        fills) and installs the first one a ModelUpdate announces. A CURRENT that names a
        version that cannot be loaded still raises RegistryError."""
        if self._registry.current_version() is None:
            log.warning(
                "registry %s has no model yet: running without one until a ModelUpdate "
                "announces the first (streamrec bootstrap)",
                self._registry.root,
            )
            return
        loaded = self._registry.load()
        self.catalog = catalog_from_model(loaded)
        self._install(loaded)

    def _install(self, loaded: LoadedModel) -> None:
        self._loaded[loaded.version] = loaded
        self._loaded.move_to_end(loaded.version)
        while len(self._loaded) > self._keep:
            old, _ = self._loaded.popitem(last=False)
            self._item_vectors.pop(old, None)
        self.current = loaded
        self._metrics.set_model_version(loaded.version, loaded.manifest.get("created_at"))

    def get(self, version: str) -> LoadedModel | None:
        """A held version, or one loaded from the registry on demand; None when unavailable."""
        if version in self._loaded:
            return self._loaded[version]
        try:
            loaded = self._registry.load(version)
        except RegistryError as exc:
            log.warning("model version %s is not loadable: %s", version, exc)
            return None
        self._loaded[version] = loaded
        self._loaded.move_to_end(version, last=False)  # an old version: first to be dropped
        while len(self._loaded) > self._keep + 1:
            old, _ = self._loaded.popitem(last=False)
            self._item_vectors.pop(old, None)
        return loaded

    def item_vectors(self, version: str) -> np.ndarray:
        """(N, D) float32 representations of every catalog row under `version`."""
        cached = self._item_vectors.get(version)
        if cached is not None and cached[0] == self.catalog.version_counter:
            return cached[1]
        loaded = self._loaded[version]
        vectors = item_vectors(loaded, self.catalog)
        self._item_vectors[version] = (self.catalog.version_counter, vectors)
        return vectors

    def apply_table(self, batch: Sequence[Decoded]) -> list[str]:
        """Apply catalog upserts and model updates in order; returns versions swapped to."""
        swapped: list[str] = []
        pending: list[Item] = []
        for decoded in batch:
            message: Any = decoded.message
            if isinstance(message, Item):
                pending.append(message)
                continue
            if pending:
                self._upsert(pending)
                pending = []
            if isinstance(message, ModelUpdate) and self._swap(message):
                swapped.append(message.version)
        if pending:
            self._upsert(pending)
        return swapped

    def _upsert(self, items: list[Item]) -> None:
        self.catalog.upsert(items, encode_items(self._encoder, items))
        self._metrics.state_items.set(len(self.catalog))

    def _adopt_catalog(self, loaded: LoadedModel) -> None:
        """The first model of a worker that started without one: the items it was trained on
        that the items topic has not brought (a bootstrap from files, items only events named)
        join the catalog, as a worker started with that model would have them."""
        items, vectors = _missing_items(loaded, self.catalog)
        if items:
            self.catalog.upsert(items, vectors)
            self._metrics.state_items.set(len(self.catalog))
            log.info(
                "first model %s: %d of its items added to the catalog", loaded.version, len(items)
            )

    def _swap(self, update: ModelUpdate) -> bool:
        if self.current is not None and update.version == self.current.version:
            return False
        # The registry's CURRENT decides: an update older than the one served is followed only
        # when CURRENT points at it (a rollback); one newer than CURRENT was never promoted or has
        # been rolled back (a restart re-reading the model-updates history must not re-apply it).
        registry_current = self._registry.current_version()
        if update.version != registry_current:
            if registry_current is not None and _newer(update.version, registry_current):
                log.info(
                    "ignoring model update %s: registry CURRENT is %s",
                    update.version,
                    registry_current,
                )
                return False
            if self.current is not None and not _newer(update.version, self.current.version):
                log.info(
                    "ignoring model update %s: older than current %s",
                    update.version,
                    self.current.version,
                )
                return False
        try:
            version = self._registry.resolve_uri(update.uri)
            if version != update.version:
                raise RegistryError(f"uri {update.uri} holds {version}, not {update.version}")
            loaded = self._registry.load(version)
        except RegistryError as exc:
            log.error("refusing model update %s: %s", update.version, exc)
            return False
        if self.current is None:
            self._adopt_catalog(loaded)
        self._install(loaded)
        self._metrics.model_swaps.inc()
        log.info("hot-swapped to model %s", loaded.version)
        return True


def _missing_items(loaded: LoadedModel, catalog: Catalog) -> tuple[list[Item], np.ndarray]:
    """The items of the catalog `loaded` was published with that `catalog` has no row for,
    with their text vectors (rows: (n, T))."""
    if loaded.text_vectors is None:
        return [], np.zeros((0, catalog.text_dim), dtype=np.float32)
    published = loaded.catalog()
    rows = [r for r, item_id in enumerate(published.ids) if catalog.row(item_id) is None]
    items = [
        Item(
            item_id=published.ids[r],
            ts=int(published.updated_ts[r]),
            title=published.titles[r],
            categories=tuple(published.categories[r]),
            available=bool(published.available[r]),
        )
        for r in rows
    ]
    return items, published.text_vectors[rows]


def _newer(candidate: str, current: str) -> bool:
    return (len(candidate), candidate) > (len(current), current)
