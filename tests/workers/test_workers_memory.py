"""Updater and scorer end to end on the in-memory bus: state, outputs, DLQ, restart, retire."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from pipeline.codec import Codec
from pipeline.config import Config, ScorerConfig, UpdaterConfig
from pipeline.encoder_cache import encode_users, item_vectors
from pipeline.loop import ConsumerLoop
from pipeline.memorybus import MemoryBus, MemorySink, MemorySource, MemoryTable
from pipeline.metrics import UpdaterMetrics, WorkerMetrics
from pipeline.recommend import Recommender
from pipeline.versions import ServingModels
from tests.workers.conftest import NOW_MS
from workers.scorer import ScorerHandler
from workers.updater import UpdaterHandler

CFG = Config()
T = CFG.topics


def _event(i, user, item, type_="click", ts=None):
    return orjson.dumps({"event_id": f"e{i}", "user_id": user, "item_id": item, "type": type_,
                         "ts": ts if ts is not None else NOW_MS - 1000 + i})


class Harness:
    """Both workers wired to one MemoryBus with a fixed clock; with updater_cfg.score the
    updater alone (co-located scoring, under scorer_cfg's settings)."""

    def __init__(self, bus, registry, encoder, state_dir, *, scorer_cfg=None, updater_cfg=None):
        self.bus = bus
        self.clock = lambda: NOW_MS / 1000
        self.scorer_cfg = scorer_cfg or ScorerConfig(epsilon=0.0)
        updater_cfg = updater_cfg or UpdaterConfig(history_length=5)
        self.updater, self.updater_loop, self.updater_source = self._build(
            "updater", registry, encoder, state_dir, updater_cfg)
        self.scorer = self.scorer_loop = None
        if not updater_cfg.score:
            self.scorer, self.scorer_loop, _ = self._build(
                "scorer", registry, encoder, state_dir, self.scorer_cfg)

    def _build(self, name, registry, encoder, state_dir, cfg):
        metrics = UpdaterMetrics() if name == "updater" else WorkerMetrics(name)
        models = ServingModels(registry=registry, encoder=encoder, metrics=metrics)
        models.start()
        if name == "updater":
            handler = UpdaterHandler(
                cfg=cfg, topics=T, state_dir=state_dir, models=models, metrics=metrics,
                recommender=Recommender(self.scorer_cfg, models) if cfg.score else None)
            inputs = [T.events, T.items]
        else:
            handler = ScorerHandler(cfg=cfg, topics=T, models=models, metrics=metrics)
            inputs = [T.user_vectors, T.model_updates]
        sources = []

        def factory(**hooks):
            sources.append(MemorySource(self.bus, cfg.group_id, inputs, **hooks))
            return sources[-1]

        loop = ConsumerLoop(handler=handler, source_factory=factory, sink=MemorySink(self.bus, self.clock),
                            codec=Codec(CFG.validation, worker=name), metrics=metrics,
                            dlq_topic=T.dlq, table=MemoryTable(self.bus, [T.items, T.model_updates]),
                            clock=self.clock)
        return handler, loop, sources[0]

    def close(self):
        self.updater.close()

    def step(self):
        self.updater_loop.run_once()
        if self.scorer_loop is not None:
            self.scorer_loop.run_once()

    def values(self, topic):
        return [orjson.loads(r.value) for r in self.bus.values(topic)]


@pytest.fixture
def bus():
    return MemoryBus(partitions=4)


@pytest.fixture
def make_harness(registry, encoder, tmp_path):
    built = []

    def make(bus, state="state", **cfgs):
        built.append(Harness(bus, registry, encoder, tmp_path / state, **cfgs))
        return built[-1]

    yield make
    for h in built:
        h.close()


@pytest.fixture
def harness(bus, make_harness):
    return make_harness(bus)


def test_events_become_vectors_then_recommendations_with_reasons(harness, bus):
    for i, item in enumerate(["i1", "i2", "i3"]):
        bus.produce(T.events, b"alice", _event(i, "alice", item))
    bus.produce(T.events, b"bob", _event(9, "bob", "i4", "purchase"))
    harness.step()
    vectors = harness.values(T.user_vectors)
    assert sorted(v["user_id"] for v in vectors) == ["alice", "bob"]  # one per touched user
    alice = next(v for v in vectors if v["user_id"] == "alice")
    assert alice["history"] == ["i1", "i2", "i3"] and alice["trigger_event_id"] == "e2"
    assert alice["model_version"] == "v000001" and len(alice["vector"]) == 16
    recs = {r["user_id"]: r for r in harness.values(T.recommendations)}
    assert set(recs) == {"alice", "bob"}
    bob = recs["bob"]
    assert [i["rank"] for i in bob["items"]] == list(range(1, 11))
    assert "i4" not in {i["item_id"] for i in bob["items"]}  # purchased: excluded
    for item in recs["alice"]["items"]:
        assert item["reason"]["history_item_id"] in {"i1", "i2", "i3"}
        assert item["reason"]["text"]


def test_bad_messages_go_to_dlq_with_reason_and_the_worker_carries_on(harness, bus):
    bus.produce(T.events, b"u", b"{nope")
    bus.produce(T.events, b"u", orjson.dumps({"event_id": "x", "user_id": "u"}))
    bus.produce(T.events, b"u", _event(1, "u", "brand-new-item"))
    harness.step()
    letters = harness.values(T.dlq)
    assert sorted(d["reason"] for d in letters) == ["missing_field", "not_json"]
    assert all(d["topic"] == T.events and d["worker"] == "updater" for d in letters)
    recs = harness.values(T.recommendations)
    assert len(recs) == 1 and recs[0]["user_id"] == "u"  # unknown item: valid, no crash


def test_duplicates_are_dropped_and_a_batch_of_only_duplicates_emits_nothing(harness, bus):
    bus.produce(T.events, b"u", _event(1, "u", "i1"))
    harness.step()
    bus.produce(T.events, b"u", _event(1, "u", "i1"))
    harness.step()
    assert len(harness.values(T.user_vectors)) == 1
    assert len(harness.values(T.recommendations)) == 1


def test_history_is_event_time_ordered_and_bounded(harness, bus):
    for i, ts in enumerate([50, 10, 40, 20, 30, 60]):
        bus.produce(T.events, b"u", _event(i, "u", f"i{i}", ts=NOW_MS - 1000 + ts))
        harness.step()
    last = harness.values(T.user_vectors)[-1]
    assert last["history"] == ["i3", "i4", "i2", "i0", "i5"]  # by ts, newest 5 of 6
    assert last["trigger_event_id"] == "e5"


def test_restart_restores_state_and_reapplies_nothing(bus, make_harness):
    first = make_harness(bus)
    bus.produce(T.events, b"u", _event(1, "u", "i1"))
    bus.produce(T.events, b"u", _event(2, "u", "i2"))
    first.step()
    # A crash after producing but before the commit: the committed offset lags behind.
    bus.committed.clear()
    first.close()
    second = make_harness(bus)
    bus.produce(T.events, b"u", _event(3, "u", "i3"))
    second.step()
    vectors = [v for v in second.values(T.user_vectors) if v["user_id"] == "u"]
    assert vectors[-1]["history"] == ["i1", "i2", "i3"]  # nothing applied twice, nothing lost


def test_a_log_replaced_while_the_updater_was_down_is_read_from_its_start(bus, make_harness):
    """The broker lost its data while no updater ran, and the new log grew past the stored
    offset before one came back: the stored log id says the offsets belong to the old log, so
    the new one is read from 0, not from the middle."""
    first = make_harness(bus)
    for n in range(4):
        bus.produce(T.events, b"u", _event(n, "u", f"i{n}"))
    first.step()
    first.close()
    bus.reset()  # the broker restarted empty
    for n in range(10, 16):  # six records: the new log is longer than the stored offset (4)
        bus.produce(T.events, b"u", _event(n, "u", f"i{n}"))
    second = make_harness(bus)
    second.step()
    vectors = [v for v in second.values(T.user_vectors) if v["user_id"] == "u"]
    assert vectors[-1]["history"] == ["i11", "i12", "i13", "i14", "i15"]  # history_length 5
    assert second.updater._metrics.broker_resets._value.get() == 1
    second.close()
    third = make_harness(bus)  # a plain restart on the same log resumes where it stopped
    bus.produce(T.events, b"u", _event(16, "u", "i16"))
    third.step()
    assert third.updater._metrics.broker_resets._value.get() == 0
    assert [v for v in third.values(T.user_vectors) if v["user_id"] == "u"][-1]["history"] == [
        "i12", "i13", "i14", "i15", "i16"]


def test_a_partition_persisted_on_the_new_log_is_not_reset_again(bus, make_harness):
    """This instance saw a log replaced while another member held it; by the time the partition
    comes here the other member has stored offsets on the new log: resume there, no re-read."""
    h = make_harness(bus)
    for n in range(3):
        bus.produce(T.events, b"u", _event(n, "u", f"i{n}"))
    h.step()
    tp = next(tp for tp in h.updater.states if bus.logs.get(tp))
    h.updater_loop._logs.rewound(tp, owned=False)  # heard of a reset it did not handle
    h.updater_source.revoke_all()
    bus.produce(T.events, b"u", _event(3, "u", "i3"))
    h.step()  # re-assigned: the stored log id is the current one
    assert h.updater._metrics.broker_resets._value.get() == 0
    assert tp not in h.updater_loop._logs.lost
    vectors = [v for v in h.values(T.user_vectors) if v["user_id"] == "u"]
    assert [(v["trigger_event_id"], v["history"]) for v in vectors] == [
        ("e2", ["i0", "i1", "i2"]), ("e3", ["i0", "i1", "i2", "i3"])]


def test_retired_items_disappear_and_new_items_are_recommendable_at_once(bus, make_harness):
    h = make_harness(bus, scorer_cfg=ScorerConfig(epsilon=0.0, top_k=40))
    bus.produce(T.items, b"i7", orjson.dumps({"item_id": "i7", "available": False, "ts": NOW_MS}))
    bus.produce(T.items, b"fresh", orjson.dumps({"item_id": "fresh", "title": "Brand new film",
                                                 "categories": ["Drama"], "ts": NOW_MS}))
    bus.produce(T.events, b"u", _event(1, "u", "i1"))
    h.step()
    items = {i["item_id"] for i in h.values(T.recommendations)[-1]["items"]}
    assert "i7" not in items and "fresh" in items  # top 40 of 31 available: everything else


def test_exploration_is_flagged_and_reproducible(make_harness):
    runs = []
    for attempt in range(2):
        b = MemoryBus(partitions=4)
        h = make_harness(b, f"state{attempt}", scorer_cfg=ScorerConfig(epsilon=0.5, seed=3))
        for i in range(5):
            b.produce(T.events, f"u{i}".encode(), _event(i, f"u{i}", f"i{i}"))
        h.step()
        runs.append(sorted((r["user_id"], [(i["item_id"], i["explore"]) for i in r["items"]])
                           for r in h.values(T.recommendations)))
    assert runs[0] == runs[1]
    flags = [f for _, items in runs[0] for _, f in items]
    assert any(flags) and not all(flags)
    explore_reasons = [i["reason"]["text"] for r in h.values(T.recommendations) for i in r["items"]
                       if i["explore"]]
    assert all("xplor" in text for text in explore_reasons)


def test_rec_id_is_deterministic_per_user_trigger_and_version(harness, bus):
    bus.produce(T.events, b"u", _event(1, "u", "i1"))
    harness.step()
    first = harness.values(T.recommendations)[0]
    # Re-deliver the same user vector: the scorer re-emits with the same rec_id.
    vector = bus.values(T.user_vectors)[0]
    bus.produce(T.user_vectors, vector.key, vector.value)
    harness.scorer_loop.run_once()
    again = harness.values(T.recommendations)[-1]
    assert again["rec_id"] == first["rec_id"]


def test_unknown_model_version_is_dead_lettered(harness, bus):
    vector = {"user_id": "u", "model_version": "v999999", "vector": [0.0] * 16, "history": [],
              "event_ts": NOW_MS, "updated_at": NOW_MS}
    bus.produce(T.user_vectors, b"u", orjson.dumps(vector))
    harness.scorer_loop.run_once()
    (letter,) = harness.values(T.dlq)
    assert letter["reason"] == "unknown_model_version" and letter["worker"] == "scorer"


def test_a_loop_that_does_not_own_the_dlq_counts_bad_records_without_dead_lettering(bus, registry,
                                                                                     encoder, tmp_path):
    metrics = UpdaterMetrics()
    models = ServingModels(registry=registry, encoder=encoder, metrics=metrics)
    models.start()
    handler = UpdaterHandler(cfg=UpdaterConfig(), topics=T, state_dir=tmp_path / "s", models=models,
                             metrics=metrics)
    loop = ConsumerLoop(handler=handler, source_factory=lambda **h: MemorySource(bus, "g", [T.events], **h),
                        sink=MemorySink(bus), codec=Codec(CFG.validation, worker="finetune"),
                        metrics=metrics, dlq_topic=T.dlq, dead_letters=False)
    bus.produce(T.events, b"u", b"{bad")
    loop.run_once()
    handler.close()
    assert bus.values(T.dlq) == []
    assert metrics.invalid.labels(topic=T.events, reason="not_json")._value.get() == 1


def test_large_catalog_path_serves_while_the_index_builds_and_after(bus, make_harness):
    h = make_harness(bus, scorer_cfg=ScorerConfig(epsilon=0.0, ann_min_items=10, ann_nprobe=64))
    bus.produce(T.events, b"u", _event(1, "u", "i1", "purchase"))
    h.step()  # first batch: no index yet, exact in user chunks
    h.scorer._recommender.wait_for_index(30)
    bus.produce(T.events, b"u", _event(2, "u", "i2"))
    h.step()  # second batch: through the ANN index
    first, second = h.values(T.recommendations)
    for rec in (first, second):
        ids = [i["item_id"] for i in rec["items"]]
        assert len(ids) == 10 and len(set(ids)) == 10 and "i1" not in ids


def test_a_long_history_is_refreshed_incrementally_between_slides(bus, make_harness, registry):
    """Past max_length the encoded window slides in blocks, so most refreshes extend the cached
    keys/values; every vector still equals a full encode of the window the count selects."""
    from pipeline.state import window_length

    h = make_harness(bus, updater_cfg=UpdaterConfig(history_length=20, window_slide=4))
    items = [f"i{(7 * n) % 30}" for n in range(40)]
    for n, item in enumerate(items):
        bus.produce(T.events, b"carol", _event(n, "carol", item))
        h.updater_loop.run_once()  # one event per micro-batch: one refresh each
    metrics = h.updater._metrics
    incremental = metrics.user_encodes.labels(mode="incremental")._value.get()
    full = metrics.user_encodes.labels(mode="full")._value.get()
    assert incremental + full == 40 and full <= 1 + (40 - 8) / 4 + 1  # max_length 8, slide 4
    loaded = registry.load()
    catalog = loaded.catalog()
    vectors = item_vectors(loaded, catalog)
    for n, message in enumerate(h.values(T.user_vectors)):
        window = window_length(n + 1, loaded.seq_config.max_length, 4)
        seen = items[: n + 1][-window:]
        want = encode_users(loaded, [catalog.rows(seen).tolist()], [[1] * len(seen)], vectors)[0]
        np.testing.assert_allclose(message["vector"], want, atol=1e-5)


def _publish_a_new_version(registry, bus) -> str:
    """The current model again under a new version, announced on the model-updates topic."""
    loaded = registry.load()
    update = registry.publish(loaded.model, loaded.seq_config, loaded.item_ids,
                              loaded.catalog_meta, {"ndcg@10": 0.2}, "v000001", 10,
                              text_vectors=loaded.text_vectors)
    bus.produce(T.model_updates, None, orjson.dumps(update.to_dict()))
    return update.version


def test_a_model_swap_rescores_every_user_throttled(bus, make_harness, registry):
    """A swap re-scores each held user once under the new version, at most swap_rescore_per_s
    (burst: one chunk), so events keep flowing; a user whose event refreshes it first is not
    re-scored again."""
    h = make_harness(bus, updater_cfg=UpdaterConfig(history_length=5, swap_rescore_batch=4,
                                                    swap_rescore_per_s=2.0))
    now = [NOW_MS / 1000]
    h.updater_loop._clock = lambda: now[0]
    for i in range(10):
        bus.produce(T.events, f"u{i}".encode(), _event(i, f"u{i}", f"i{i}"))
    h.step()
    version = _publish_a_new_version(registry, bus)

    def swapped():
        return [v for v in h.values(T.user_vectors) if v["trigger"] == "model_swap"]

    pending = h.updater._metrics.rescore_pending._value.get
    h.step()  # the swap, and a first chunk (the budget starts full)
    assert len(swapped()) == 4 and pending() == 6
    h.step()  # no time has passed: nothing more
    assert len(swapped()) == 4
    now[0] += 1.0  # 2 per second
    h.step()
    assert len(swapped()) == 6 and pending() == 4
    last = h.updater._rescore.users()[-1]  # the queue's last user: its event comes first
    bus.produce(T.events, last.encode(), _event(100, last, "i20"))
    h.step()  # the event: its user leaves the queue
    assert pending() == 3
    for _ in range(3):
        now[0] += 1.0
        h.step()
    assert pending() == 0
    again = swapped()
    users = [v["user_id"] for v in again]
    assert sorted(users) == sorted({f"u{i}" for i in range(10)} - {last})
    assert all(v["model_version"] == version and v["trigger_event_id"] is None for v in again)
    recs = [r for r in h.values(T.recommendations) if r.get("trigger") == "model_swap"]
    assert len(recs) == len(again) and {r["model_version"] for r in recs} == {version}
    (fresh,) = [r for r in h.values(T.recommendations) if r["trigger_event_id"] == "e100"]
    assert fresh["model_version"] == version


def test_users_restored_after_a_swap_are_rescored_unless_stored_as_done(bus, make_harness,
                                                                         registry):
    """A partition's store records the version all its users have vectors of. Users restored
    (a rebalance, a restart) while that is not the current version are re-scored, whether or
    not this instance's own re-score queue is still open; once done, a restore re-scores
    nobody."""
    h = make_harness(bus, updater_cfg=UpdaterConfig(history_length=5, swap_rescore_batch=2,
                                                    swap_rescore_per_s=1.0))
    now = [NOW_MS / 1000]
    h.updater_loop._clock = lambda: now[0]
    users = {f"u{i}" for i in range(10)}
    for i in range(10):
        bus.produce(T.events, f"u{i}".encode(), _event(i, f"u{i}", f"i{i}"))
    h.step()
    _publish_a_new_version(registry, bus)
    h.step()  # the swap and a first chunk of 2
    held = sorted(h.updater.states)

    def rescored():
        return {v["user_id"] for v in h.values(T.user_vectors) if v["trigger"] == "model_swap"}

    h.updater.on_revoke(held)
    assert len(h.updater._rescore) == 0  # a revoked partition's users leave the queue
    h.updater.on_assign(held)  # back, as from another instance: its store says "not done"
    assert set(h.updater._rescore.users()) == users
    h.updater.on_revoke(held)
    first_chunk = rescored()
    h.updater.on_assign(held)
    assert set(h.updater._rescore.users()) == users
    for _ in range(12):
        now[0] += 2.0
        h.step()
    assert rescored() == users and len(h.updater._rescore) == 0 and first_chunk
    for n, user in enumerate(sorted(users)):  # checkpoints record "done" per partition
        bus.produce(T.events, user.encode(), _event(100 + n, user, "i1"))
    h.step()
    h.updater.on_revoke(held)
    h.updater.on_assign(held)
    assert len(h.updater._rescore) == 0


def test_a_revoked_partition_stops_reporting_lag(bus, make_harness):
    h = make_harness(bus)
    bus.produce(T.events, b"u", _event(1, "u", "i1"))
    h.step()  # the first iteration exports lag for every assigned partition
    registry, name = h.updater._metrics.registry, "streamrec_consumer_lag_messages"
    tp = next(iter(h.updater.states))
    labels = {"worker": "updater", "topic": tp[0], "partition": str(tp[1])}
    assert registry.get_sample_value(name, labels) == 0
    h.updater_source.revoke_all()
    assert registry.get_sample_value(name, labels) is None
