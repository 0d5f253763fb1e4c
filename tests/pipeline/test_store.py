"""The snapshot + WAL store survives torn writes, corrupt snapshots and lost ownership, and
reads both snapshot formats."""

from __future__ import annotations

import struct

import crc32c
import pytest

from pipeline.errors import OwnershipLost, StateError
from pipeline.messages import Event
from pipeline.state import PartitionState
from pipeline.store import PartitionStore, frame


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


def test_binary_snapshot_round_trip_keeps_json_and_bytes_fields(tmp_path, make_store):
    store = make_store()
    store.compact(5, {"users": ["a", "b"], "blob": b"\x00\x01raw", "empty": b""})
    store.append(5, 8, {"n": 1})
    restored = PartitionStore(tmp_path, "streamrec.events", 0).restore()
    assert restored.offset == 8 and [d["n"] for d in restored.deltas] == [1]
    assert restored.state["users"] == ["a", "b"]
    assert bytes(restored.state["blob"]) == b"\x00\x01raw" and bytes(restored.state["empty"]) == b""


def test_partition_state_survives_the_store(tmp_path, make_store):
    state = PartitionState(max_length=3, dedup_capacity=10)
    state.apply([Event(f"e{i}", f"u{i % 2}", f"i{i % 3}", "view", 10 - i) for i in range(7)])
    make_store().compact(7, state.to_snapshot())
    restored = PartitionStore(tmp_path, "streamrec.events", 0).restore()
    again = PartitionState.from_snapshot(restored.state, max_length=3, dedup_capacity=10)
    assert list(again.users()) == list(state.users())
    assert all(again.history(u) == state.history(u) for u in state.users())
    assert again.dedup.ids() == state.dedup.ids()


def test_a_json_snapshot_of_a_pre_release_build_fails_clearly(tmp_path, make_store):
    store = make_store()
    (store.path / "snapshot").write_bytes(frame({"offset": 2, "state": {"users": {}}}))
    with pytest.raises(StateError, match="pre-release"):
        store.restore()


def test_a_snapshot_of_a_newer_format_fails_clearly(tmp_path, make_store):
    store = make_store()
    store.compact(1, {"x": 1})
    data = (store.path / "snapshot").read_bytes().replace(b'"version":2', b'"version":9')
    header = struct.Struct(">4sII")
    body = data[header.size :]
    resealed = header.pack(b"SRSB", len(body), crc32c.crc32c(body)) + body  # a valid CRC
    (store.path / "snapshot").write_bytes(resealed)
    with pytest.raises(StateError, match="format 9"):
        store.restore()


def test_torn_binary_snapshot_falls_back_to_previous(tmp_path, make_store):
    store = make_store()
    store.compact(3, {"gen": 1, "blob": b"a" * 100})
    store.compact(8, {"gen": 2, "blob": b"b" * 100})
    snap = store.path / "snapshot"
    snap.write_bytes(snap.read_bytes()[:-1])
    restored = store.restore()
    assert restored.snapshot_corrupt and restored.state["gen"] == 1 and restored.offset == 3


def test_the_log_id_is_restored_beside_the_offsets(tmp_path, make_store):
    store = make_store()
    assert store.restore().log_id is None  # nothing recorded yet
    store.append(None, 5, {"n": 1}, {"log": "topic-id-1", "scored": "v1"})
    store.close()
    again = make_store()
    restored = again.restore()
    assert restored.offset == 5 and restored.log_id == "topic-id-1"
    again.append(5, 2, {"n": 2}, {"log": "topic-id-2"})  # the broker lost the log
    restored = again.restore()
    assert restored.offset == 2 and restored.meta == {"log": "topic-id-2", "scored": "v1"}


def test_a_fallback_snapshot_comes_back_with_its_own_offsets_and_log_id(tmp_path, make_store):
    """An older snapshot's offset is on the log it was taken on; the records after the newer
    (corrupt) snapshot are on the new log, and one of them may even start at the old
    snapshot's offset number: none of them may be chained onto the old snapshot."""
    store = make_store()
    store.restore()
    store.compact(300, {"gen": 1}, {"log": "log-a"})
    store.append(300, 4, {"n": 1}, {"log": "log-b"})
    store.compact(4, {"gen": 2}, {"log": "log-b"})
    for start, end in ((4, 100), (100, 300), (300, 320)):
        store.append(start, end, {"n": end}, {"log": "log-b"})
    snap = store.path / "snapshot"
    snap.write_bytes(snap.read_bytes()[:-1])
    restored = store.restore()
    assert restored.snapshot_corrupt and restored.state == {"gen": 1}
    assert restored.offset == 300 and restored.log_id == "log-a" and restored.deltas == []
    # Appends now extend the snapshot that was loaded, past the other chain's records.
    store.append(300, 310, {"n": "again"}, {"log": "log-a"})
    again = store.restore()
    assert again.offset == 310 and again.deltas == [{"n": "again"}]


def test_records_of_the_previous_snapshot_are_not_replayed_onto_the_next(tmp_path, make_store):
    """Killed after a snapshot was written but before the WAL was emptied: the records before
    it are in it already, even where their offsets (of another log) look like a chain."""
    store = make_store()
    store.restore()
    store.append(None, 3, {"n": 1}, {"log": "log-a"})
    store.append(3, 1000, {"n": 2}, {"log": "log-a"})
    store.append(1000, 3, {"n": 3}, {"log": "log-b"})
    wal = (store.path / "wal").read_bytes()
    store.compact(3, {"gen": 1}, {"log": "log-b"})
    (store.path / "wal").write_bytes(wal)  # as if the truncate never happened
    restored = store.restore()
    assert restored.offset == 3 and restored.deltas == [] and restored.log_id == "log-b"


def test_a_wal_record_without_a_log_id_keeps_the_snapshots(tmp_path, make_store):
    store = make_store()
    store.compact(3, {"gen": 1}, {"log": "log-a"})
    store.append(3, 9, {"n": 1})  # a source that cannot tell its log
    assert store.restore().log_id == "log-a"
