"""The updater on the in-memory bus (with the scorer after it): state, DLQ, dedup, restart,
a replaced log, incremental refresh, the paced re-score after a model swap, lag metrics."""

from __future__ import annotations

import dataclasses

import numpy as np
import orjson

from pipeline.config import UpdaterConfig
from pipeline.encoder_cache import encode_users, item_vectors
from tests.handlers import MemoryWorker, memory_config
from tests.workers.conftest import NOW_MS, TOPICS, event
from workers import updater


def test_bad_messages_go_to_dlq_with_reason_and_the_worker_carries_on(harness, bus):
    bus.produce(TOPICS.events, b"u", b"{nope")
    bus.produce(TOPICS.events, b"u", orjson.dumps({"event_id": "x", "user_id": "u"}))
    bus.produce(TOPICS.events, b"u", event(1, "u", "brand-new-item"))
    harness.step()
    letters = harness.values(TOPICS.dlq)
    assert sorted(d["reason"] for d in letters) == ["missing_field", "not_json"]
    assert all(d["topic"] == TOPICS.events and d["worker"] == "updater" for d in letters)
    recs = harness.values(TOPICS.recommendations)
    assert len(recs) == 1 and recs[0]["user_id"] == "u"  # unknown item: valid, no crash


def test_duplicates_are_dropped_and_a_batch_of_only_duplicates_emits_nothing(harness, bus):
    bus.produce(TOPICS.events, b"u", event(1, "u", "i1"))
    harness.step()
    bus.produce(TOPICS.events, b"u", event(1, "u", "i1"))
    harness.step()
    assert len(harness.values(TOPICS.user_vectors)) == 1
    assert len(harness.values(TOPICS.recommendations)) == 1


def test_history_is_event_time_ordered_and_bounded(harness, bus):
    for i, ts in enumerate([50, 10, 40, 20, 30, 60]):
        bus.produce(TOPICS.events, b"u", event(i, "u", f"i{i}", ts=NOW_MS - 1000 + ts))
        harness.step()
    last = harness.values(TOPICS.user_vectors)[-1]
    assert last["history"] == ["i3", "i4", "i2", "i0", "i5"]  # by ts, newest 5 of 6
    assert last["trigger_event_id"] == "e5"


def test_restart_restores_state_and_reapplies_nothing(bus, make_harness):
    first = make_harness(bus)
    bus.produce(TOPICS.events, b"u", event(1, "u", "i1"))
    bus.produce(TOPICS.events, b"u", event(2, "u", "i2"))
    first.step()
    # A crash after producing but before the commit: the committed offset lags behind.
    bus.committed.clear()
    first.close()
    second = make_harness(bus)
    bus.produce(TOPICS.events, b"u", event(3, "u", "i3"))
    second.step()
    vectors = [v for v in second.values(TOPICS.user_vectors) if v["user_id"] == "u"]
    assert vectors[-1]["history"] == ["i1", "i2", "i3"]  # nothing applied twice, nothing lost


def test_a_log_replaced_while_the_updater_was_down_is_read_from_its_start(bus, make_harness):
    """The broker lost its data while no updater ran, and the new log grew past the stored
    offset before one came back: the stored log id says the offsets belong to the old log, so
    the new one is read from 0, not from the middle."""
    first = make_harness(bus)
    for n in range(4):
        bus.produce(TOPICS.events, b"u", event(n, "u", f"i{n}"))
    first.step()
    first.close()
    bus.reset()  # the broker restarted empty
    for n in range(10, 16):  # six records: the new log is longer than the stored offset (4)
        bus.produce(TOPICS.events, b"u", event(n, "u", f"i{n}"))
    second = make_harness(bus)
    second.step()
    vectors = [v for v in second.values(TOPICS.user_vectors) if v["user_id"] == "u"]
    assert vectors[-1]["history"] == ["i11", "i12", "i13", "i14", "i15"]  # history_length 5
    assert second.updater_worker.metric("broker_resets_total") == 1
    second.close()
    third = make_harness(bus)  # a plain restart on the same log resumes where it stopped
    bus.produce(TOPICS.events, b"u", event(16, "u", "i16"))
    third.step()
    assert third.updater_worker.metric("broker_resets_total") == 0
    assert [v for v in third.values(TOPICS.user_vectors) if v["user_id"] == "u"][-1]["history"] == [
        "i12",
        "i13",
        "i14",
        "i15",
        "i16",
    ]


def test_a_partition_persisted_on_the_new_log_is_not_reset_again(bus, make_harness):
    """This instance saw a log replaced while another member held it; by the time the partition
    comes here the other member has stored offsets on the new log: resume there, no re-read."""
    h = make_harness(bus)
    for n in range(3):
        bus.produce(TOPICS.events, b"u", event(n, "u", f"i{n}"))
    h.step()
    tp = next(tp for tp in h.updater.states if bus.logs.get(tp))
    h.updater_loop._logs.rewound(tp, owned=False)  # heard of a reset it did not handle
    h.updater_source.revoke_all()
    bus.produce(TOPICS.events, b"u", event(3, "u", "i3"))
    h.step()  # re-assigned: the stored log id is the current one
    assert h.updater_worker.metric("broker_resets_total") == 0
    assert tp not in h.updater_loop._logs.lost
    vectors = [v for v in h.values(TOPICS.user_vectors) if v["user_id"] == "u"]
    assert [(v["trigger_event_id"], v["history"]) for v in vectors] == [
        ("e2", ["i0", "i1", "i2"]),
        ("e3", ["i0", "i1", "i2", "i3"]),
    ]


def test_a_loop_that_does_not_own_the_dlq_counts_bad_records_without_dead_lettering(
    bus, registry, encoder, tmp_path
):
    config = memory_config(tmp_path)
    spec = dataclasses.replace(updater.SPEC, dead_letters=False)  # as the fine-tune worker reads
    worker = MemoryWorker(spec, config, bus, registry=registry, encoder=encoder)
    bus.produce(TOPICS.events, b"u", b"{bad")
    worker.loop.run_once()
    worker.close()
    assert bus.values(TOPICS.dlq) == []
    assert worker.metric("messages_invalid_total", topic=TOPICS.events, reason="not_json") == 1


def test_a_long_history_is_refreshed_incrementally_between_slides(bus, make_harness, registry):
    """Past max_length the encoded window slides in blocks, so most refreshes extend the cached
    keys/values; every vector still equals a full encode of the window the count selects."""
    from pipeline.state import window_length

    h = make_harness(bus, updater_cfg=UpdaterConfig(history_length=20, window_slide=4))
    items = [f"i{(7 * n) % 30}" for n in range(40)]
    for n, item in enumerate(items):
        bus.produce(TOPICS.events, b"carol", event(n, "carol", item))
        h.updater_loop.run_once()  # one event per micro-batch: one refresh each
    incremental = h.updater_worker.metric("user_encodes_total", mode="incremental")
    full = h.updater_worker.metric("user_encodes_total", mode="full")
    assert incremental + full == 40 and full <= 1 + (40 - 8) / 4 + 1  # max_length 8, slide 4
    loaded = registry.load()
    catalog = loaded.catalog()
    vectors = item_vectors(loaded, catalog)
    for n, message in enumerate(h.values(TOPICS.user_vectors)):
        window = window_length(n + 1, loaded.seq_config.max_length, 4)
        seen = items[: n + 1][-window:]
        want = encode_users(loaded, [catalog.rows(seen).tolist()], [[1] * len(seen)], vectors)[0]
        np.testing.assert_allclose(message["vector"], want, atol=1e-5)


def _publish_a_new_version(registry, bus) -> str:
    """The current model again under a new version, announced on the model-updates topic."""
    loaded = registry.load()
    update = registry.publish(
        loaded.model,
        loaded.seq_config,
        loaded.item_ids,
        loaded.catalog_meta,
        {"ndcg@10": 0.2},
        "v000001",
        10,
        text_vectors=loaded.text_vectors,
    )
    bus.produce(TOPICS.model_updates, None, orjson.dumps(update.to_dict()))
    return update.version


def test_a_model_swap_rescores_every_user_throttled(bus, make_harness, registry):
    """A swap re-scores each held user once under the new version, at most swap_rescore_per_s
    (burst: one chunk), so events keep flowing; a user whose event refreshes it first is not
    re-scored again."""
    h = make_harness(
        bus,
        updater_cfg=UpdaterConfig(history_length=5, swap_rescore_batch=4, swap_rescore_per_s=2.0),
    )
    for i in range(10):
        bus.produce(TOPICS.events, f"u{i}".encode(), event(i, f"u{i}", f"i{i}"))
    h.step()
    version = _publish_a_new_version(registry, bus)

    def swapped():
        return [v for v in h.values(TOPICS.user_vectors) if v["trigger"] == "model_swap"]

    def pending():
        return h.updater_worker.metric("swap_rescore_pending")

    h.step()  # the swap, and a first chunk (the budget starts full)
    assert len(swapped()) == 4 and pending() == 6
    h.step()  # no time has passed: nothing more
    assert len(swapped()) == 4
    h.clock.advance(1.0)  # 2 per second
    h.step()
    assert len(swapped()) == 6 and pending() == 4
    last = h.updater._rescore.users()[-1]  # the queue's last user: its event comes first
    bus.produce(TOPICS.events, last.encode(), event(100, last, "i20"))
    h.step()  # the event: its user leaves the queue
    assert pending() == 3
    for _ in range(3):
        h.clock.advance(1.0)
        h.step()
    assert pending() == 0
    again = swapped()
    users = [v["user_id"] for v in again]
    assert sorted(users) == sorted({f"u{i}" for i in range(10)} - {last})
    assert all(v["model_version"] == version and v["trigger_event_id"] is None for v in again)
    recs = [r for r in h.values(TOPICS.recommendations) if r.get("trigger") == "model_swap"]
    assert len(recs) == len(again) and {r["model_version"] for r in recs} == {version}
    (fresh,) = [r for r in h.values(TOPICS.recommendations) if r["trigger_event_id"] == "e100"]
    assert fresh["model_version"] == version


def test_users_restored_after_a_swap_are_rescored_unless_stored_as_done(
    bus, make_harness, registry
):
    """A partition's store records the version all its users have vectors of. Users restored
    (a rebalance, a restart) while that is not the current version are re-scored, whether or
    not this instance's own re-score queue is still open; once done, a restore re-scores
    nobody."""
    h = make_harness(
        bus,
        updater_cfg=UpdaterConfig(history_length=5, swap_rescore_batch=2, swap_rescore_per_s=1.0),
    )
    users = {f"u{i}" for i in range(10)}
    for i in range(10):
        bus.produce(TOPICS.events, f"u{i}".encode(), event(i, f"u{i}", f"i{i}"))
    h.step()
    _publish_a_new_version(registry, bus)
    h.step()  # the swap and a first chunk of 2
    held = sorted(h.updater.states)

    def rescored():
        return {v["user_id"] for v in h.values(TOPICS.user_vectors) if v["trigger"] == "model_swap"}

    h.updater.on_revoke(held)
    assert len(h.updater._rescore) == 0  # a revoked partition's users leave the queue
    h.updater.on_assign(held)  # back, as from another instance: its store says "not done"
    assert set(h.updater._rescore.users()) == users
    h.updater.on_revoke(held)
    first_chunk = rescored()
    h.updater.on_assign(held)
    assert set(h.updater._rescore.users()) == users
    for _ in range(12):
        h.clock.advance(2.0)
        h.step()
    assert rescored() == users and len(h.updater._rescore) == 0 and first_chunk
    for n, user in enumerate(sorted(users)):  # checkpoints record "done" per partition
        bus.produce(TOPICS.events, user.encode(), event(100 + n, user, "i1"))
    h.step()
    h.updater.on_revoke(held)
    h.updater.on_assign(held)
    assert len(h.updater._rescore) == 0


def test_a_revoked_partition_stops_reporting_lag(bus, make_harness):
    h = make_harness(bus)
    bus.produce(TOPICS.events, b"u", event(1, "u", "i1"))
    h.step()  # the first iteration exports lag for every assigned partition
    registry, name = h.updater_worker.metrics.registry, "streamrec_consumer_lag_messages"
    tp = next(iter(h.updater.states))
    labels = {"worker": "updater", "topic": tp[0], "partition": str(tp[1])}
    assert registry.get_sample_value(name, labels) == 0
    h.updater_source.revoke_all()
    assert registry.get_sample_value(name, labels) is None  # gone, not 0
