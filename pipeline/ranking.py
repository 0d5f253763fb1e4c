"""Ranking metrics (pure): the rank of each held-out target among the items, and HR, NDCG and
MRR at k over those ranks. Shared by training's validation, the offline evaluation protocols
and the experiments, so every figure is computed one way.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["rank_of_targets", "hit_rate_at_k", "ndcg_at_k", "mrr_at_k"]


def rank_of_targets(
    scores: np.ndarray | torch.Tensor,
    targets: np.ndarray | torch.Tensor,
    exclude: np.ndarray | torch.Tensor | None = None,
) -> np.ndarray:
    """1-based rank of each target among the non-excluded items → (B,) int64.

    scores (B, N), targets (B,) column indices, exclude (B, N) bool (the target itself is never
    excluded). Ties count against the target (pessimistic), so a constant model never looks good.
    """
    if isinstance(scores, np.ndarray):
        scores = torch.from_numpy(scores)
    targets = torch.as_tensor(
        np.asarray(targets) if not torch.is_tensor(targets) else targets,
        dtype=torch.long,
        device=scores.device,
    )
    target_scores = scores.gather(1, targets.view(-1, 1))  # (B, 1)
    beats = scores >= target_scores  # (B, N), includes the target itself
    if exclude is not None:
        exclude = torch.as_tensor(exclude, dtype=torch.bool, device=scores.device)
        beats = beats & ~exclude  # (B, N)
        beats.scatter_(1, targets.view(-1, 1), True)
    return beats.sum(1).cpu().numpy().astype(np.int64)  # (B,)


def hit_rate_at_k(ranks: np.ndarray, k: int) -> float:
    """Share of targets ranked in the top k (ranks are 1-based)."""
    ranks = np.asarray(ranks)
    return float(np.mean(ranks <= k)) if ranks.size else 0.0


def ndcg_at_k(ranks: np.ndarray, k: int) -> float:
    """Mean 1/log2(rank + 1) over targets in the top k, 0 otherwise (one relevant item)."""
    ranks = np.asarray(ranks, dtype=np.float64)
    if not ranks.size:
        return 0.0
    return float(np.mean(np.where(ranks <= k, 1.0 / np.log2(ranks + 1.0), 0.0)))


def mrr_at_k(ranks: np.ndarray, k: int) -> float:
    """Mean 1/rank over targets in the top k, 0 otherwise."""
    ranks = np.asarray(ranks, dtype=np.float64)
    if not ranks.size:
        return 0.0
    return float(np.mean(np.where(ranks <= k, 1.0 / ranks, 0.0)))
