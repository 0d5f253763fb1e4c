"""The fine-tune worker with the updater and scorer on the in-memory bus: feedback, promotion,
hot swap under live traffic (one model version per recommendation), rejection, rollback."""

from __future__ import annotations

import dataclasses
import os
import stat
import time

import orjson
import pytest

from pipeline.codec import encode
from pipeline.config import Config, FinetuneConfig, ScorerConfig, TrainingConfig, UpdaterConfig
from pipeline.continual import promotion_decision
from pipeline.memorybus import MemoryBus
from pipeline.messages import ModelUpdate
from pipeline.metrics import WorkerMetrics
from pipeline.versions import ServingModels
from tests.handlers import MemoryWorker, memory_config
from tests.workers.conftest import NOW_MS
from workers import finetune, scorer, updater

CFG = Config()
T = CFG.topics
TRAINING = TrainingConfig(epochs=1, batch_size=32, device="cpu")


def _event(i, user, item):
    return orjson.dumps(
        {
            "event_id": f"e{i}",
            "user_id": user,
            "item_id": item,
            "type": "click",
            "ts": NOW_MS - 100_000 + i,
        }
    )


class Pipeline:
    """Updater, scorer and fine-tune worker on one MemoryBus, with a fixed clock."""

    def __init__(self, bus, registry, encoder, tmp_path, finetune_cfg, *, score=False):
        self.bus, self.registry = bus, registry
        self.clock = lambda: NOW_MS / 1000
        config = memory_config(
            tmp_path,
            updater=UpdaterConfig(history_length=8, score=score),
            scorer=ScorerConfig(epsilon=0.0),
            finetune=dataclasses.replace(finetune_cfg, retention_events=10_000),
            training=TRAINING,
        )
        self.workers = {
            spec.name: MemoryWorker(
                spec, config, bus, registry=registry, encoder=encoder, clock=self.clock
            )
            for spec in ((updater.SPEC,) if score else (updater.SPEC, scorer.SPEC))
            + (finetune.SPEC,)
        }
        self.loops = {name: w.loop for name, w in self.workers.items()}
        self.handlers = {name: w.handler for name, w in self.workers.items()}

    def step(self, *names):
        for name in names or self.loops:
            self.loops[name].run_once()

    def values(self, topic):
        return [orjson.loads(r.value) for r in self.bus.values(topic)]

    def close(self):
        self.handlers["finetune"].close()
        self.handlers["updater"].close()


@pytest.fixture
def make_pipeline(registry, encoder, tmp_path):
    built = []

    def make(cfg=None, bus=None):
        cfg = cfg or FinetuneConfig(every_events=40, every_seconds=1e6)
        built.append(Pipeline(bus or MemoryBus(partitions=2), registry, encoder, tmp_path, cfg))
        return built[-1]

    yield make
    for p in built:
        p.close()


def _traffic(p, start, n, users=6, items=("i1", "i2", "i3", "i4", "i5", "new-a", "new-b")):
    for i in range(start, start + n):
        user = f"u{i % users}"
        p.bus.produce(
            T.events, user.encode(), _event(i, user, items[(i * 7 + i // users) % len(items)])
        )


def _train_and_emit(p):
    assert p.handlers["finetune"].wait_idle(120)
    p.step("finetune")  # emits the finished run's ModelUpdate, if any


def test_promotion_swaps_updater_and_scorer_under_live_traffic(make_pipeline):
    p = make_pipeline()
    _traffic(p, 0, 45)
    p.step()
    p.step("finetune")  # sees the recommendations: 45 events >= 40 → a run starts
    assert p.handlers["finetune"].training or p.handlers["finetune"].outcomes
    _traffic(p, 45, 10)  # traffic keeps flowing while the candidate trains
    p.step("updater", "scorer")
    _train_and_emit(p)
    (outcome,) = p.handlers["finetune"].outcomes
    assert outcome.outcome == "promoted" and outcome.version == "v000002", outcome.message
    assert p.registry.current_version() == "v000002"
    (update,) = p.values(T.model_updates)
    assert update["parent_version"] == "v000001" and update["metrics"]["candidate_ndcg@10"] >= 0
    # The new version knows the items first seen in the stream.
    assert {"new-a", "new-b"} <= set(p.registry.load("v000002").item_ids)
    _traffic(p, 55, 6)
    p.step("updater", "scorer")
    p.step("updater", "scorer")
    vectors = p.values(T.user_vectors)
    swap = [v for v in vectors if v.get("trigger") == "model_swap"]
    assert {v["user_id"] for v in swap} == {f"u{i}" for i in range(6)}
    assert all(v["model_version"] == "v000002" and v["trigger_event_id"] is None for v in swap)
    # Each recommendation names exactly one version: v1 up to the swap, v2 from it on.
    recs = p.values(T.recommendations)
    before = {f"e{i}" for i in range(55)}
    assert {r["model_version"] for r in recs if r["trigger_event_id"] in before} == {"v000001"}
    after = [r for r in recs if r["trigger_event_id"] not in before]
    assert after and {r["model_version"] for r in after} == {"v000002"}
    swap_recs = [r for r in recs if r.get("trigger") == "model_swap"]
    assert len(swap_recs) == 6 and all(r["trigger_event_id"] is None for r in swap_recs)
    p.step("finetune")
    metric = p.workers["finetune"].metric
    assert metric("promotions_total") == 1 and metric("feedback_events") == 61


@pytest.fixture
def permissive_umask():
    old = os.umask(0o002)  # before the registry fixture publishes: it writes under the umask too
    try:
        yield
    finally:
        os.umask(old)


def test_every_file_the_workers_write_is_private(permissive_umask, make_pipeline, tmp_path):
    # Updater state, feedback, finetune-state.json and a promoted version, all under a
    # permissive umask: files 0600, directories 0700.
    p = make_pipeline()
    _traffic(p, 0, 45)
    p.step()
    p.step("finetune")
    _train_and_emit(p)
    assert p.handlers["finetune"].outcomes[0].outcome == "promoted"
    p.close()
    names = {path.name for path in tmp_path.rglob("*")}
    assert {"finetune-state.json", "wal", "CURRENT", "v000002"} <= names
    wrong = {
        str(path.relative_to(tmp_path)): oct(stat.S_IMODE(path.lstat().st_mode))
        for path in tmp_path.rglob("*")
        if stat.S_IMODE(path.lstat().st_mode) != (0o700 if path.is_dir() else 0o600)
    }
    assert wrong == {}


def test_a_rejected_candidate_is_counted_and_nothing_is_published(make_pipeline, monkeypatch):
    monkeypatch.setattr(
        finetune,
        "promotion_decision",
        lambda cand, cur, tolerance: promotion_decision(cand, cur, tolerance=-1.0),
    )
    p = make_pipeline()
    _traffic(p, 0, 45)
    p.step()
    p.step("finetune")
    _train_and_emit(p)
    (outcome,) = p.handlers["finetune"].outcomes
    assert outcome.outcome == "rejected" and "candidate ndcg@10" in outcome.message
    assert outcome.candidate["users"] > 0 and "ndcg@10" in outcome.current
    assert p.values(T.model_updates) == [] and p.registry.current_version() == "v000001"
    metric = p.workers["finetune"].metric
    assert metric("rejections_total") == 1 and metric("runs_total", outcome="rejected") == 1


def test_stopping_abandons_a_running_fine_tune_and_its_events_are_trained_after_restart(
    make_pipeline,
):
    """SIGTERM must not wait for a fine-tune to finish (`streamrec up` gives a worker 10 s,
    then kills it): the run is abandoned at its next step, nothing is published, and the
    restarted worker still counts those events as not trained on."""
    import queue as queue_module

    bus = MemoryBus(partitions=2)
    endless = FinetuneConfig(
        every_events=40, every_seconds=1e6, epochs=1_000_000, max_train_seconds=3600
    )
    p = make_pipeline(endless, bus=bus)
    _traffic(p, 0, 45)
    p.step()
    p.step("finetune")
    handler = p.handlers["finetune"]
    assert handler.training
    time.sleep(0.5)  # inside the training loop
    started = time.monotonic()
    handler.close()
    assert not handler.training and time.monotonic() - started < 30  # not 1,000,000 epochs
    outcome = handler._results.get_nowait()
    assert outcome.outcome == "skipped" and "stopping" in outcome.message
    with pytest.raises(queue_module.Empty):
        handler._results.get_nowait()
    assert p.registry.current_version() == "v000001" and p.values(T.model_updates) == []
    again = make_pipeline(FinetuneConfig(every_events=10_000, every_seconds=1e6), bus=bus)
    assert again.handlers["finetune"].feedback_stats()["events"] == 45
    assert again.handlers["finetune"]._new_events == 45


def test_a_run_started_as_the_previous_one_is_recorded_is_not_saved_as_trained(
    make_pipeline, monkeypatch
):
    """Run N finishes and N+1 starts in the same tick that records N: the state saved then
    must not count N+1's records as trained, or a stop that abandons N+1 loses them."""
    import threading

    from pipeline.errors import TrainingStopped

    real, calls, release_first = finetune.fine_tune, [], threading.Event()

    def first_held_then_endless(*args, stop, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            release_first.wait(60)
            return real(*args, stop=stop, **kwargs)
        while not stop():
            time.sleep(0.01)
        raise TrainingStopped("fine-tune abandoned: the worker is stopping")

    monkeypatch.setattr(finetune, "fine_tune", first_held_then_endless)
    bus = MemoryBus(partitions=2)
    p = make_pipeline(FinetuneConfig(every_events=40, every_seconds=1e6), bus=bus)
    handler = p.handlers["finetune"]
    _traffic(p, 0, 45)
    p.step("finetune")
    p.step("finetune")  # run N starts on the first 45 events
    assert handler.training
    _traffic(p, 45, 45)
    p.step("finetune")  # 45 more stored while N runs
    release_first.set()
    assert handler.wait_idle(120)  # N done, its outcome not recorded yet
    handler.tick(NOW_MS)  # starts N+1 (due), then records N
    deadline = time.monotonic() + 30
    while len(calls) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(calls) == 2 and handler.training and len(handler.outcomes) == 1
    handler.close()  # abandons N+1
    again = make_pipeline(FinetuneConfig(every_events=10_000, every_seconds=1e6), bus=bus)
    again.handlers["finetune"].feedback_stats()
    assert again.handlers["finetune"]._new_events == 45


def test_the_feedback_store_resumes_where_it_stopped_without_duplicates(make_pipeline):
    bus = MemoryBus(partitions=2)
    first = make_pipeline(FinetuneConfig(every_events=10_000, every_seconds=1e6), bus=bus)
    _traffic(first, 0, 10)
    first.step()
    first.step("finetune")
    first.close()
    bus.committed.clear()  # as if killed before committing: the store's offsets decide
    second = make_pipeline(FinetuneConfig(every_events=10_000, every_seconds=1e6), bus=bus)
    _traffic(second, 10, 5)
    second.step("finetune")
    stats = second.handlers["finetune"].feedback_stats()
    assert stats["events"] == 15 and stats["impressions"] == len(second.values(T.recommendations))


def test_feedback_of_a_log_replaced_while_the_worker_was_down_is_read_from_its_start(make_pipeline):
    bus = MemoryBus(partitions=2)
    cfg = FinetuneConfig(every_events=10_000, every_seconds=1e6)
    first = make_pipeline(cfg, bus=bus)
    _traffic(first, 0, 10)
    first.step("updater")
    first.step("finetune")
    first.close()
    bus.reset()  # the broker restarted empty while no fine-tune worker ran
    second = make_pipeline(cfg, bus=bus)
    _traffic(second, 100, 30)  # the new events log is longer than the stored positions
    second.step("finetune")
    assert second.handlers["finetune"].feedback_stats()["events"] == 10 + 30
    assert second.workers["finetune"].metric("broker_resets_total") >= 1


def test_a_replaced_log_with_nothing_read_from_it_yet_is_read_from_its_start_after_a_restart(
    make_pipeline,
):
    """After a broker loss the new recommendations log stays empty for a while; a restart then
    must not bring back the old log's positions for it (its first records would be skipped)."""
    bus = MemoryBus(partitions=2)
    cfg = FinetuneConfig(every_events=10_000, every_seconds=1e6)
    first = make_pipeline(cfg, bus=bus)
    for i in range(4):
        _traffic(first, i, 1)
        first.step()
    first.step("finetune")
    old = first.handlers["finetune"].feedback_stats()["impressions"]
    assert old == 4
    first.close()
    bus.reset()
    second = make_pipeline(cfg, bus=bus)
    _traffic(second, 100, 30)
    second.step("finetune")  # events from the new log; no recommendation there yet
    second.close()
    third = make_pipeline(cfg, bus=bus)
    for i in range(12):  # the new log grows past the old positions
        _traffic(third, 200 + i, 1)
        third.step("updater", "scorer")
    new = len(third.values(T.recommendations))
    assert new > old
    third.step("finetune")
    assert third.handlers["finetune"].feedback_stats()["impressions"] == old + new


def test_serving_models_follow_a_rollback_and_ignore_unpromoted_versions(registry, encoder):
    import torch

    loaded = registry.load("v000001")

    def republish(**options):
        """v1's model again, as a new child of v1."""
        return registry.publish(
            loaded.model,
            loaded.seq_config,
            loaded.item_ids,
            loaded.catalog_meta,
            {},
            "v000001",
            0,
            text_vectors=loaded.text_vectors,
            **options,
        )

    v2 = republish()
    models = ServingModels(registry=registry, encoder=encoder, metrics=WorkerMetrics("t"))
    models.start()
    assert models.current.version == "v000002"

    def table(update):
        record = type("R", (), {})()
        return [type("D", (), {"message": update, "record": record})()]

    registry.rollback("v000001")
    models.apply_table(
        table(dataclasses_replace(v2, version="v000001", uri=v2.uri.replace("v000002", "v000001")))
    )
    assert models.current.version == "v000001"
    # A restart re-reading the old v2 announcement must not undo the rollback.
    models.apply_table(table(v2))
    assert models.current.version == "v000001"
    # A version published without being made current is never swapped in.
    v3 = republish(make_current=False)
    models.apply_table(table(v3))
    assert models.current.version == "v000001"
    assert torch.is_tensor(next(models.current.model.parameters()))


def dataclasses_replace(update: ModelUpdate, **changes) -> ModelUpdate:
    import dataclasses

    return dataclasses.replace(update, **changes)


def test_model_update_encodes_for_the_topic(registry):
    update = ModelUpdate("v000001", "file:///x", NOW_MS, None, {"ndcg@10": 0.1}, 3)
    assert orjson.loads(encode(update))["version"] == "v000001"


def test_the_first_fine_tune_starts_after_first_after_events_the_next_waits_for_every_events(
    make_pipeline,
):
    p = make_pipeline(FinetuneConfig(every_events=10_000, every_seconds=1e6, first_after_events=30))
    _traffic(p, 0, 35)
    p.step()
    p.step("finetune")
    _train_and_emit(p)
    assert len(p.handlers["finetune"].outcomes) == 1
    _traffic(p, 35, 35)
    p.step()
    p.step("finetune")
    assert not p.handlers["finetune"].training and len(p.handlers["finetune"].outcomes) == 1
