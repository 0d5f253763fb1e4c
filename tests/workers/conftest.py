"""Fixtures for worker tests on the in-memory bus: a tiny published model, a fake encoder, and
the updater and scorer wired together (`Harness`)."""

from __future__ import annotations

import hashlib

import numpy as np
import orjson
import pytest
import torch

from pipeline.config import Config, ScorerConfig, UpdaterConfig
from pipeline.items import Catalog
from pipeline.memorybus import MemoryBus
from pipeline.messages import Item
from pipeline.model import SeqRecConfig, SeqRecModel
from pipeline.registry import ModelRegistry
from tests.handlers import MemoryWorker, memory_config
from workers import scorer, updater

NOW_MS = 1_700_000_000_000
GENRES = ["Action", "Comedy", "Drama", "Horror"]


class HashEncoder:
    """Deterministic stand-in for MiniLM: the same text always gives the same unit vector."""

    def __init__(self, dim: int = 384) -> None:
        self.dim = dim
        self.calls = 0

    def encode(self, texts):
        self.calls += 1
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
            v = np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32)
            out[i] = v / np.linalg.norm(v)
        return out


def make_items(n: int) -> list[Item]:
    return [
        Item(
            f"i{i}",
            NOW_MS - 10_000,
            title=f"Movie {i}",
            categories=(GENRES[i % 4], GENRES[(i + 1) % 4]),
        )
        for i in range(n)
    ]


@pytest.fixture
def encoder():
    return HashEncoder()


def small_registry(models_dir, encoder):
    """A registry whose current version is a small random model over 30 items (i0..i29)."""
    torch.manual_seed(0)
    items = make_items(30)
    catalog = Catalog()
    catalog.upsert(items, encoder.encode([i.text() for i in items]))
    seq_config = SeqRecConfig(
        num_items=30, hidden_size=16, num_layers=1, num_heads=2, max_length=8, dropout=0.0
    )
    model = SeqRecModel(seq_config).eval()
    registry = ModelRegistry(models_dir)
    registry.publish(
        model,
        seq_config,
        [i.item_id for i in items],
        catalog.meta(),
        {"ndcg@10": 0.1},
        None,
        0,
        text_vectors=catalog.text_vectors,
    )
    return registry


@pytest.fixture
def registry(tmp_path, encoder):
    """A registry whose current version is a small random model over 30 items (i0..i29)."""
    return small_registry(tmp_path / "models", encoder)


def publish_reweighted(registry, old, seed=1):
    """Publish, as the child of `old`, a model of its shape and catalog with other (random)
    weights; the ModelUpdate."""
    torch.manual_seed(seed)
    return registry.publish(
        SeqRecModel(old.seq_config).eval(),
        old.seq_config,
        old.item_ids,
        old.catalog_meta,
        {"ndcg@10": 0.2},
        old.version,
        10,
        text_vectors=old.text_vectors,
    )


TOPICS = Config().topics


def event(i, user, item, type_="click", ts=None):
    """An Event message's bytes, `e<i>`, at NOW_MS unless `ts` says otherwise."""
    return orjson.dumps(
        {
            "event_id": f"e{i}",
            "user_id": user,
            "item_id": item,
            "type": type_,
            "ts": ts if ts is not None else NOW_MS - 1000 + i,
        }
    )


class ManualClock:
    """A clock the test advances by hand; starts at NOW_MS."""

    def __init__(self) -> None:
        self.now = NOW_MS / 1000

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Harness:
    """The updater and the scorer, built from their SPECs, on one MemoryBus and one clock; with
    updater_cfg.score the updater alone (co-located scoring, under scorer_cfg's settings)."""

    def __init__(
        self, bus, registry, encoder, root, state_dir, *, scorer_cfg=None, updater_cfg=None
    ):
        self.bus = bus
        self.clock = ManualClock()
        self.scorer_cfg = scorer_cfg or ScorerConfig(epsilon=0.0)
        config = memory_config(
            root,
            state_dir=state_dir,
            updater=updater_cfg or UpdaterConfig(history_length=5, score=False),
            scorer=self.scorer_cfg,
        )
        specs = (updater.SPEC,) if config.updater.score else (updater.SPEC, scorer.SPEC)
        built = [
            MemoryWorker(spec, config, bus, registry=registry, encoder=encoder, clock=self.clock)
            for spec in specs
        ]
        self.updater_worker = built[0]
        self.scorer_worker = built[1] if len(built) > 1 else None
        self.updater, self.updater_loop = self.updater_worker.handler, self.updater_worker.loop
        self.updater_source = self.updater_worker.sources[0]
        self.scorer = self.scorer_loop = None
        if self.scorer_worker is not None:
            self.scorer, self.scorer_loop = self.scorer_worker.handler, self.scorer_worker.loop

    def close(self):
        self.updater_worker.close()

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
        built.append(Harness(bus, registry, encoder, tmp_path, tmp_path / state, **cfgs))
        return built[-1]

    yield make
    for h in built:
        h.close()


@pytest.fixture
def harness(bus, make_harness):
    return make_harness(bus)
