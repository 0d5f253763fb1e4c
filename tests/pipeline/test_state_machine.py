"""A hypothesis state machine over pipeline.state + pipeline.store: apply, duplicate, reorder,
snapshot, torn WAL, corrupt snapshot, kill and restore always end equal to a pure reference model
(first occurrence of each event id, per user ordered by (ts, arrival), newest `max_length`).
Histories are compared as (item, type, ts): what outputs carry, event ids are not kept."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pipeline.messages import EVENT_TYPES, Event
from pipeline.state import PartitionState
from pipeline.store import PartitionStore

MAX_LENGTH = 6
TOPIC = "streamrec.events"


def reference(log: list[Event], upto: int) -> dict[str, list[tuple[str, str, int]]]:
    seen: set[str] = set()
    by_user: dict[str, list[tuple[int, int, Event]]] = {}
    for arrival, event in enumerate(log[:upto]):
        if event.event_id in seen:
            continue
        seen.add(event.event_id)
        by_user.setdefault(event.user_id, []).append((event.ts, arrival, event))
    return {
        u: [(e.item_id, e.type, e.ts) for _, _, e in sorted(r, key=lambda x: x[:2])][-MAX_LENGTH:]
        for u, r in by_user.items()
    }


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="statem-"))
        self.log: list[Event] = []
        self.next_id = 0
        self._restore()

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _restore(self) -> None:
        """A fresh process: claim the partition, load snapshot + WAL, resume at its offset."""
        self.store = PartitionStore(self.dir, TOPIC, 0, compact_bytes=1 << 30)
        self.store.claim()
        restored = self.store.restore()
        sizes = {"max_length": MAX_LENGTH, "dedup_capacity": 10_000}
        self.state = (
            PartitionState.from_snapshot(restored.state, **sizes)
            if restored.state is not None
            else PartitionState(**sizes)
        )
        for delta in restored.deltas:
            self.state.apply_delta(delta)
        self.stored = restored.offset
        self.pos = restored.offset or 0
        self.dirty = False  # applied in memory but not persisted

    @rule(
        user=st.sampled_from(["a", "b", "c"]),
        item=st.sampled_from(["i1", "i2", "i3"]),
        type_=st.sampled_from(["click", "view", "purchase"]),
        ts=st.integers(0, 20),
    )
    def produce(self, user: str, item: str, type_: str, ts: int) -> None:
        """A new event; small ts range: late (reordered) events and ties are common."""
        self.log.append(Event(f"e{self.next_id}", user, item, type_, ts))
        self.next_id += 1

    @precondition(lambda self: self.log)
    @rule(data=st.data())
    def duplicate(self, data: st.DataObject) -> None:
        """The producer retried: an event already in the log arrives again."""
        self.log.append(data.draw(st.sampled_from(self.log)))

    @precondition(lambda self: not self.dirty)
    @rule(n=st.integers(1, 5), persist=st.booleans())
    def apply(self, n: int, persist: bool) -> None:
        """One micro-batch: apply, then (unless a kill comes first) append to the WAL."""
        batch = self.log[self.pos : self.pos + n]
        if not batch:
            return
        applied = self.state.apply(batch)
        end = self.pos + len(batch)
        if persist:
            self.store.append(self.stored, end, self.state.delta(applied))
            self.stored = self.pos = end
        else:
            self.dirty = True

    @precondition(lambda self: not self.dirty and self.stored is not None)
    @rule()
    def snapshot(self) -> None:
        self.store.compact(self.pos, self.state.to_snapshot())

    @rule(how=st.sampled_from(["plain", "torn_wal", "corrupt_snapshot", "truncated_snapshot"]))
    def kill_and_restore(self, how: str) -> None:
        """SIGKILL (memory lost, maybe a torn WAL tail or a damaged snapshot), then restore; the
        input is re-read from the restored offset."""
        self.store.close()
        path = self.store.path
        if how == "torn_wal" and (path / "wal").exists():
            with open(path / "wal", "ab") as wal:
                wal.write(b"SRS1\x00\x00\x01\x00garbage")
        elif how != "plain" and (path / "snapshot").exists():
            data = bytearray((path / "snapshot").read_bytes())
            if how == "truncated_snapshot":
                data = data[: len(data) // 2]
            else:
                data[len(data) // 2] ^= 0xFF
            (path / "snapshot").write_bytes(bytes(data))
        self._restore()

    @precondition(lambda self: not self.dirty)
    @rule()
    def catch_up(self) -> None:
        while self.pos < len(self.log):
            self.apply(5, True)

    @invariant()
    def equals_reference_when_persisted(self) -> None:
        if self.dirty:
            return
        got = {}
        for user in self.state.users():
            h = self.state.history(user)
            got[user] = [(i, EVENT_TYPES[t], ts) for i, t, ts in zip(h.item_ids, h.types, h.ts)]
        assert got == reference(self.log, self.pos)


StoreMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
test_store_state_machine = StoreMachine.TestCase
