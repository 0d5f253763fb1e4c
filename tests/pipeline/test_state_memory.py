"""The packed state's size: memory that stays allocated per user at history length 50, measured
with tracemalloc over building the state through `apply` (a size assertion, not a timing)."""

from __future__ import annotations

import tracemalloc

import numpy as np

from pipeline.messages import Event
from pipeline.state import PartitionState


def _bytes_per_user(n_users: int, history: int, n_items: int) -> float:
    rng = np.random.default_rng(0)
    order = rng.permutation(np.repeat(np.arange(n_users), history)).tolist()
    items = rng.integers(0, n_items, len(order)).tolist()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        state = PartitionState(max_length=history, dedup_capacity=1)  # dedup: a per-partition cost
        for start in range(0, len(order), 500):
            state.apply(
                [
                    Event(
                        f"ev-{k:012d}",
                        f"user-{order[k]}",
                        f"item-{items[k]}",
                        "click",
                        1_700_000_000_000 + k - (k % 7) * 1000,
                    )
                    for k in range(start, min(start + 500, len(order)))
                ]
            )
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(state) == n_users and len(state.history("user-0").item_ids) == history
    return held / n_users


def test_state_per_user_at_history_50_is_at_most_2_kib():
    assert _bytes_per_user(2000, 50, 1000) <= 2048
