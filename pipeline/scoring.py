"""Scoring: exclusion masks, exact top-k, epsilon-greedy exploration, ids and reasons.

Consumes user vectors, the item-vector table and catalog metadata for one micro-batch;
produces ranked catalog rows, scores, explore flags and the `reason` objects of the
Recommendation contract. Pure numpy: no torch, no I/O, no clocks; randomness comes only
from the seeds passed in, one per user, so a user's list never depends on its batch-mates.

Size: every step from scores to the published list (mask, top-k, exploration, ids,
reasons) is one pure pipeline over one batch, property-tested against one reference.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Sequence
from typing import Any, cast

import numpy as np

from pipeline.trending import blend

__all__ = [
    "exclusion_mask",
    "top_k",
    "top_k_blended",
    "top_k_trending",
    "epsilon_greedy",
    "seed_for",
    "rec_id",
    "explain",
    "reason_vectors",
    "mark_sources",
]


def exclusion_mask(
    n_users: int, n_items: int, excluded_rows: Sequence[np.ndarray], available: np.ndarray
) -> np.ndarray:
    """Return the (B, N) bool mask of items that may NOT be recommended (True = excluded).

    An item is excluded for every user when `available[row]` is False (retired or unknown to
    the scorer), and for user b when its row is in `excluded_rows[b]` (the caller decides what
    that holds: purchased rows, or every interacted row). Row -1 means "item not in the
    catalog" and is ignored. Raises ValueError on mismatched lengths or rows outside [-1, N).
    """
    available = np.asarray(available, dtype=bool)
    if available.shape != (n_items,):
        raise ValueError(f"available has shape {available.shape}, expected ({n_items},)")
    if len(excluded_rows) != n_users:
        raise ValueError(f"excluded_rows has {len(excluded_rows)} entries, expected {n_users}")
    mask = np.empty((n_users, n_items), dtype=bool)  # (B, N)
    mask[:] = ~available
    users, rows = _user_rows(excluded_rows, n_items, "excluded")
    mask[users, rows] = True
    return mask


def _user_rows(
    rows_per_user: Sequence[np.ndarray], n_items: int, what: str
) -> tuple[np.ndarray, np.ndarray]:
    """Flatten per-user row lists into (user, row) index pairs, dropping -1 (not in catalog)."""
    per_user = [np.asarray(r, dtype=np.int64).reshape(-1) for r in rows_per_user]
    if not per_user:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    users = np.repeat(np.arange(len(per_user)), [len(r) for r in per_user])  # (E,)
    rows = np.concatenate(per_user)  # (E,)
    bad = (rows < -1) | (rows >= n_items)
    if bad.any():
        raise ValueError(f"{what} row {int(rows[bad][0])} outside [-1, {n_items})")
    known = rows >= 0
    return users[known], rows[known]


def _rank_key(scores: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Map (score, row, mask) to one unique uint64 per cell, smaller = ranked higher.

    High 32 bits: the float32 score as an order-reversing uint32, with masked cells at the
    maximum (below every real score, even -inf). Low 32 bits: the row, so a lower row wins a
    tie. Unique keys make a single argpartition exact and deterministic without a full sort;
    the halves are written through a uint32 view, avoiding (B, N) uint64 shift temporaries.
    """
    bits = (scores.astype(np.float32) + np.float32(0.0)).view(np.uint32)  # (B, N); -0.0 -> +0.0
    flip = (bits.view(np.int32) >> 31).view(np.uint32)  # (B, N) all-ones where negative
    flip |= np.uint32(0x80000000)
    bits ^= flip  # IEEE bits -> ascending uint32 order
    np.invert(bits, out=bits)  # descending scores -> ascending keys
    np.copyto(bits, np.uint32(0xFFFFFFFF), where=mask)
    key = np.empty(scores.shape, dtype=np.uint64)  # (B, N)
    halves = key.view(np.uint32).reshape(*scores.shape, 2)  # (B, N, 2)
    hi, lo = (1, 0) if sys.byteorder == "little" else (0, 1)
    halves[..., hi] = bits
    halves[..., lo] = np.arange(scores.shape[1], dtype=np.uint32)
    return key


def top_k(
    user_vecs: np.ndarray,
    item_vecs: np.ndarray,
    mask: np.ndarray,
    k: int,
    *,
    history_rows: Sequence[np.ndarray] = (),
    repeat_bias: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact top-k items by dot product per user, masked items excluded.

    user_vecs (B, D) and item_vecs (N, D) float32, mask (B, N) bool (True = excluded).
    `repeat_bias` (the model's learned offset for items a user already has) is added to the
    score of each user's `history_rows` (B lists of catalog rows, -1 = not in the catalog).
    Returns rows (B, k) int64, scores (B, k) float32 sorted descending, valid (B, k) bool.
    Ties go to the lower row. When a user has fewer than k allowed items (or k > N), the
    tail slots have valid False, row -1 and score -inf; callers must drop them.
    Scores are expected finite; N must be below 2**32.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n_users, n_items = user_vecs.shape[0], item_vecs.shape[0]
    if mask.shape != (n_users, n_items):
        raise ValueError(f"mask has shape {mask.shape}, expected ({n_users}, {n_items})")
    all_scores = _model_scores(user_vecs, item_vecs, history_rows, repeat_bias)  # (B, N)
    return _select(all_scores, mask, k)


def top_k_blended(
    user_vecs: np.ndarray,
    item_vecs: np.ndarray,
    mask: np.ndarray,
    k: int,
    *,
    history_rows: Sequence[np.ndarray],
    repeat_bias: float,
    trend: np.ndarray,
    weight: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`top_k` over the model's scores blended with trending ones (pipeline/trending.blend) by
    each user's weight; also returns (B, k) bool: the slots the trending part ranked."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if mask.shape != (user_vecs.shape[0], item_vecs.shape[0]):
        raise ValueError(
            f"mask has shape {mask.shape}, expected ({user_vecs.shape[0]}, {item_vecs.shape[0]})"
        )
    model = _model_scores(user_vecs, item_vecs, history_rows, repeat_bias)
    blended, trending = blend(model, mask, trend, weight)
    rows, scores, valid = _select(blended, mask, k)
    ranked_by_trend = np.take_along_axis(trending, np.maximum(rows, 0), axis=1) & valid
    return rows, scores, valid, ranked_by_trend


def top_k_trending(
    trend: np.ndarray, mask: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`top_k` by the (N,) trending scores alone, the same for every user but for the (B, N)
    mask (scorer.trending = "only": popularity, the model's scores ignored). Ties, such as the
    items nobody interacted with yet, go to the lower row."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if trend.shape != (mask.shape[1],):
        raise ValueError(f"trend has shape {trend.shape}, expected ({mask.shape[1]},)")
    return _select(np.broadcast_to(trend.astype(np.float32)[None, :], mask.shape), mask, k)


def _model_scores(
    user_vecs: np.ndarray,
    item_vecs: np.ndarray,
    history_rows: Sequence[np.ndarray],
    repeat_bias: float,
) -> np.ndarray:
    all_scores = user_vecs.astype(np.float32) @ item_vecs.astype(np.float32).T  # (B, N)
    if repeat_bias and len(history_rows):
        users, seen = _user_rows(history_rows, item_vecs.shape[0], "history")
        all_scores[users, seen] += np.float32(repeat_bias)  # duplicates add once: seen is a set
    return all_scores


def _select(
    all_scores: np.ndarray, mask: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The k best allowed items of each row of (B, N) scores, best first (see top_k)."""
    n_users, n_items = all_scores.shape
    kk = min(k, n_items)
    rows = np.full((n_users, k), -1, dtype=np.int64)
    scores = np.full((n_users, k), -np.inf, dtype=np.float32)
    valid = np.zeros((n_users, k), dtype=bool)
    if kk == 0 or n_users == 0:
        return rows, scores, valid
    key = _rank_key(all_scores, mask)  # (B, N); smallest = best
    part = np.argpartition(key, kk - 1, axis=1)[:, :kk]  # (B, kk) unordered best
    order = np.argsort(np.take_along_axis(key, part, axis=1), axis=1)  # keys unique: stable
    best = np.take_along_axis(part, order, axis=1)  # (B, kk)
    ok = ~np.take_along_axis(mask, best, axis=1)  # (B, kk); masked sort last, so ok is a prefix
    rows[:, :kk] = np.where(ok, best, -1)
    scores[:, :kk] = np.where(ok, np.take_along_axis(all_scores, best, axis=1), -np.inf)
    valid[:, :kk] = ok
    return rows, scores, valid


def epsilon_greedy(
    rows: np.ndarray,
    scores: np.ndarray,
    valid: np.ndarray,
    mask: np.ndarray,
    *,
    user_vecs: np.ndarray,
    item_vecs: np.ndarray,
    epsilon: float,
    seeds: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Replace each valid slot, with probability epsilon, by a random allowed unlisted item.

    rows/scores/valid (B, k) come from `top_k`, mask (B, N) is the one it used (or the sparse
    `pipeline.ann.Exclusions` for catalogs scored approximately); user_vecs
    (B, D) and item_vecs (N, D) give an explored item its real dot-product score. Each user's
    draws come from its own seed only (`_uniform`), so its list does not depend on who else
    is in the batch. Explore items are drawn without replacement from the allowed items not
    already in the list; when too few remain, the later explore draws keep their exploit item.
    Returns new (rows, scores, explore (B, k) bool); inputs are not modified.

    No re-ranking: exploit items keep their score order and explore items sit in the slots
    they replaced. Re-sorting by score would push explore items (low scores by construction)
    to the bottom, where position bias hides them and their feedback would teach little.
    """
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
    n_users, k = rows.shape
    if len(seeds) != n_users:
        raise ValueError(f"seeds has {len(seeds)} entries, expected {n_users}")
    rows, scores = rows.copy(), scores.copy()
    explore = np.zeros((n_users, k), dtype=bool)
    if epsilon == 0.0 or n_users == 0:
        return rows, scores, explore
    n_items = mask.shape[1]
    draws = 3 * k + 8  # candidate draws per user before falling back to an exact pick
    uniform = _uniform(np.asarray(seeds, dtype=np.uint64), k + draws)  # (B, k + M)
    wants = (uniform[:, :k] < epsilon) & valid  # (B, k)
    candidates = np.minimum((uniform[:, k:] * n_items).astype(np.int64), n_items - 1)  # (B, M)
    listed = (candidates[:, :, None] == rows[:, None, :]).any(axis=2)  # (B, M)
    usable = ~_excluded_at(mask, candidates) & ~listed  # (B, M)
    for b in np.flatnonzero(wants.any(axis=1)).tolist():  # only users with explore slots
        slots = np.flatnonzero(wants[b])  # (m,)
        picks = list(dict.fromkeys(candidates[b][usable[b]].tolist()))[: slots.size]
        if len(picks) < slots.size:  # catalog mostly excluded: pick exactly among what is left
            allowed = ~(mask[b] if isinstance(mask, np.ndarray) else mask.row(b))  # (N,)
            allowed[rows[b][valid[b]]] = False
            pool = np.flatnonzero(allowed)  # (C,)
            rng = np.random.default_rng(int(seeds[b]))
            picks = rng.permutation(pool)[: slots.size].tolist()
            slots = slots[: len(picks)]
        if not picks:
            continue
        chosen = np.asarray(picks, dtype=np.int64)  # (m,)
        rows[b, slots] = chosen
        scores[b, slots] = item_vecs[chosen].astype(np.float32) @ user_vecs[b].astype(np.float32)
        explore[b, slots] = True
    return rows, scores, explore


def _excluded_at(mask: Any, rows: np.ndarray) -> np.ndarray:
    """(B, M) exclusion flags of `rows`, from a dense (B, N) mask or a sparse ann.Exclusions."""
    if isinstance(mask, np.ndarray):
        return np.take_along_axis(mask, rows, axis=1)
    return mask.take(rows)  # type: ignore[no-any-return]


def _uniform(seeds: np.ndarray, n: int) -> np.ndarray:
    """(B, n) uniforms in [0, 1), counter-based (splitmix64 of seed + i): each user's stream
    depends on its seed alone, and a whole batch is drawn in a few vector operations."""
    step = np.uint64(0x9E3779B97F4A7C15)
    counters = np.arange(1, n + 1, dtype=np.uint64) * step  # (n,), wraps mod 2**64
    z = seeds.reshape(-1, 1) + counters.reshape(1, -1)  # (B, n)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    uniforms: np.ndarray = (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
    return uniforms


def _digest(*fields: str | int | None) -> bytes:
    """sha256 of a length-prefixed encoding, so ("ab", "c") and ("a", "bc") never collide."""
    h = hashlib.sha256()
    for f in fields:
        if f is None:
            h.update(b"\x00")  # distinct from the empty string
            continue
        data = str(f).encode("utf-8")
        h.update(b"\x01" + len(data).to_bytes(8, "big") + data)
    return h.digest()


def seed_for(rec_id: str, base_seed: int) -> int:
    """A stable 64-bit seed in [0, 2**64) for one recommendation: same inputs, same seed, any process."""
    return int.from_bytes(_digest("seed", base_seed, rec_id)[:8], "big")


def rec_id(user_id: str, trigger: str | None, model_version: str) -> str:
    """Deterministic 32-hex-char id of (user, trigger event id or trigger, model version)."""
    return _digest("rec", user_id, trigger, model_version).hex()[:32]


def reason_vectors(item_vecs: np.ndarray) -> np.ndarray:
    """The (N, D) vectors `explain` compares items with: centered first, because the model's
    item vectors share a large common direction that would make every pair look ~0.99
    similar (what sets items apart is the deviation from the mean), then unit length."""
    return _unit(item_vecs - item_vecs.mean(axis=0, keepdims=True))


def _unit(vecs: np.ndarray) -> np.ndarray:
    """Row-normalise (n, D) float32 vectors for cosine; zero rows stay zero (cosine 0)."""
    vecs = vecs.astype(np.float32)
    norms = np.linalg.norm(vecs, axis=1, keepdims=True)  # (n, 1)
    return vecs / np.where(norms > 0, norms, np.float32(1.0))


def _no_history(is_explore: bool) -> dict[str, Any]:
    text = (
        "Exploring something new for you: no history yet"
        if is_explore
        else "Popular/similar pick: no history yet"
    )
    return {
        "text": text,
        "history_item_id": None,
        "history_title": None,
        "shared_categories": [],
        "similarity": None,
    }


def _reason(
    is_explore: bool, is_self: bool, title: str, item_id: str, shared: list[str], sim: float
) -> dict[str, Any]:
    if is_self:
        evidence = f'you interacted with "{title}" before'
    else:
        evidence = f'you interacted with "{title}" (similarity {sim:.2f})'
    text = (
        f"Exploring something new for you: closest to what {evidence}"
        if is_explore
        else f"Because {evidence}"
    )
    if shared:
        text += "; also " + ", ".join(shared)
    return {
        "text": text,
        "history_item_id": item_id,
        "history_title": title,
        "shared_categories": shared,
        "similarity": round(sim, 4),
    }


def explain(
    rec_rows: np.ndarray,
    history_rows: Sequence[np.ndarray],
    item_vecs: np.ndarray,
    titles: Sequence[str],
    categories: Sequence[tuple[str, ...]],
    item_ids: Sequence[str],
    explore: np.ndarray,
    unit_vecs: np.ndarray | None = None,
) -> list[list[dict[str, Any] | None]]:
    """Build the contract's `reason` object for every recommended slot.

    rec_rows (B, k) catalog rows; history_rows[b] the user's history rows, oldest first, -1 for
    items not in the catalog (ignored); item_vecs (N, D) (mean-centered and normalised here for
    cosine); titles,
    categories, item_ids indexed by row; explore (B, k). The evidence is the history item with
    the highest cosine to the recommended item: the most recent one on ties, and never the item
    itself unless it is the only candidate. shared_categories keeps the recommended item's order.
    A user with no known history gets null evidence. Slots with row < 0 (invalid) get None.
    `unit_vecs`: `reason_vectors(item_vecs)` when the caller keeps it per item table (a large
    catalog costs one pass over every row to center and normalise); computed here otherwise.
    """
    if len(history_rows) != rec_rows.shape[0] or explore.shape != rec_rows.shape:
        raise ValueError(
            f"rec_rows {rec_rows.shape}, explore {explore.shape} and "
            f"{len(history_rows)} histories disagree"
        )
    unit = reason_vectors(item_vecs) if unit_vecs is None else unit_vecs  # (N, D)
    best_rows, best_sims, has_history = _closest_history(rec_rows, history_rows, unit)
    rec_lists, explore_lists = rec_rows.tolist(), explore.tolist()
    best_row_lists, best_sim_lists = best_rows.tolist(), best_sims.tolist()
    out: list[list[dict[str, Any] | None]] = []
    for b, recs in enumerate(rec_lists):
        if not has_history[b]:
            out.append([_no_history(e) if r >= 0 else None for r, e in zip(recs, explore_lists[b])])
            continue
        user_reasons: list[dict[str, Any] | None] = []
        for j, (r, e) in enumerate(zip(recs, explore_lists[b])):
            if r < 0:
                user_reasons.append(None)
                continue
            h = best_row_lists[b][j]
            shared_with = set(categories[h])
            shared = [c for c in categories[r] if c in shared_with]
            user_reasons.append(
                _reason(e, r == h, titles[h], item_ids[h], shared, best_sim_lists[b][j])
            )
        out.append(user_reasons)
    return out


_TIE = 1e-6  # cosines closer than this count as equal when picking a reason's history item


def _closest_history(
    rec_rows: np.ndarray, history_rows: Sequence[np.ndarray], unit: np.ndarray
) -> tuple[np.ndarray, np.ndarray, list[bool]]:
    """For every slot, the history row with the highest cosine to the recommended item, for the
    whole batch in one batched matmul: rec_rows (B, k), unit (N, D) → best rows (B, k), their
    cosines (B, k), and whether each user has any known history item."""
    n_users = rec_rows.shape[0]
    width = max((len(h) for h in history_rows), default=0)
    hist = np.full((n_users, max(width, 1)), -1, dtype=np.int64)  # (B, H) oldest first
    for b, rows in enumerate(history_rows):
        hist[b, : len(rows)] = np.asarray(rows, dtype=np.int64).reshape(-1)
    hist = hist[:, ::-1]  # (B, H) newest first, padding first: argmax prefers the most recent
    known = hist >= 0  # (B, H)
    recs_safe = np.where(rec_rows >= 0, rec_rows, 0)  # (B, k)
    sims = unit[recs_safe] @ unit[np.where(known, hist, 0)].transpose(0, 2, 1)  # (B, k, H) cosine
    is_self = recs_safe[:, :, None] == hist[:, None, :]  # (B, k, H)
    # -2 < any cosine: the item itself only when nothing else is known; -3: not a history item.
    ranked = np.where(known[:, None, :], np.where(is_self, -2.0, sims), -3.0)  # (B, k, H)
    # Ties go to the most recent item. A batched matmul may not give two equal vectors
    # bit-identical cosines, so "tied" means within _TIE of the best: the first such, newest.
    near_best = ranked >= ranked.max(axis=2, keepdims=True) - _TIE  # (B, k, H)
    best = near_best.argmax(axis=2)  # (B, k) first True
    best_rows = np.take_along_axis(hist, best, axis=1)  # (B, k)
    best_sims = np.take_along_axis(sims, best[:, :, None], axis=2)[:, :, 0]  # (B, k)
    has_history = cast("list[bool]", known.any(axis=1).tolist())  # (B,)
    return best_rows, best_sims, has_history


def mark_sources(
    reasons: list[list[dict[str, Any] | None]], explore: np.ndarray, trending: np.ndarray
) -> None:
    """Say in each slot's reason which source ranked it (`source`: model, trending or explore);
    a trending slot's text says so first."""
    explore_lists, trending_lists = explore.tolist(), trending.tolist()
    for b, user_reasons in enumerate(reasons):
        for j, reason in enumerate(user_reasons):
            if reason is None:
                continue
            if explore_lists[b][j]:
                reason["source"] = "explore"
            elif trending_lists[b][j]:
                reason["source"] = "trending"
                reason["text"] = (
                    "Trending now among recent interactions; "
                    + reason["text"][0].lower()
                    + reason["text"][1:]
                )
            else:
                reason["source"] = "model"
