"""The load side of every bench mode: synthetic events, paced producing, and matching each
recommendation back to the events it answers (freshness = produced -> recommendation consumed)."""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson

from pipeline.config import Config
from pipeline.errors import StreamrecError
from pipeline.kafka import KafkaSink, TableReader
from pipeline.registry import ModelRegistry

log = logging.getLogger(__name__)

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

__all__ = [
    "load_settings",
    "percentiles",
    "Freshness",
    "collect",
    "cpu_seconds",
    "EventSource",
    "registry_items",
    "produce_paced",
    "offered_load",
    "wait_answered",
]


def load_settings(rate: float, duration_s: float, users: int, items: int) -> dict[str, Any]:
    """The offered load's settings as every bench result reports them."""
    return {"rate": rate, "duration_s": duration_s, "users": users, "catalog_items": items}


def percentiles(values_ms: list[float]) -> dict[str, float]:
    if not values_ms:
        return {}
    arr = np.asarray(values_ms)
    return {
        "p50_ms": float(np.percentile(arr, 50)),
        "p90_ms": float(np.percentile(arr, 90)),
        "p99_ms": float(np.percentile(arr, 99)),
        "p99.9_ms": float(np.percentile(arr, 99.9)),
        "max_ms": float(arr.max()),
        "count": int(arr.size),
    }


class Freshness:
    """Matches consumed recommendations to produced events: an event counts as answered by the
    first recommendation for its user whose trigger is that event or a later one of the same
    user (events collapsed into one micro-batch are answered together)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, list[tuple[int, float]]] = defaultdict(list)  # user -> (seq, t)
        self._seq_of: dict[str, tuple[str, int]] = {}
        self.latencies_ms: list[float] = []
        self.sent_at: list[float] = []  # when each event of latencies_ms was produced
        self.recommendations = 0
        self.last_received = 0.0

    def sent(self, event_id: str, user_id: str, seq: int, at: float) -> None:
        with self._lock:
            self._seq_of[event_id] = (user_id, seq)
            self._pending[user_id].append((seq, at))

    def received(self, trigger_event_id: str | None, at: float) -> None:
        with self._lock:
            self.recommendations += 1
            self.last_received = at
            known = self._seq_of.get(trigger_event_id or "")
            if known is None:
                return
            user_id, seq = known
            pending = self._pending[user_id]
            answered = [t for s, t in pending if s <= seq]
            self._pending[user_id] = [(s, t) for s, t in pending if s > seq]
            self.latencies_ms.extend((at - t) * 1000 for t in answered)
            self.sent_at.extend(answered)

    def clear(self) -> None:
        with self._lock:
            self.latencies_ms.clear()
            self.sent_at.clear()

    def by_window(self, start: float, window_s: float) -> list[dict[str, float]]:
        """p50/p99 of the events produced in each window_s slice after `start`: shows whether
        latency drifts during a run (it does on Tansu, whose fetches slow as a log grows)."""
        with self._lock:
            pairs = sorted(zip(self.sent_at, self.latencies_ms))
        slices: dict[int, list[float]] = defaultdict(list)
        for at, latency in pairs:
            slices[int((at - start) // window_s)].append(latency)
        return [
            {
                "from_s": k * window_s,
                "p50_ms": round(float(np.percentile(v, 50)), 1),
                "p99_ms": round(float(np.percentile(v, 99)), 1),
            }
            for k, v in sorted(slices.items())
        ]

    def unanswered(self) -> int:
        with self._lock:
            return sum(len(p) for p in self._pending.values())


def collect(reader: TableReader, freshness: Freshness, stop: threading.Event) -> None:
    while not stop.is_set():
        for record in reader.poll(50, 5000):
            if record.value:
                freshness.received(orjson.loads(record.value).get("trigger_event_id"), time.time())


def cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


class EventSource:
    """Synthetic events over `users` users (skewed activity) and the bench catalog's items."""

    def __init__(
        self,
        users: int,
        items: int,
        seed: int,
        user_prefix: str = "u",
        item_ids: list[str] | None = None,
    ) -> None:
        rng = np.random.default_rng(seed)
        activity = rng.pareto(1.2, size=users) + 1.0
        self._p = activity / activity.sum()
        self._rng = rng
        self._item_ids = item_ids or [f"i{i}" for i in range(items)]
        self._user_prefix = user_prefix
        self._run = uuid.uuid4().hex[:8]
        self.seq = 0

    def batch(self, n: int) -> list[tuple[str, str, bytes, int]]:
        users = self._rng.choice(len(self._p), size=n, p=self._p)
        items = self._rng.integers(0, len(self._item_ids), size=n)
        now_ms = int(time.time() * 1000)
        out = []
        for u, i in zip(users.tolist(), items.tolist()):
            event_id, user = f"b{self._run}-{self.seq}", f"{self._user_prefix}{u}"
            out.append(
                (
                    event_id,
                    user,
                    orjson.dumps(
                        {
                            "event_id": event_id,
                            "user_id": user,
                            "item_id": self._item_ids[i],
                            "type": "click",
                            "ts": now_ms,
                        }
                    ),
                    self.seq,
                )
            )
            self.seq += 1
        return out


def registry_items(config: Config, items: int) -> list[str] | None:
    """The first `items` item ids of the registry's current model (events about items the
    model knows), or None where there is no registry at hand (then i0..i<items>)."""
    try:
        return list(ModelRegistry(config.paths.models).load().item_ids)[:items]
    except StreamrecError:
        return None


def produce_paced(
    sink: Any,
    topic: str,
    source: Any,
    freshness: Freshness,
    rate: float,
    duration_s: float,
    *,
    clock: Callable[[], float] = time.perf_counter,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[int, float, float]:
    """Send `rate` events a second for `duration_s` in 5 ms slices; a slice that falls behind
    (a slow flush on a busy machine) sends everything already due, so the offered rate holds.
    Returns (events sent, seconds it took, the most any event went out after its scheduled
    time in ms): latency counts from the actual send, so a producer that falls behind hides
    queueing; the last figure shows by how much."""
    started = clock()
    total = int(rate * duration_s)
    sent = 0
    behind_s = 0.0
    chunk = max(1, int(rate / 200))
    while sent < total:
        delay = started + sent / rate - clock()
        if delay > 0:
            sleep(delay)
        first_due = started + sent / rate
        due = int((clock() - started) * rate) + 1
        for event_id, user, value, seq in source.batch(min(total - sent, max(chunk, due - sent))):
            sink.send(topic, user.encode(), value)
            freshness.sent(event_id, user, seq, time.time())
            sent += 1
        behind_s = max(behind_s, clock() - first_due)  # the slice's first event, sent now
        sink.flush(10)
    return sent, clock() - started, behind_s * 1000


def offered_load(
    sink: KafkaSink,
    topic: str,
    source: EventSource,
    freshness: Freshness,
    rate: float,
    duration_s: float,
    lag_at_end: Callable[[], dict[str, int]] | None = None,
) -> dict[str, Any]:
    """Produce at `rate`, wait for the answers, and report latency as a client sees it, the
    recommendations consumed per second while producing and (where the workers' metrics are
    at hand) their consumer lag the moment producing stopped."""
    started = time.time()
    recommendations_before = freshness.recommendations
    sent, took, behind_ms = produce_paced(sink, topic, source, freshness, rate, duration_s)
    recommendations = freshness.recommendations - recommendations_before
    lag = lag_at_end() if lag_at_end is not None else None
    wait_answered(freshness, 30)
    out = {
        "events": sent,
        "achieved_events_per_s": round(sent / took, 1) if took > 0 else None,
        "producer_max_behind_schedule_ms": round(behind_ms, 1),
        "recommendations_per_s": round(recommendations / took, 1) if took > 0 else None,
        **percentiles(freshness.latencies_ms),
        "unanswered": freshness.unanswered(),
        "by_10s_window": freshness.by_window(started, 10.0),
    }
    if duration_s >= 120:  # a soak: how latency moves minute by minute as the logs grow
        out["by_minute"] = freshness.by_window(started, 60.0)
    if lag is not None:
        out["consumer_lag_at_end"] = lag
    return out


def wait_answered(freshness: Freshness, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while freshness.unanswered() and time.monotonic() < deadline:
        time.sleep(0.05)
