"""The verdict of a `streamrec chaos` scenario: what a run without faults ends with (the clean
reference), and how the collected outputs compare with it. No process control here: these
functions read what chaos_harness.Collector gathered.

The reference folds the same events through `pipeline.state.fold` and encodes each user's final
history with the same model in-process; `compare` counts lost and applied-twice events as the
multiset difference of the histories and checks vectors within 1e-5 and the last applied event.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import orjson

from pipeline.encoder_cache import encode_users
from pipeline.encoder_cache import item_vectors as catalog_vectors
from pipeline.messages import EVENT_TYPE_INDEX, Event
from pipeline.registry import ModelRegistry
from pipeline.state import fold, window_start

__all__ = [
    "Outputs",
    "reference",
    "compare",
    "duplicate_recommendations",
    "recommendations_answer_last_events",
    "recovery_times",
    "startup_timelines",
    "base_checks",
]

_VECTOR_TOLERANCE = 1e-5


class Outputs(Protocol):
    """What the collector gathered from the output topics (chaos_harness.Collector)."""

    @property
    def lock(self) -> threading.Lock: ...
    @property  # user -> trigger event id -> the user vector it produced
    def final(self) -> Mapping[str, Mapping[str | None, dict[str, Any]]]: ...
    @property  # user -> latest user vector by arrival
    def vectors(self) -> Mapping[str, dict[str, Any]]: ...
    @property  # (user, trigger, version) -> rec ids
    def recs(self) -> Mapping[tuple[str, Any, str], list[str]]: ...
    @property  # user -> latest recommendation
    def last_rec(self) -> Mapping[str, dict[str, Any]]: ...
    @property  # (user, trigger) -> user vectors seen
    def vector_counts(self) -> Mapping[tuple[str, str | None], int]: ...


def reference(
    events: list[tuple[str, str, str, int]], models: Path, history_length: int, *, window_slide: int
) -> dict[str, dict[str, Any]]:
    """What a run without faults ends with, per user: history, last event id, vector."""
    import torch

    torch.set_num_threads(1)
    by_user: dict[str, list[Event]] = collections.defaultdict(list)
    for event_id, user, item, ts in events:
        by_user[user].append(
            Event(event_id=event_id, user_id=user, item_id=item, type="click", ts=ts)
        )
    loaded = ModelRegistry(models).load()
    catalog = loaded.catalog()
    item_vectors = catalog_vectors(loaded, catalog)
    users = sorted(by_user)
    histories = {u: fold((), by_user[u], history_length) for u in users}
    rows, types = [], []
    for u in users:
        tail = histories[u][
            window_start(
                len(histories[u]), len(by_user[u]), loaded.seq_config.max_length, window_slide
            ) :
        ]
        rows.append(catalog.rows([i.item_id for i in tail]).tolist())
        types.append([EVENT_TYPE_INDEX[i.type] for i in tail])
    vectors = encode_users(loaded, rows, types, item_vectors) if users else np.zeros((0, 1))
    return {
        u: {
            "history": [i.item_id for i in histories[u]],
            "last": by_user[u][-1].event_id,
            "vector": vectors[k],
        }
        for k, u in enumerate(users)
    }


def compare(ref: dict[str, dict[str, Any]], collector: Outputs) -> dict[str, Any]:
    """Lost / applied-twice events, vector distance and last-event mismatches against `ref`."""
    lost = twice = wrong_last = missing_users = vector_mismatch = 0
    max_diff = 0.0
    with collector.lock:
        for user, want in ref.items():
            got = collector.final.get(user, {}).get(want["last"]) or collector.vectors.get(user)
            if got is None:
                missing_users += 1
                lost += len(want["history"])
                continue
            latest = collector.vectors.get(user, got)
            if latest.get("trigger_event_id") != want["last"]:
                wrong_last += 1
            a, b = collections.Counter(want["history"]), collections.Counter(got["history"])
            lost += sum((a - b).values())
            twice += sum((b - a).values())
            diff = (
                float(np.max(np.abs(np.asarray(got["vector"], dtype=np.float64) - want["vector"])))
                if len(got["vector"])
                else 1.0
            )
            max_diff = max(max_diff, diff)
            if diff > _VECTOR_TOLERANCE or got["history"] != want["history"]:
                vector_mismatch += 1
    return {
        "users": len(ref),
        "events_lost": lost,
        "events_applied_twice": twice,
        "users_missing": missing_users,
        "users_last_event_wrong": wrong_last,
        "users_state_mismatch": vector_mismatch,
        "max_vector_diff": max_diff,
    }


def duplicate_recommendations(collector: Outputs) -> dict[str, Any]:
    with collector.lock:
        groups = list(collector.recs.values())
    dups = [ids for ids in groups if len(ids) > 1]
    return {
        "recommendations": sum(len(ids) for ids in groups),
        "duplicate_recommendations": sum(len(ids) - 1 for ids in dups),
        "duplicates_same_rec_id": all(len(set(ids)) == 1 for ids in dups),
    }


def recommendations_answer_last_events(
    ref: dict[str, dict[str, Any]], collector: Outputs
) -> dict[str, Any]:
    """Every user's last recommendation answers their last event; every vector got one."""
    with collector.lock:
        wrong = sum(
            1
            for u, want in ref.items()
            if (collector.last_rec.get(u) or {}).get("trigger_event_id") != want["last"]
        )
        answered = {(u, trig) for (u, trig, _v) in collector.recs}
        missing = sum(1 for (u, trig) in collector.vector_counts if (u, trig) not in answered)
    return {"users_last_rec_wrong": wrong, "vectors_without_recommendation": missing}


def recovery_times(restarts: list[float], arrivals: list[float]) -> dict[str, Any]:
    """Seconds from each restart to the first output the restarted worker produced."""
    ordered = sorted(arrivals)
    out = []
    for t in restarts:
        i = int(np.searchsorted(ordered, t))
        if i < len(ordered):
            out.append(ordered[i] - t)
    if not out:
        return {"restarts": len(restarts), "recovered": 0}
    arr = np.asarray(out)
    return {
        "restarts": len(restarts),
        "recovered": len(out),
        "p50_s": round(float(np.percentile(arr, 50)), 2),
        "p95_s": round(float(np.percentile(arr, 95)), 2),
        "max_s": round(float(arr.max()), 2),
    }


def startup_timelines(log_text: str, after: float = 0.0) -> dict[str, Any]:
    """The `start-up timeline` lines a worker logged (workers/runtime.py) after wall time `after`:
    per step, p50 and max seconds since process start, over the starts it covers."""
    import datetime

    runs: list[dict[str, float]] = []
    for line in log_text.splitlines():
        at = line.find("start-up timeline {")
        if at < 0:
            continue
        try:
            stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            steps = orjson.loads(line[at + len("start-up timeline ") :])
        except (ValueError, orjson.JSONDecodeError):
            continue
        if stamp >= after:
            runs.append(steps)
    if not runs:
        return {"starts": 0}
    names = sorted(
        {k for r in runs for k in r}, key=lambda k: np.median([r[k] for r in runs if k in r])
    )
    return {
        "starts": len(runs),
        "p50_s": {k: round(float(np.median([r[k] for r in runs if k in r])), 2) for k in names},
        "max_s": {k: round(float(max(r[k] for r in runs if k in r)), 2) for k in names},
    }


def base_checks(r: dict[str, Any]) -> dict[str, bool]:
    return {
        "no_event_lost": r["events_lost"] == 0,
        "none_applied_twice": r["events_applied_twice"] == 0,
        "state_equals_reference": r["users_state_mismatch"] == 0 and r["users_missing"] == 0,
        "last_event_equal": r["users_last_event_wrong"] == 0,
        "lag_back_to_zero": r["lag_zero"],
        "replay_ok": "replay_error" not in r,
    }
