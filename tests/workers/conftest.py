"""Fixtures for worker tests on the in-memory bus: a tiny published model and a fake encoder."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from pipeline.items import Catalog
from pipeline.messages import Item
from pipeline.model import SeqRecConfig, SeqRecModel
from pipeline.registry import ModelRegistry

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
    return [Item(f"i{i}", NOW_MS - 10_000, title=f"Movie {i}",
                 categories=(GENRES[i % 4], GENRES[(i + 1) % 4])) for i in range(n)]


@pytest.fixture
def encoder():
    return HashEncoder()


@pytest.fixture
def registry(tmp_path, encoder):
    """A registry whose current version is a small random model over 30 items (i0..i29)."""
    torch.manual_seed(0)
    items = make_items(30)
    catalog = Catalog()
    catalog.upsert(items, encoder.encode([i.text() for i in items]))
    seq_config = SeqRecConfig(num_items=30, hidden_size=16, num_layers=1, num_heads=2,
                              max_length=8, dropout=0.0)
    model = SeqRecModel(seq_config).eval()
    registry = ModelRegistry(tmp_path / "models")
    registry.publish(model, seq_config, [i.item_id for i in items], catalog.meta(), {"ndcg@10": 0.1},
                     None, 0, text_vectors=catalog.text_vectors)
    return registry
