"""The packed state's size: memory that stays allocated per user at history length 50, measured
with tracemalloc over building the state through `apply` (a size assertion, not a timing), with
the same builder `streamrec bench --mode memory` reports from."""

from __future__ import annotations

from workers.lab.bench.memory import build_state, held_bytes


def _bytes_per_user(n_users: int, history: int, n_items: int) -> float:
    state, held = held_bytes(lambda: build_state(n_users, history, n_items))
    assert len(state) == n_users and len(state.history("user-0").item_ids) == history
    return held / n_users


def test_state_per_user_at_history_50_is_at_most_2_kib():
    assert _bytes_per_user(2000, 50, 1000) <= 2048
