"""Offline evaluation on RecBole 1.2.1's sequential protocol, plus the baselines around it.

Pure pieces over in-memory data: the leave-one-out protocol split of a Dataset (stable sort by
timestamp, the whole catalog as the ranking set), its sha256 fingerprint, most-popular ranks
(with or without seen items), ranking metrics, coverage/popularity of top-k lists, and the
cold-start item split. No training loop, no CLI, no file I/O here (workers/lab/evaluate.py composes).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.datasets import Dataset
from pipeline.model import SeqRecModel
from pipeline.ranking import hit_rate_at_k, mrr_at_k, ndcg_at_k, rank_of_targets
from pipeline.training import (
    LeaveOneOut,
    UserSequence,
    build_item_index,
    build_sequences,
    leave_one_out,
    seen_rows,
)

__all__ = [
    "ProtocolSplit",
    "protocol_split",
    "split_digest",
    "PROTOCOLS",
    "ranking_metrics",
    "protocol_ranks",
    "item_counts",
    "seen_mask",
    "ranks_from_scores",
    "score_histories",
    "most_popular_ranks",
    "top_k_rows",
    "coverage_at_k",
    "average_popularity",
    "ColdStartSplit",
    "cold_start_split",
    "random_ranking_metrics",
]


# --- the protocol split -----------------------------------------------------------------------


@dataclass(frozen=True)
class ProtocolSplit:
    """Leave-one-out over the whole catalog.

    `item_ids[r - 1]` is the original id of model row r (1..N, catalog order); `split.valid`
    and `split.test` sequences end with their target; `split.train` holds all but the last two.
    """

    item_ids: tuple[str, ...]
    split: LeaveOneOut

    @property
    def num_items(self) -> int:
        return len(self.item_ids)


def protocol_split(dataset: Dataset) -> ProtocolSplit:
    """RecBole's sequential split: per user, interactions sorted by timestamp with a stable sort
    (ties keep `dataset.events` order, which for MovieLens is file order); last = test, second
    to last = validation, the rest train. Rows follow catalog order, then any item ids seen
    only in events. Users with fewer than 3 interactions go wholly to training.
    """
    index = build_item_index(
        [it.item_id for it in dataset.items] + [e.item_id for e in dataset.events]
    )
    sequences = build_sequences(dataset.events, index)
    sequences.sort(key=lambda s: (0, int(s.user_id)) if s.user_id.isdigit() else (1, s.user_id))
    return ProtocolSplit(tuple(index), leave_one_out(sequences))


def split_digest(split: ProtocolSplit) -> str:
    """sha256 of `user<TAB>valid_item<TAB>test_item` lines (original ids, split order, joined
    by newlines, no final newline): the fingerprint DESIGN.md pins for MovieLens-100K."""
    lines = [
        f"{t.user_id}\t{split.item_ids[t.items[-2] - 1]}\t{split.item_ids[t.items[-1] - 1]}"
        for t in split.split.test
    ]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


# --- metrics ------------------------------------------------------------------------------------


def ranking_metrics(ranks: np.ndarray, ks: Sequence[int] = (10, 20)) -> dict[str, float]:
    """{"hr@k", "ndcg@k", "mrr@k"} for each k from 1-based target ranks (one target per user)."""
    out: dict[str, float] = {}
    for k in ks:
        out[f"hr@{k}"] = hit_rate_at_k(ranks, k)
        out[f"ndcg@{k}"] = ndcg_at_k(ranks, k)
        out[f"mrr@{k}"] = mrr_at_k(ranks, k)
    return out


def item_counts(sequences: Sequence[UserSequence], num_items: int) -> np.ndarray:
    """Interactions per model row in `sequences` → (N + 1,) int64 (row 0 = unknown items)."""
    counts = np.zeros(num_items + 1, dtype=np.int64)
    for s in sequences:
        np.add.at(counts, s.items, 1)
    return counts


def ranks_from_scores(
    scores: np.ndarray, targets: np.ndarray, exclude: np.ndarray | None = None
) -> np.ndarray:
    """1-based ranks; scores (B, N), targets (B,) columns, exclude (B, N). Ties count against
    the target: the one rank function of ranking.rank_of_targets, on numpy inputs."""
    return rank_of_targets(
        np.asarray(scores), np.asarray(targets), None if exclude is None else np.asarray(exclude)
    )  # (B,)


def seen_mask(histories: Sequence[np.ndarray], num_items: int) -> np.ndarray:
    """(B, N) bool: True where column r - 1 is in the user's history rows r (0 ignored)."""
    mask = np.zeros((len(histories), num_items), dtype=bool)
    for b, rows in enumerate(histories):
        rows = np.asarray(rows, dtype=np.int64)
        mask[b, rows[rows > 0] - 1] = True
    return mask


# The two ways a ranking is scored. "masked" (the headline, what a scorer that excludes what the
# user already interacted with serves): every item of the user's whole history is out of the
# ranking (scored -inf), never the target. "unmasked": RecBole's sequential default, history
# items compete with the rest. Same split, same scores, same rank function for both.
PROTOCOLS = ("masked", "unmasked")


def protocol_ranks(
    scores: np.ndarray, targets: np.ndarray, histories: Sequence[np.ndarray]
) -> dict[str, np.ndarray]:
    """{"masked": ranks, "unmasked": ranks} of each target; scores (B, N) over model rows 1..N,
    targets (B,) columns, histories[b] the model rows (1..N, 0 ignored) of user b's whole
    history before the target, untruncated."""
    num_items = np.asarray(scores).shape[1]
    return {
        "masked": ranks_from_scores(scores, targets, seen_mask(histories, num_items)),
        "unmasked": ranks_from_scores(scores, targets),
    }


def most_popular_ranks(
    train: Sequence[UserSequence],
    targets: Sequence[UserSequence],
    num_items: int,
    *,
    exclude_seen: bool,
    max_length: int | None = None,
) -> np.ndarray:
    """Ranks of each target sequence's last item when every user gets the items ordered by
    interaction count in `train` → (B,) int64. With `exclude_seen`, the target sequence's
    history (all but the last, the last `max_length` when given) is removed from its ranking.
    Ties between equally popular items count against the target (pessimistic, deterministic).
    """
    counts = item_counts(train, num_items)[1:].astype(np.float64)  # (N,)
    tgt = np.array([int(s.items[-1]) - 1 for s in targets], dtype=np.int64)  # (B,)
    # A tiny decreasing row bonus breaks count ties by row, like a stable top-k would.
    scores = np.broadcast_to(counts - np.arange(num_items) * 1e-9, (len(targets), num_items))
    exclude = None
    if exclude_seen:
        hist = [s.items[:-1] if max_length is None else s.items[:-1][-max_length:] for s in targets]
        exclude = seen_mask(hist, num_items)
    return ranks_from_scores(np.array(scores), tgt, exclude)


def random_ranking_metrics(num_candidates: int, ks: Sequence[int] = (10, 20)) -> dict[str, float]:
    """Expected HR/NDCG/MRR@k of a uniformly random ranking of `num_candidates` items."""
    ranks = np.arange(1, num_candidates + 1)
    out: dict[str, float] = {}
    for k in ks:
        top = ranks[ranks <= k].astype(np.float64)
        out[f"hr@{k}"] = len(top) / num_candidates
        out[f"ndcg@{k}"] = float(np.sum(1.0 / np.log2(top + 1.0)) / num_candidates)
        out[f"mrr@{k}"] = float(np.sum(1.0 / top) / num_candidates)
    return out


@torch.no_grad()
def score_histories(
    model: SeqRecModel,
    histories: Sequence[UserSequence],
    item_text: torch.Tensor,
    *,
    candidate_rows: torch.Tensor | None = None,
    candidate_text: torch.Tensor | None = None,
    batch_size: int = 256,
) -> np.ndarray:
    """Scores of every candidate for each history's user → (B, N) float32 numpy.

    Each whole history (its last max_length items, no target removed) is the input. item_text
    (M, T) is aligned with model rows 1..M. Candidates default to model rows 1..M; for items the
    model never trained, pass `candidate_rows` (N,) model rows (0 = unknown: text only) and their
    `candidate_text` (N, T). Runs in eval mode on the model's device, fp32.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    text = item_text.to(device=device, dtype=torch.float32)
    text_full = torch.cat([torch.zeros(1, text.shape[1], device=device), text])  # (M + 1, T)
    table = model.item_vectors(torch.arange(text_full.shape[0], device=device), text_full).float()
    if candidate_rows is None:
        candidates = table[1:]  # (M, D)
    else:
        cand_text = (
            text[candidate_rows.to(device) - 1] if candidate_text is None else candidate_text
        )
        candidates = model.item_vectors(
            candidate_rows.to(device), cand_text.to(device=device, dtype=torch.float32)
        ).float()
    max_length = model.config.max_length
    out = []
    for start in range(0, len(histories), batch_size):
        chunk = histories[start : start + batch_size]
        rows = [s.items[-max_length:] for s in chunk]
        length = max(len(r) for r in rows)
        items = np.zeros((len(chunk), length), dtype=np.int64)
        types = np.zeros((len(chunk), length), dtype=np.int64)
        for b, s in enumerate(chunk):
            items[b, : len(rows[b])] = rows[b]
            types[b, : len(rows[b])] = s.types[-max_length:]
        items_t = torch.from_numpy(items).to(device)  # (B, L)
        lengths = torch.tensor([len(r) for r in rows], device=device)  # (B,)
        users = model.encode(table[items_t], torch.from_numpy(types).to(device), lengths)  # (B, D)
        seen = seen_rows(items_t, table.shape[0])  # (B, M + 1)
        seen = seen[:, 1:] if candidate_rows is None else seen[:, candidate_rows.to(device)]
        out.append(model.score(users.float(), candidates, seen).cpu().numpy())  # (B, N)
    model.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, len(candidates)), dtype=np.float32)


# --- beyond accuracy -------------------------------------------------------------------------


def top_k_rows(scores: np.ndarray, k: int, exclude: np.ndarray | None = None) -> np.ndarray:
    """Columns of the k best scores per row, best first → (B, k); excluded cells never chosen."""
    scores = np.asarray(scores, dtype=np.float64)
    if exclude is not None:
        scores = np.where(exclude, -np.inf, scores)
    part = np.argpartition(-scores, kth=min(k, scores.shape[1] - 1), axis=1)[:, :k]  # (B, k)
    order = np.argsort(-np.take_along_axis(scores, part, 1), axis=1, kind="stable")
    return np.take_along_axis(part, order, 1)  # (B, k)


def coverage_at_k(top_cols: np.ndarray, num_items: int) -> float:
    """Share of the catalog that appears in at least one user's top-k list."""
    return float(len(np.unique(np.asarray(top_cols)))) / num_items if num_items else 0.0


def average_popularity(top_cols: np.ndarray, counts: np.ndarray) -> float:
    """Mean training interaction count of recommended items; counts (N,) per column."""
    top_cols = np.asarray(top_cols)
    return float(np.mean(np.asarray(counts)[top_cols])) if top_cols.size else 0.0


# --- cold start ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ColdStartSplit:
    """A catalog with `fraction` of its items never seen in training.

    `warm_rows` (W,) and `cold_rows` (C,) are protocol rows (1..N). `train`/`valid` use warm-only
    model rows 1..W (`warm_rows[r - 1]` is the protocol row of model row r) and contain no cold
    item. `test_histories` (warm model rows) belong to the users whose test target is cold;
    `test_targets` (B,) are those targets as protocol rows.
    """

    warm_rows: np.ndarray  # (W,) int64
    cold_rows: np.ndarray  # (C,) int64
    train: list[UserSequence]
    valid: list[UserSequence]
    test_histories: list[UserSequence]
    test_targets: np.ndarray  # (B,) int64


def _warm_only(
    items: np.ndarray, types: np.ndarray, remap: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    new = remap[items]
    keep = new > 0
    return new[keep], types[keep]


def cold_start_split(
    split: LeaveOneOut, num_items: int, *, fraction: float = 0.1, seed: int = 0
) -> ColdStartSplit:
    """Hold out `fraction` of the catalog (uniformly at random, by seed) entirely from training.

    Every interaction with a cold item leaves the training part; validation keeps the users whose
    validation target is warm (for early stopping); test keeps the users whose test target is
    cold, with a history (train + validation item) of warm items only. Raises ValueError when
    `fraction` is not in (0, 1).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction={fraction} is not in (0, 1)")
    rng = np.random.default_rng(seed)
    n_cold = min(num_items - 1, max(1, round(fraction * num_items)))
    cold = np.sort(rng.choice(np.arange(1, num_items + 1), size=n_cold, replace=False))
    is_cold = np.zeros(num_items + 1, dtype=bool)
    is_cold[cold] = True
    warm = np.flatnonzero(~is_cold[1:]) + 1  # (W,)
    remap = np.zeros(num_items + 1, dtype=np.int64)  # protocol row -> warm model row (0 = none)
    remap[warm] = np.arange(1, len(warm) + 1)
    train = [UserSequence(s.user_id, *_warm_only(s.items, s.types, remap)) for s in split.train]
    valid = []
    for s in split.valid:
        if not is_cold[s.items[-1]]:
            valid.append(UserSequence(s.user_id, *_warm_only(s.items, s.types, remap)))
    histories, targets = [], []
    for s in split.test:
        items, types = _warm_only(s.items[:-1], s.types[:-1], remap)
        if is_cold[s.items[-1]] and len(items):
            histories.append(UserSequence(s.user_id, items, types))
            targets.append(int(s.items[-1]))
    return ColdStartSplit(
        warm,
        cold,
        train,
        [v for v in valid if len(v) >= 2],
        histories,
        np.array(targets, dtype=np.int64),
    )
