"""Catalog rows/upserts/retirement and the cached MiniLM TextEncoder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.items import Catalog, TextEncoder, encode_items, text_lookup
from pipeline.messages import Item


def _vec(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(384).astype(np.float32)


def test_catalog_upsert_rows_and_retire() -> None:
    cat = Catalog(capacity=2)
    items = [Item("a", 1, "Alpha", categories=("x",)), Item("b", 1, "Beta"), Item("c", 1, "Gamma")]
    assert cat.upsert(items, np.stack([_vec(0), _vec(1), _vec(2)])) == 3
    assert len(cat) == 3 and cat.ids == ["a", "b", "c"]
    assert cat.row("b") == 1 and cat.row("zzz") is None
    assert cat.rows(["c", "nope", "a"]).tolist() == [2, -1, 0]
    assert cat.rows(["a"]).dtype == np.int64
    assert cat.available.tolist() == [True, True, True]
    assert cat.categories[0] == ("x",) and cat.titles[2] == "Gamma"
    np.testing.assert_array_equal(cat.text_vectors[1], _vec(1))
    version = cat.version_counter

    # Retire-only message: availability flips, metadata and vector stay, row stays.
    cat.upsert([Item("b", 2, available=False)], np.zeros((1, 384), np.float32))
    assert cat.available.tolist() == [True, False, True]
    assert cat.titles[1] == "Beta"
    np.testing.assert_array_equal(cat.text_vectors[1], _vec(1))
    assert cat.version_counter == version + 1

    # A retirement for an unknown id creates an unavailable row.
    cat.upsert([Item("d", 2, available=False)], np.zeros((1, 384), np.float32))
    assert cat.row("d") == 3 and not cat.available[3]

    # Re-publishing with text brings it back with new metadata; row unchanged.
    cat.upsert([Item("b", 3, "Beta 2")], _vec(9)[None])
    assert cat.row("b") == 1 and cat.available[1] and cat.titles[1] == "Beta 2"
    # A stale (older) update is ignored and does not bump the version.
    v = cat.version_counter
    cat.upsert([Item("b", 1, "Old")], _vec(5)[None])
    assert cat.titles[1] == "Beta 2" and cat.version_counter == v


def test_catalog_grows_without_reallocating_per_upsert() -> None:
    cat = Catalog(capacity=1)
    buffers = set()
    for i in range(100):
        cat.upsert([Item(f"i{i}", 0, f"t{i}")], _vec(i)[None])
        buffers.add(id(cat._vectors))
    assert len(cat) == 100 and cat.text_vectors.shape == (100, 384)
    assert len(buffers) <= 8  # doubling: 1, 2, 4, ..., 128
    np.testing.assert_array_equal(cat.text_vectors[57], _vec(57))


def test_catalog_state_roundtrip() -> None:
    cat = Catalog()
    cat.upsert(
        [Item("a", 1, "A", categories=("k",)), Item("b", 1, available=False)],
        np.stack([_vec(1), np.zeros(384, np.float32)]),
    )
    back = Catalog.from_state({**cat.meta(), "text_vectors": cat.text_vectors})  # as published
    assert back.ids == cat.ids and back.titles == cat.titles and back.categories == cat.categories
    np.testing.assert_array_equal(back.text_vectors, cat.text_vectors)
    np.testing.assert_array_equal(back.available, cat.available)
    np.testing.assert_array_equal(back.updated_ts, cat.updated_ts)
    assert back.row("b") == 1
    assert back.version_counter == 0 and not back.text_stamps.any()  # a fresh catalog's
    back.upsert([Item("c", 2, "C")], _vec(2)[None])
    assert len(back) == 3 and len(cat) == 2


def test_catalog_rejects_misaligned_vectors() -> None:
    with pytest.raises(ValueError, match="shape"):
        Catalog().upsert([Item("a", 1, "A")], np.zeros((2, 384), np.float32))


def test_text_encoder_minilm_and_cache(tmp_path: Path) -> None:
    texts = [
        "Toy Story (1995). Categories: Animation, Children's, Comedy",
        "Toy Story 2 (1999). Categories: Animation, Children's, Comedy",
        "Schindler's List (1993). Categories: Drama, War",
    ]
    encoder = TextEncoder(None, tmp_path)
    assert not encoder.model_loaded  # lazy: no I/O before the first encode
    vectors = encoder.encode(texts)
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    sims = vectors @ vectors.T
    assert sims[0, 1] > sims[0, 2] + 0.2

    second = TextEncoder("", tmp_path)  # another worker sharing the data dir
    again = second.encode([texts[2], texts[0]])
    assert not second.model_loaded
    np.testing.assert_array_equal(again, vectors[[2, 0]])
    assert second.encode([]).shape == (0, 384)


def test_encode_items_gives_zeros_for_textless(tmp_path: Path) -> None:
    encoder = TextEncoder(None, tmp_path)
    # Pre-seed the cache so this test never loads the model.
    key = "Alpha"
    encoder._write_shard([encoder._key(key)], _vec(1)[None])
    out = encode_items(encoder, [Item("a", 1, "Alpha"), Item("b", 1, available=False)])
    np.testing.assert_array_equal(out[0], _vec(1))
    assert not out[1].any() and not encoder.model_loaded


def test_cache_shards_from_several_writers_merge_and_compact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.items as items_module

    monkeypatch.setattr(items_module, "_COMPACT_AFTER_SHARDS", 3)
    writers = [TextEncoder(None, tmp_path) for _ in range(5)]
    for i, w in enumerate(writers):  # five "processes", each writing its own shard
        w._write_shard([w._key(f"text {i}")], _vec(i)[None])
    reader = TextEncoder(None, tmp_path)
    out = reader.encode([f"text {i}" for i in range(5)])  # loads all shards, then compacts
    np.testing.assert_array_equal(out, np.stack([_vec(i) for i in range(5)]))
    assert not reader.model_loaded
    shard_dir = reader._shard_dir()
    assert len(list(shard_dir.glob("*.npz"))) == 1 and not list(shard_dir.glob(".*.tmp"))
    fresh = TextEncoder(None, tmp_path)
    np.testing.assert_array_equal(fresh.encode(["text 3"])[0], _vec(3))
    assert not fresh.model_loaded


def test_text_stamps_mark_the_rows_whose_text_changed() -> None:
    cat = Catalog()
    cat.upsert([Item("a", 1, "A"), Item("b", 1, "B")], np.stack([_vec(1), _vec(2)]))
    built_at = cat.version_counter
    cat.upsert([Item("b", 2, available=False)], np.zeros((1, 384), np.float32))  # no text
    assert (cat.text_stamps <= built_at).all()
    cat.upsert([Item("a", 3, "A, retitled")], _vec(3)[None])
    assert cat.text_stamps[cat.row("a")] > built_at >= cat.text_stamps[cat.row("b")]


def test_text_lookup_gives_each_items_row_and_zeros_for_an_unknown_one():
    text = np.arange(6, dtype=np.float32).reshape(3, 2)
    got = text_lookup(["a", "b", "c"], text)(["c", "x", "a"])
    assert got.dtype == np.float32
    assert got.tolist() == [[4.0, 5.0], [0.0, 0.0], [0.0, 1.0]]
