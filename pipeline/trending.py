"""Trending items, and how much of a ranking they get: what serves a catalog the model does not
know yet (a new deployment, a turned-over catalog) until a fine-tune has learned it.

`TrendingCounts` keeps recency-weighted interaction counts per catalog row: an interaction at
time t adds 2^((t - t0) / half_life) instead of decaying every count, so an update touches only
the rows interacted with and the ranking at any moment is the ranking of the stored values (the
decay is a factor common to all). `knowledge` says how much the model knows a user and the
catalog; `blend` mixes the model's scores with the trending ones by it. Pure numpy, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["TrendingCounts", "knowledge", "blend"]

# Past 2^60 the reference time moves forward and every count is rescaled (float64 keeps ~2^1023).
_RESCALE_AT = 60.0


class TrendingCounts:
    """Recency-weighted interaction counts, by catalog row, halving every `half_life_s`."""

    def __init__(self, half_life_s: float) -> None:
        if half_life_s <= 0:
            raise ValueError(f"half_life_s must be > 0, got {half_life_s}")
        self.half_life_s = half_life_s
        self._t0: float | None = None
        self._values = np.zeros(0, dtype=np.float64)

    def add(self, rows: np.ndarray, now_s: float) -> None:
        """Count one interaction with each row of `rows` (-1 = not in the catalog: ignored)."""
        rows = np.asarray(rows, dtype=np.int64)
        rows = rows[rows >= 0]
        if not len(rows):
            return
        if self._t0 is None:
            self._t0 = now_s
        exponent = (now_s - self._t0) / self.half_life_s
        if exponent > _RESCALE_AT:
            self._values *= 2.0**-exponent
            self._t0, exponent = now_s, 0.0
        if rows.max() >= len(self._values):
            self._values = np.concatenate(
                [self._values, np.zeros(int(rows.max()) + 1 - len(self._values))]
            )
        np.add.at(self._values, rows, 2.0**exponent)

    def scores(self, n_rows: int) -> np.ndarray:
        """(n_rows,) float32 in [0, 1]: each row's count over the largest (0 when none)."""
        out = np.zeros(n_rows, dtype=np.float64)
        m = min(n_rows, len(self._values))
        out[:m] = self._values[:m]
        top = out.max() if n_rows else 0.0
        return (out / top if top > 0 else out).astype(np.float32)

    def counts(self, n_rows: int, now_s: float) -> np.ndarray:
        """(n_rows,) the decayed counts as of `now_s` (for reasons and metrics)."""
        out = np.zeros(n_rows, dtype=np.float64)
        m = min(n_rows, len(self._values))
        if self._t0 is not None and m:
            out[:m] = self._values[:m] * 2.0 ** (-(now_s - self._t0) / self.half_life_s)
        return out


def knowledge(
    history_rows: Sequence[np.ndarray], trained: np.ndarray, available: np.ndarray
) -> np.ndarray:
    """(B,) how much the model knows each user and the catalog, in [0, 1]: the share of the
    user's history items the model was trained on, times the share of the available catalog it
    was trained on. 1 for a model trained on everything it serves (the blend changes nothing)."""
    known_catalog = float(trained[available].mean()) if available.any() else 0.0
    out = np.zeros(len(history_rows), dtype=np.float32)
    for b, rows in enumerate(history_rows):
        rows = rows[rows >= 0]
        out[b] = trained[rows].mean() if len(rows) else 0.0
    return out * np.float32(known_catalog)


def blend(
    model_scores: np.ndarray, mask: np.ndarray, trend: np.ndarray, weight: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Mix the model's (B, N) scores with trending (N,) scores by each user's (B,) weight.

    The model's scores are standardised over the user's allowed items and squashed into (0, 1)
    (a logistic), so both parts share a scale: blended = w * model + (1 - w) * trend. With
    w = 1 the order is the model's. Returns (blended (B, N) float32, trending share (B, N) bool:
    where the trending part outweighs the model's, the item's `source`).
    """
    allowed = ~mask
    n = np.maximum(allowed.sum(axis=1, keepdims=True), 1)  # (B, 1)
    masked = np.where(allowed, model_scores, 0.0)
    mean = masked.sum(axis=1, keepdims=True) / n
    var = (np.where(allowed, model_scores - mean, 0.0) ** 2).sum(axis=1, keepdims=True) / n
    z = (model_scores - mean) / np.sqrt(var + 1e-12)
    model_part = 1.0 / (1.0 + np.exp(-np.clip(z, -30, 30)))  # (B, N) in (0, 1)
    w = weight.astype(np.float32)[:, None]  # (B, 1)
    model_part = w * model_part
    trend_part = (1 - w) * trend.astype(np.float32)[None, :]  # (B, N)
    return (model_part + trend_part).astype(np.float32), trend_part > model_part
