"""The snapshot + WAL store survives torn writes, corrupt snapshots and lost ownership."""

from __future__ import annotations

import pytest

from pipeline.store import OwnershipLost, PartitionStore


@pytest.fixture
def make_store(tmp_path):
    opened = []

    def make(**kw):
        store = PartitionStore(tmp_path, "streamrec.events", 0, **kw)
        store.claim()
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


def test_empty_store_restores_nothing(tmp_path, make_store):
    restored = make_store().restore()
    assert restored.state is None and restored.offset is None and restored.deltas == []


def test_wal_chain_replays_in_order(tmp_path, make_store):
    store = make_store()
    store.append(None, 3, {"n": 1})
    store.append(3, 7, {"n": 2})
    store.close()
    restored = PartitionStore(tmp_path, "streamrec.events", 0).restore()
    assert [d["n"] for d in restored.deltas] == [1, 2] and restored.offset == 7


def test_torn_tail_is_ignored(tmp_path, make_store):
    store = make_store()
    store.append(None, 3, {"n": 1})
    store.append(3, 7, {"n": 2})
    store.close()
    wal = store.path / "wal"
    wal.write_bytes(wal.read_bytes()[:-4])
    restored = PartitionStore(tmp_path, "streamrec.events", 0).restore()
    assert restored.offset == 3 and restored.wal_torn


def test_compaction_then_more_wal(tmp_path, make_store):
    store = make_store()
    store.append(None, 3, {"n": 1})
    store.compact(3, {"full": 1})
    store.append(3, 9, {"n": 2})
    restored = store.restore()
    assert restored.state == {"full": 1} and [d["n"] for d in restored.deltas] == [2]
    assert restored.offset == 9


def test_corrupt_snapshot_falls_back_to_previous_and_its_offset(tmp_path, make_store):
    store = make_store()
    store.compact(3, {"gen": 1})
    store.compact(8, {"gen": 2})
    store.append(8, 12, {"n": 3})
    snap = store.path / "snapshot"
    data = bytearray(snap.read_bytes())
    data[-2] ^= 0xFF
    snap.write_bytes(bytes(data))
    restored = store.restore()
    assert restored.snapshot_corrupt
    # The WAL chains from offset 8, not 3: the caller must re-read input from offset 3.
    assert restored.state == {"gen": 1} and restored.offset == 3 and restored.deltas == []


def test_crash_between_compaction_renames_uses_previous_snapshot_and_wal(tmp_path, make_store):
    store = make_store()
    store.compact(3, {"gen": 1})
    store.append(3, 6, {"n": 1})
    (store.path / "snapshot").rename(store.path / "snapshot.prev")  # killed mid-compact
    restored = store.restore()
    assert restored.state == {"gen": 1} and restored.offset == 6


def test_a_paused_previous_owner_cannot_write(tmp_path, make_store):
    old = make_store()
    old.append(None, 2, {"n": 1})
    new = make_store()  # partition moved to another instance
    new.append(2, 4, {"n": 2})
    with pytest.raises(OwnershipLost):
        old.append(2, 5, {"n": "stale"})
    with pytest.raises(OwnershipLost):
        old.compact(5, {})
    assert new.restore().offset == 4


def test_compacting_after_a_corrupt_snapshot_keeps_the_good_previous_one(tmp_path, make_store):
    store = make_store()
    store.compact(3, {"gen": 1})
    store.compact(8, {"gen": 2})
    snap = store.path / "snapshot"
    snap.write_bytes(snap.read_bytes()[:10])  # truncated
    restored = store.restore()  # falls back to gen 1 at offset 3; input re-read from there
    assert restored.snapshot_corrupt and restored.offset == 3
    kills = []
    killing = PartitionStore(tmp_path, "streamrec.events", 0, fault=kills.append)
    killing.claim()
    killing.compact(9, {"gen": 3})
    assert kills == ["mid_snapshot"]
    # The corrupt snapshot never replaced the good .prev (a kill right after would need it).
    (killing.path / "snapshot").rename(killing.path / "snapshot.new")
    assert killing.restore().state == {"gen": 1}
    killing.close()
