"""Pure user state: bounded event-time-ordered histories, bounded duplicate detection, and the
per-partition state the updater keeps (with its delta form for the write-ahead log in store.py).

`fold(history, events, max_length) -> history` is a pure function; `PartitionState` groups the
histories and the dedup window of one input partition. No I/O, no clocks, no model.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.messages import EVENT_TYPES, Event

__all__ = ["Interaction", "fold", "Dedup", "PartitionState", "TYPE_INDEX"]

TYPE_INDEX = {name: i for i, name in enumerate(EVENT_TYPES)}


@dataclass(frozen=True, slots=True)
class Interaction:
    """One applied event as kept in a user's history."""

    item_id: str
    type: str
    ts: int
    event_id: str

    def to_list(self) -> list[Any]:
        return [self.item_id, self.type, self.ts, self.event_id]

    @classmethod
    def from_list(cls, raw: Sequence[Any]) -> "Interaction":
        return cls(str(raw[0]), str(raw[1]), int(raw[2]), str(raw[3]))


def fold(history: tuple[Interaction, ...], events: Iterable[Event],
         max_length: int) -> tuple[Interaction, ...]:
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
    if len(items) > max_length:
        items = items[-max_length:]
    return tuple(items)


class Dedup:
    """Remembers the last `capacity` event ids (FIFO eviction) to drop re-delivered events."""

    def __init__(self, capacity: int, ids: Iterable[str] = ()) -> None:
        self._capacity = capacity
        self._seen: OrderedDict[str, None] = OrderedDict()
        for event_id in ids:
            self.add(event_id)

    def __contains__(self, event_id: str) -> bool:
        return event_id in self._seen

    def __len__(self) -> int:
        return len(self._seen)

    def add(self, event_id: str) -> None:
        self._seen[event_id] = None
        self._seen.move_to_end(event_id)
        while len(self._seen) > self._capacity:
            self._seen.popitem(last=False)

    def ids(self) -> list[str]:
        return list(self._seen)


@dataclass
class Applied:
    """What one micro-batch did to one partition's state."""

    touched: dict[str, Event] = field(default_factory=dict)  # user -> trigger (last arrival)
    new_event_ids: list[str] = field(default_factory=list)
    duplicates: int = 0


class PartitionState:
    """The histories of the users whose events live on one partition, plus its dedup window."""

    def __init__(self, *, max_length: int, dedup_capacity: int) -> None:
        self.max_length = max_length
        self.histories: dict[str, tuple[Interaction, ...]] = {}
        self.dedup = Dedup(dedup_capacity)

    def apply(self, events: Sequence[Event]) -> Applied:
        """Fold a micro-batch in: drop duplicates, group by user, one fold per touched user."""
        applied = Applied()
        by_user: dict[str, list[Event]] = {}
        for event in events:
            if event.event_id in self.dedup:
                applied.duplicates += 1
                continue
            self.dedup.add(event.event_id)
            applied.new_event_ids.append(event.event_id)
            by_user.setdefault(event.user_id, []).append(event)
        for user_id, user_events in by_user.items():
            self.histories[user_id] = fold(self.histories.get(user_id, ()), user_events,
                                           self.max_length)
            applied.touched[user_id] = user_events[-1]
        return applied

    def delta(self, applied: Applied) -> dict[str, Any]:
        """The write-ahead-log record of one batch: new histories of touched users, new ids."""
        return {"users": {u: [i.to_list() for i in self.histories[u]] for u in applied.touched},
                "dedup": applied.new_event_ids}

    def apply_delta(self, delta: dict[str, Any]) -> None:
        for user_id, raw in delta["users"].items():
            self.histories[user_id] = tuple(Interaction.from_list(r) for r in raw)
        for event_id in delta["dedup"]:
            self.dedup.add(event_id)

    def to_snapshot(self) -> dict[str, Any]:
        return {"users": {u: [i.to_list() for i in h] for u, h in self.histories.items()},
                "dedup": self.dedup.ids()}

    @classmethod
    def from_snapshot(cls, snapshot: dict[str, Any], *, max_length: int,
                      dedup_capacity: int) -> "PartitionState":
        state = cls(max_length=max_length, dedup_capacity=dedup_capacity)
        state.apply_delta(snapshot)
        return state
