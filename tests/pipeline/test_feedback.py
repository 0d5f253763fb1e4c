"""FeedbackStore: durable across restarts, bounded by retention, a torn tail is cut off."""

from __future__ import annotations

import pytest

from pipeline.feedback import FeedbackStore


def _events(start, n, topic="ev", partition=0):
    return [("e", topic, partition, start + i, {"event_id": f"e{start + i}"}) for i in range(n)]


def test_records_and_positions_survive_a_restart(tmp_path):
    with FeedbackStore(tmp_path, retention_events=1000) as store:
        store.append(_events(0, 5))
        store.append([("i", "recs", 2, 7, {"rec_id": "r"})])
        store.flush()
    with FeedbackStore(tmp_path, retention_events=1000) as again:
        records = again.read()
        assert [r.value.get("event_id") for r in records if r.kind == "e"] == [
            f"e{i}" for i in range(5)
        ]
        assert [r.seq for r in records] == list(range(6))
        assert again.positions() == {("ev", 0): 5, ("recs", 2): 8}
        assert again.next_seq == 6
        again.append(_events(5, 1))
        assert again.read(("e",), since_seq=5)[0].value == {"event_id": "e5"}


def test_retention_drops_whole_oldest_segments_but_keeps_positions(tmp_path):
    with FeedbackStore(tmp_path, retention_events=10, segment_events=4) as store:
        store.append(_events(0, 3, partition=1))
        store.append(_events(0, 30, partition=0))
        stats = store.stats()
        assert 10 <= stats["events"] < 10 + 4  # at most one segment beyond retention
        kept = [r.value["event_id"] for r in store.read(("e",))]
        assert kept[-1] == "e29" and len(kept) == stats["events"]
    with FeedbackStore(tmp_path, retention_events=10, segment_events=4) as again:
        # partition 1's records were dropped with their segment; its offset is still known
        assert again.positions() == {("ev", 1): 3, ("ev", 0): 30}


def test_a_torn_tail_is_cut_off_and_appends_continue_cleanly(tmp_path):
    with FeedbackStore(tmp_path, retention_events=100) as store:
        store.append(_events(0, 3))
    (segment,) = sorted(tmp_path.glob("seg-*.log"))
    data = segment.read_bytes()
    segment.write_bytes(data[:-5])  # killed in the middle of the last frame
    with FeedbackStore(tmp_path, retention_events=100) as again:
        assert again.torn_tails == 1
        assert [r.offset for r in again.read()] == [0, 1]
        assert again.positions() == {("ev", 0): 2}  # the torn record is consumed again
        again.append(_events(2, 2))
    with FeedbackStore(tmp_path, retention_events=100) as third:
        assert [r.offset for r in third.read()] == [0, 1, 2, 3] and third.torn_tails == 0


def test_unknown_kind_and_use_before_open_are_errors(tmp_path):
    store = FeedbackStore(tmp_path, retention_events=10)
    with pytest.raises(RuntimeError):
        store.read()
    store.open()
    with pytest.raises(ValueError):
        store.append([("x", "t", 0, 0, {})])


def test_forgetting_a_partition_survives_a_restart_and_retention(tmp_path):
    """After a broker lost a log, the old log's position must not come back on reopen: resuming
    the new log there would skip its first records."""
    with FeedbackStore(tmp_path, retention_events=4, segment_events=2) as store:
        store.append(_events(0, 50, partition=0) + _events(0, 7, partition=1))
        store.forget("ev", 0)
        assert store.positions() == {("ev", 1): 7}
        assert all(r.offset < 50 for r in store.read())  # the forget frame is no record
    with FeedbackStore(tmp_path, retention_events=4, segment_events=2) as again:
        assert again.positions() == {("ev", 1): 7}
        again.append(_events(0, 3, partition=0))  # the new log, from its start
        first = sorted(tmp_path.glob("seg-*.log"))[0]
        for k in range(3):  # roll segments until the one holding the forget frame is dropped
            again.append(_events(7 + 2 * k, 2, partition=1))
        assert not first.exists()
    with FeedbackStore(tmp_path, retention_events=4, segment_events=2) as third:
        assert third.positions() == {("ev", 0): 3, ("ev", 1): 13}
