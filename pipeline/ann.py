"""Top-k for catalogs too large for exact scoring: an approximate inner-product index (faiss IVF)
plus sparse exclusions, so no (users x items) matrix is ever built.

`AnnIndex` is built from a snapshot of the item vectors (slow: call it off the scoring thread)
and is immutable afterwards; rows added after the build are scored exactly as a small "delta",
retired rows are filtered by `available`. `Exclusions` is the sparse twin of
scoring.exclusion_mask. No I/O; faiss runs single-threaded like the rest of the process.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

import numpy as np

__all__ = ["AnnIndex", "Exclusions", "ann_top_k", "IndexBuilder"]

log = logging.getLogger(__name__)


class Exclusions:
    """What each user may not see, without a dense (B, N) mask: unavailable rows for everyone,
    plus each user's own excluded rows. `take(rows)` answers for a (B, M) block of rows."""

    def __init__(self, available: np.ndarray, excluded_rows: Sequence[np.ndarray]) -> None:
        self.available = np.asarray(available, dtype=bool)  # (N,)
        per_user = [np.asarray(r, dtype=np.int64).reshape(-1) for r in excluded_rows]
        width = max((len(r) for r in per_user), default=0)
        self._padded = np.full((len(per_user), max(width, 1)), -1, dtype=np.int64)  # (B, E)
        for b, rows in enumerate(per_user):
            self._padded[b, : len(rows)] = rows

    @property
    def width(self) -> int:
        """The longest per-user exclusion list."""
        return int((self._padded >= 0).sum(axis=1).max(initial=0))

    @property
    def shape(self) -> tuple[int, int]:
        return self._padded.shape[0], self.available.shape[0]

    def take(self, rows: np.ndarray) -> np.ndarray:
        """(B, M) rows -> (B, M) bool, True = excluded (rows < 0 count as excluded)."""
        safe = np.clip(rows, 0, self.available.shape[0] - 1)
        own = (rows[:, :, None] == self._padded[:, None, :]).any(axis=2)  # (B, M)
        excluded: np.ndarray = (rows < 0) | ~self.available[safe] | own  # (B, M)
        return excluded

    def row(self, b: int) -> np.ndarray:
        """User b's dense (N,) mask, for the rare exact fallback."""
        mask = ~self.available.copy()
        own = self._padded[b]
        mask[own[own >= 0]] = True
        return mask


class AnnIndex:
    """IVF-flat index for the largest inner products over the first `n` catalog rows (those
    present at build).

    The item vectors are not unit length, and the users' best items are the long ones: an
    inner-product IVF clusters by direction and misses them (recall@10 0.55 at 1M items, nprobe
    32). So the items are lifted to D + 1 dimensions with sqrt(M^2 - |x|^2) (M the longest
    norm) and searched by L2 with the query lifted by 0: every lifted item has norm M, and the
    nearest one is the one with the largest inner product (Bachrach et al., 2014). Figures:
    docs/PERFORMANCE.md."""

    def __init__(self, item_vecs: np.ndarray, *, nprobe: int = 128, seed: int = 0) -> None:
        import faiss  # only catalogs above scorer.ann_min_items pay for loading it

        vectors = np.ascontiguousarray(item_vecs, dtype=np.float32)  # (N, D)
        self.n, dim = vectors.shape
        norms = np.linalg.norm(vectors, axis=1)  # (N,)
        self._max_norm = float(norms.max()) if self.n else 0.0
        lift = np.sqrt(np.maximum(self._max_norm**2 - norms**2, 0.0))  # (N,)
        lifted = np.ascontiguousarray(np.hstack([vectors, lift[:, None]]), dtype=np.float32)
        # 8 x sqrt(N) cells, at least 8 items each: half the items per cell of 4 x sqrt(N), so the
        # same nprobe scans half as many (1M items, nprobe 256: 1,200 users/s instead of 900)
        nlist = max(1, min(int(8 * np.sqrt(self.n)), self.n // 8))
        quantizer = faiss.IndexFlatL2(dim + 1)
        self._index = faiss.IndexIVFFlat(quantizer, dim + 1, nlist, faiss.METRIC_L2)
        rng = np.random.default_rng(seed)
        sample = lifted[rng.choice(self.n, size=min(self.n, 40 * nlist), replace=False)]
        self._index.train(sample)
        self._index.add(lifted)
        self._index.nprobe = min(nprobe, nlist)

    def search(self, user_vecs: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
        """(B, kk) candidate rows (-1 where fewer exist) and their inner products."""
        users = np.asarray(user_vecs, dtype=np.float32)  # (B, D)
        lifted = np.ascontiguousarray(
            np.hstack([users, np.zeros((len(users), 1), dtype=np.float32)])
        )  # (B, D + 1)
        distances, rows = self._index.search(lifted, kk)
        # |q - x'|^2 = |q|^2 + M^2 - 2 q.x  =>  q.x = (|q|^2 + M^2 - distance) / 2
        sq = (users * users).sum(axis=1, keepdims=True)  # (B, 1)
        scores = (sq + self._max_norm**2 - distances) / 2
        return rows.astype(np.int64), scores.astype(np.float32)


def ann_top_k(
    index: AnnIndex,
    user_vecs: np.ndarray,
    item_vecs: np.ndarray,
    exclusions: Exclusions,
    k: int,
    margin: int = 32,
    *,
    history_rows: Sequence[np.ndarray] = (),
    repeat_bias: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Approximate top-k with the same contract as scoring.top_k: rows (B, k), scores (B, k)
    descending (ties to the lower row), valid (B, k). Candidates: the index's best
    k + (largest exclusion list) + margin, plus every row added after the build, scored exactly.
    A user left with fewer than k allowed candidates is scored exactly (rare).
    `repeat_bias` is added to candidates in the user's `history_rows`; a history item the
    index did not retrieve is not added (with a positive bias that is an approximation)."""
    from pipeline.scoring import top_k

    n_users, n_items = user_vecs.shape[0], item_vecs.shape[0]
    kk = min(index.n, k + exclusions.width + margin)
    cand, _ = index.search(user_vecs, kk)  # (B, kk)
    # Exact scores for the candidates: the index may predate a re-embedded item.
    safe = np.clip(cand, 0, n_items - 1)
    cand_scores = np.einsum(
        "bd,bmd->bm", user_vecs.astype(np.float32), item_vecs[safe].astype(np.float32)
    )  # (B, kk)
    if n_items > index.n:  # rows added after the build: few, score them exactly
        delta = np.arange(index.n, n_items, dtype=np.int64)
        delta_scores = user_vecs.astype(np.float32) @ item_vecs[index.n :].astype(np.float32).T
        cand = np.concatenate([cand, np.broadcast_to(delta, (n_users, delta.size))], axis=1)
        cand_scores = np.concatenate([cand_scores, delta_scores], axis=1)
    if repeat_bias and len(history_rows):
        owned = Exclusions(np.ones(n_items, dtype=bool), history_rows).take(cand) & (cand >= 0)
        cand_scores = cand_scores + np.float32(repeat_bias) * owned  # (B, M)
    excluded = exclusions.take(cand)  # (B, M)
    order_scores = np.where(excluded, -np.inf, cand_scores)
    order = np.lexsort((np.where(cand < 0, n_items, cand), -order_scores), axis=1)[:, :k]  # (B, k)
    rows = np.take_along_axis(cand, order, axis=1)
    scores = np.take_along_axis(order_scores, order, axis=1).astype(np.float32)
    valid = np.isfinite(scores)
    rows = np.where(valid, rows, -1)
    allowed_total = int(exclusions.available.sum())
    for b in np.flatnonzero(valid.sum(axis=1) < min(k, allowed_total)).tolist():
        mask_b = exclusions.row(b)[None, :]
        rows[b], scores[b], valid[b] = (
            a[0]
            for a in top_k(
                user_vecs[b : b + 1],
                item_vecs,
                mask_b,
                k,
                history_rows=history_rows[b : b + 1] if len(history_rows) else (),
                repeat_bias=repeat_bias,
            )
        )
    return rows, scores, valid


class IndexBuilder:
    """Keeps one AnnIndex per model version fresh without ever blocking the scorer: `get()`
    returns the newest finished index (or None before the first) and starts a rebuild in a
    background thread when the version changed or rows added since the build exceed
    `rebuild_fraction` of it."""

    def __init__(self, *, nprobe: int = 128, rebuild_fraction: float = 0.05) -> None:
        self._nprobe = nprobe
        self._rebuild_fraction = rebuild_fraction
        self._lock = threading.Lock()
        self._ready: dict[str, AnnIndex] = {}
        self._building: threading.Thread | None = None

    def get(self, version: str, item_vecs: np.ndarray) -> AnnIndex | None:
        with self._lock:
            index = self._ready.get(version)
            stale = (
                index is None or (item_vecs.shape[0] - index.n) > self._rebuild_fraction * index.n
            )
            busy = self._building is not None and self._building.is_alive()
            if stale and not busy:
                snapshot = np.array(item_vecs, dtype=np.float32, copy=True)
                self._building = threading.Thread(
                    target=self._build,
                    args=(version, snapshot),
                    name=f"ann-build-{version}",
                    daemon=True,
                )
                self._building.start()
        return index

    def _build(self, version: str, vectors: np.ndarray) -> None:
        started = time.monotonic()
        index = AnnIndex(vectors, nprobe=self._nprobe)
        with self._lock:
            self._ready = {version: index, **{v: i for v, i in self._ready.items() if v != version}}
            while len(self._ready) > 2:
                self._ready.pop(next(iter(self._ready)))
        log.info(
            "ANN index for %s over %d items built in %.1fs",
            version,
            index.n,
            time.monotonic() - started,
        )

    def wait(self, timeout_s: float) -> None:
        """Block until the running build (if any) finished: for tests and benchmarks."""
        thread = self._building
        if thread is not None:
            thread.join(timeout_s)
