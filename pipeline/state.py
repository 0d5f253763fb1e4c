"""Pure user state: bounded event-time-ordered histories, bounded duplicate detection, and the
per-partition state the updater keeps (with its delta form for the write-ahead log in store.py).

A history is kept packed, as the bytes of a `RECORD` array (ts int64, interned item int32, type
uint8: 13 bytes an entry), because a tuple of small Python objects cost ~14 KB per user at 50
entries. Item ids are interned per partition (`ItemTable`); event ids live only in the bounded
dedup window, since no output needs the event id of an older history entry.

`fold_many` is the pure fold over packed histories; `fold` is the same semantics over
`Interaction` tuples (the chaos verifier's reference). Each user also has a count of the events
ever applied, from which `window_length` picks the part of the history the model encodes. No
I/O, no clocks, no model.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.errors import StateError
from pipeline.messages import EVENT_TYPE_INDEX, Event

__all__ = [
    "Interaction",
    "fold",
    "fold_many",
    "window_length",
    "window_start",
    "RECORD",
    "ItemTable",
    "Dedup",
    "History",
    "Applied",
    "PartitionState",
    "SNAPSHOT_VERSION",
]

RECORD = np.dtype([("ts", "<i8"), ("item", "<i4"), ("type", "u1")])  # packed, 13 bytes
SNAPSHOT_VERSION = 2


def window_length(count: int, max_length: int, slide: int) -> int:
    """How many of a user's newest events the model encodes, after `count` events in all.

    Up to max_length the whole history. Beyond it the window slides in blocks of `slide`
    events: it drops to max_length - slide + 1 and then grows by one per event back to
    max_length, so between slides every new event only appends to the encoded window (the
    incremental refresh extends it) instead of shifting every position. slide 1 is a plain
    sliding window of max_length. A function of the count alone, so it does not depend on
    micro-batching or restarts.
    """
    if count <= max_length:
        return count
    slide = max(1, min(slide, max_length))
    return max_length - slide + 1 + (count - max_length - 1) % slide


def window_start(kept: int, count: int, max_length: int, slide: int) -> int:
    """Index of the first encoded event in a kept history of `kept` events (after `count` in
    all): the one slicing rule for the updater and the chaos reference. Not `[-w:]`, which is
    everything when w is 0."""
    return max(0, kept - window_length(count, max_length, slide))


@dataclass(frozen=True, slots=True)
class Interaction:
    """One applied event in the list form of a history."""

    item_id: str
    type: str
    ts: int
    event_id: str


def fold(
    history: tuple[Interaction, ...], events: Iterable[Event], max_length: int
) -> tuple[Interaction, ...]:
    """Insert `events` into `history` in event-time order and keep the newest `max_length`.

    Ties on `ts` keep arrival order (a later arrival goes after an equal timestamp), so the
    result does not depend on how events were split into micro-batches.
    """
    items = list(history)
    keys = [i.ts for i in items]
    for event in events:
        at = bisect.bisect_right(keys, event.ts)
        keys.insert(at, event.ts)
        items.insert(at, Interaction(event.item_id, event.type, event.ts, event.event_id))
    return tuple(items[-max_length:])


def fold_many(
    histories: Sequence[bytes], groups: np.ndarray, new: np.ndarray, max_length: int
) -> list[bytes]:
    """`fold` for several packed histories at once: `new` (RECORD array, arrival order) holds
    the events of history `groups[k]`. One stable sort over (history, ts) for the whole batch:
    old entries precede new ones and new ones keep arrival order, so ties keep arrival order."""
    sizes = [len(h) // RECORD.itemsize for h in histories]
    records = np.concatenate([np.frombuffer(b"".join(histories), RECORD), new])
    owner = np.concatenate([np.repeat(np.arange(len(histories)), sizes), groups])
    order = np.lexsort((records["ts"], owner))
    records = records[order]
    ends = np.cumsum(np.bincount(owner, minlength=len(histories)))
    starts = np.maximum(ends - max_length, np.concatenate(([0], ends[:-1])))
    return [records[s:e].tobytes() for s, e in zip(starts.tolist(), ends.tolist())]


class ItemTable:
    """Per-partition interning of item ids: id <-> int32 code. Codes are never reused, so the
    table grows with the distinct items a partition has seen (bounded by the catalog)."""

    def __init__(self, ids: Iterable[str] = ()) -> None:
        self.ids: list[str] = []
        self._code: dict[str, int] = {}
        for item_id in ids:
            self.code(item_id)

    def __len__(self) -> int:
        return len(self.ids)

    def code(self, item_id: str) -> int:
        code = self._code.get(item_id)
        if code is None:
            code = self._code[item_id] = len(self.ids)
            self.ids.append(item_id)
        return code


class Dedup:
    """Remembers the last `capacity` event ids (FIFO eviction) to drop re-delivered events.
    A set plus a queue: about half the memory of an OrderedDict per id."""

    def __init__(self, capacity: int, ids: Iterable[str] = ()) -> None:
        self._capacity = capacity
        self._seen: set[str] = set()
        self._order: deque[str] = deque()
        for event_id in ids:
            self.add(event_id)

    def __contains__(self, event_id: str) -> bool:
        return event_id in self._seen

    def __len__(self) -> int:
        return len(self._seen)

    def add(self, event_id: str) -> None:
        if event_id in self._seen:
            return
        self._seen.add(event_id)
        self._order.append(event_id)
        if len(self._order) > self._capacity:
            self._seen.discard(self._order.popleft())

    def ids(self) -> list[str]:
        return list(self._order)


@dataclass(frozen=True, slots=True)
class History:
    """One user's history unpacked for output, oldest first."""

    item_ids: list[str]
    types: list[int]  # EVENT_TYPE_INDEX codes
    ts: list[int]
    count: int  # events ever applied to this user (the history keeps the newest of them)


@dataclass
class Applied:
    """What one micro-batch did to one partition's state."""

    touched: dict[str, Event] = field(default_factory=dict)  # user -> trigger (last arrival)
    events: list[Event] = field(default_factory=list)  # the non-duplicates, in arrival order
    duplicates: int = 0

    def merge(self, later: Applied) -> Applied:
        """This batch followed by `later`, as if they had been one."""
        return Applied(
            {**self.touched, **later.touched},
            self.events + later.events,
            self.duplicates + later.duplicates,
        )


class PartitionState:
    """The packed histories of the users whose events live on one partition, the partition's
    item table and its dedup window."""

    def __init__(self, *, max_length: int, dedup_capacity: int) -> None:
        self.max_length = max_length
        self.items = ItemTable()
        self.dedup = Dedup(dedup_capacity)
        self._histories: dict[str, bytes] = {}
        self._counts: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._histories)

    def users(self) -> Iterator[str]:
        return iter(self._histories)

    def history(self, user_id: str) -> History:
        records = np.frombuffer(self._histories.get(user_id, b""), RECORD)
        ids = self.items.ids
        return History(
            [ids[c] for c in records["item"].tolist()],
            records["type"].tolist(),
            records["ts"].tolist(),
            self._counts.get(user_id, len(records)),
        )

    def apply(self, events: Sequence[Event]) -> Applied:
        """Fold a micro-batch in: drop duplicates, then one vectorised fold for all its users."""
        applied = Applied()
        for event in events:
            if event.event_id in self.dedup:
                applied.duplicates += 1
                continue
            self.dedup.add(event.event_id)
            applied.events.append(event)
            applied.touched[event.user_id] = event
        if applied.events:
            self._fold(applied.events)
        return applied

    def _fold(self, events: list[Event]) -> None:
        users: dict[str, int] = {}
        groups = np.fromiter(
            (users.setdefault(e.user_id, len(users)) for e in events),
            dtype=np.int64,
            count=len(events),
        )
        new = np.empty(len(events), RECORD)
        new["ts"] = [e.ts for e in events]
        new["item"] = [self.items.code(e.item_id) for e in events]
        new["type"] = [EVENT_TYPE_INDEX[e.type] for e in events]
        old = [self._histories.get(u, b"") for u in users]
        added = np.bincount(groups, minlength=len(users)).tolist()
        self._counts.update(
            (u, self._counts.get(u, len(h) // RECORD.itemsize) + n)
            for u, h, n in zip(users, old, added)
        )
        self._histories.update(zip(users, fold_many(old, groups, new, self.max_length)))

    def delta(self, applied: Applied) -> dict[str, Any]:
        """The write-ahead-log record of one batch: its non-duplicate events. Replaying them
        through `apply` rebuilds the same histories and dedup window (fold is deterministic and
        independent of micro-batching), at a fraction of the bytes of the touched histories."""
        return {
            "events": [[e.user_id, e.item_id, e.type, e.ts, e.event_id] for e in applied.events]
        }

    def apply_delta(self, delta: dict[str, Any]) -> None:
        if "events" not in delta:
            raise StateError(f"unknown state delta with keys {sorted(delta)}")
        self.apply([Event(r[4], r[0], r[1], r[2], r[3]) for r in delta["events"]])

    def to_snapshot(self) -> dict[str, Any]:
        """The whole state; bytes values are stored raw by store.py (a memory copy, no JSON)."""
        sizes = (
            np.fromiter(
                map(len, self._histories.values()), dtype=np.int64, count=len(self._histories)
            )
            // RECORD.itemsize
        )
        counts = np.fromiter(
            (self._counts.get(u, n) for u, n in zip(self._histories, sizes.tolist())),
            dtype=np.int64,
            count=len(self._histories),
        )
        return {
            "version": SNAPSHOT_VERSION,
            "users": list(self._histories),
            "items": self.items.ids,
            "dedup": self.dedup.ids(),
            "sizes": sizes.astype("<i4").tobytes(),
            "counts": counts.astype("<i8").tobytes(),
            "records": b"".join(self._histories.values()),
        }

    @classmethod
    def from_snapshot(
        cls, snapshot: dict[str, Any], *, max_length: int, dedup_capacity: int
    ) -> PartitionState:
        """Restore a `to_snapshot` dict; another version raises StateError."""
        state = cls(max_length=max_length, dedup_capacity=dedup_capacity)
        version = snapshot.get("version")
        if version != SNAPSHOT_VERSION:
            raise StateError(
                f"state snapshot version {version} is not supported "
                f"(this build reads {SNAPSHOT_VERSION})"
            )
        state.items = ItemTable(snapshot["items"])
        state.dedup = Dedup(dedup_capacity, snapshot["dedup"])
        ends = np.cumsum(
            np.frombuffer(snapshot["sizes"], "<i4").astype(np.int64) * RECORD.itemsize
        ).tolist()
        records = bytes(snapshot["records"])
        if len(ends) != len(snapshot["users"]) or (ends[-1] if ends else 0) != len(records):
            raise StateError("state snapshot sizes do not match its users and records")
        starts = [0, *ends[:-1]]
        state._histories = {u: records[s:e] for u, s, e in zip(snapshot["users"], starts, ends)}
        counts = np.frombuffer(snapshot["counts"], "<i8").tolist()
        if len(counts) != len(snapshot["users"]):
            raise StateError("state snapshot counts do not match its users")
        state._counts = dict(zip(snapshot["users"], counts))
        return state
