"""`streamrec bench --mode memory`: the updater's per-partition state, in process (no broker).

Builds N users' packed state through `PartitionState.apply` exactly as the updater does and
reports what stays allocated (tracemalloc) per user, per interned item and per dedup-window id,
then the time to snapshot it through `PartitionStore` (fsync included) and to restore it.
"""

from __future__ import annotations

import tempfile
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np

from pipeline.config import UpdaterConfig
from pipeline.messages import Event
from pipeline.state import Dedup, ItemTable, PartitionState
from pipeline.store import PartitionStore

__all__ = ["state_memory", "format_state_memory", "build_state", "held_bytes"]


def held_bytes(build: Callable[[], Any]) -> tuple[Any, int]:
    """What `build` returns and the bytes it leaves allocated."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        built = build()
        return built, tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def build_state(n_users: int, history: int, n_items: int, batch: int = 500) -> PartitionState:
    """Every user gets `history` events, users interleaved at random, some events late."""
    rng = np.random.default_rng(0)
    order = rng.permutation(np.repeat(np.arange(n_users), history)).tolist()
    items = rng.integers(0, n_items, len(order)).tolist()
    state = PartitionState(max_length=history, dedup_capacity=1)  # dedup measured on its own
    for start in range(0, len(order), batch):
        state.apply(
            [
                Event(
                    f"ev-{k:012d}",
                    f"user-{order[k]}",
                    f"item-{items[k]}",
                    "click",
                    1_700_000_000_000 + k - (k % 7) * 1000,
                )
                for k in range(start, min(start + batch, len(order)))
            ]
        )
    return state


def _snapshot_times(state: PartitionState, cfg: UpdaterConfig) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="bench-state-") as root:
        store = PartitionStore(root, "bench.events", 0)
        store.claim()
        started = time.perf_counter()
        store.compact(1, state.to_snapshot())
        snapshot_s = time.perf_counter() - started
        size = (store.path / "snapshot").stat().st_size
        started = time.perf_counter()
        restored = PartitionState.from_snapshot(
            store.restore().state, max_length=cfg.history_length, dedup_capacity=cfg.dedup_capacity
        )
        restore_s = time.perf_counter() - started
        store.close()
    assert len(restored) == len(state)
    return {
        "snapshot_seconds": round(snapshot_s, 3),
        "snapshot_bytes_per_user": round(size / len(state)),
        "restore_seconds": round(restore_s, 3),
    }


def state_memory(
    cfg: UpdaterConfig, users: tuple[int, ...] = (20_000, 100_000), n_items: int = 2000
) -> dict[str, Any]:
    history = cfg.history_length
    out: dict[str, Any] = {"history_length": history, "catalog_items": n_items, "partitions": []}
    for n in users:
        state, held = held_bytes(lambda n=n: build_state(n, history, n_items))
        out["partitions"].append(
            {"users": n, "bytes_per_user": round(held / n), **_snapshot_times(state, cfg)}
        )
        del state
    table, held = held_bytes(lambda: ItemTable(f"item-{k}" for k in range(100_000)))
    out["item_table_bytes_per_item"] = round(held / len(table))
    dedup, held = held_bytes(lambda: Dedup(100_000, (f"ev-{k:012d}" for k in range(100_000))))
    out["dedup_bytes_per_id"] = round(held / len(dedup))
    out["dedup_window_bytes_per_partition"] = round(held / len(dedup) * cfg.dedup_capacity)
    return out


def format_state_memory(m: dict[str, Any]) -> list[str]:
    lines = [
        f"updater state, {p['users']:,} users at history {m['history_length']}: "
        f"{p['bytes_per_user']} B/user in memory, snapshot {p['snapshot_seconds']} s "
        f"({p['snapshot_bytes_per_user']} B/user), restore {p['restore_seconds']} s"
        for p in m["partitions"]
    ]
    lines.append(
        f"updater state: {m['item_table_bytes_per_item']} B per interned item, "
        f"{m['dedup_bytes_per_id']} B per dedup-window id "
        f"({m['dedup_window_bytes_per_partition'] / 2**20:.1f} MiB per full window)"
    )
    return lines
