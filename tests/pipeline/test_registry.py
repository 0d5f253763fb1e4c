"""ModelRegistry: atomic publish, verified load, CURRENT switch, rollback, and refusals."""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.errors import ModelRejected, RegistryError
from pipeline.items import Catalog
from pipeline.messages import Item
from pipeline.model import SeqRecConfig, SeqRecModel
from pipeline.registry import ModelRegistry


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _catalog() -> Catalog:
    cat = Catalog()
    rng = np.random.default_rng(0)
    items = [Item(f"i{i}", 1, f"Item {i}", categories=("c",)) for i in range(6)]
    cat.upsert(items, rng.standard_normal((6, 384)).astype(np.float32))
    return cat


def _publish(reg: ModelRegistry, seed: int = 0, parent: str | None = None):  # type: ignore[no-untyped-def]
    torch.manual_seed(seed)
    cfg = SeqRecConfig(num_items=4, hidden_size=8, num_layers=1, num_heads=1, max_length=6)
    model = SeqRecModel(cfg).eval()
    cat = _catalog()
    update = reg.publish(
        model,
        cfg,
        ["i0", "i1", "i2", "i3"],
        cat.meta(),
        {"ndcg@10": 0.1 + seed},
        parent_version=parent,
        trained_on_events=100 + seed,
        text_vectors=cat.text_vectors,
        now_ms=1_700_000_000_000,
    )
    return model, cat, update


def _rewrite_manifest(version_dir: Path) -> None:
    """Make the manifest match tampered files, so the deeper checks are what refuse them."""
    manifest = json.loads((version_dir / "manifest.json").read_text())
    import hashlib

    for name in manifest["files"]:
        manifest["files"][name] = hashlib.sha256((version_dir / name).read_bytes()).hexdigest()
    (version_dir / "manifest.json").write_text(json.dumps(manifest))


def test_publish_load_roundtrip_identical_outputs(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path / "models")
    assert reg.current_version() is None and reg.versions() == []
    _, cat, update = _publish(reg)
    assert update.version == "v000001" and update.parent_version is None
    assert update.trained_on_events == 100 and update.metrics == {"ndcg@10": 0.1}
    assert reg.resolve_uri(update.uri) == "v000001"
    assert reg.current_version() == "v000001"
    loaded = reg.load()
    assert loaded.version == "v000001" and not loaded.model.training
    assert loaded.item_index == {"i0": 1, "i1": 2, "i2": 3, "i3": 4}
    assert loaded.catalog_meta["ids"] == cat.ids and loaded.metrics == {"ndcg@10": 0.1}
    np.testing.assert_array_equal(loaded.text_vectors, cat.text_vectors)
    assert loaded.catalog().ids == cat.ids


def test_current_switch_versions_and_rollback(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path)
    _publish(reg, seed=0)
    _, _, second = _publish(reg, seed=1, parent="v000001")
    assert second.version == "v000002" and second.parent_version == "v000001"
    assert reg.current_version() == "v000002"
    listed = reg.versions()
    assert [v["version"] for v in listed] == ["v000001", "v000002"]
    assert [v["current"] for v in listed] == [False, True]
    reg.rollback("v000001")
    assert reg.current_version() == "v000001"
    assert reg.load().version == "v000001"
    assert (tmp_path / "v000002").is_dir()  # kept
    with pytest.raises(RegistryError, match="no model version"):
        reg.rollback("v000009")


def test_partial_temp_dirs_are_ignored(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path)
    (tmp_path / ".tmp-deadbeef").mkdir()
    (tmp_path / ".tmp-deadbeef" / "model.safetensors").write_bytes(b"half")
    (tmp_path / "v000005").mkdir()  # a version dir without a manifest: incomplete
    _, _, update = _publish(reg)
    assert update.version == "v000006"
    assert [v["version"] for v in reg.versions()] == ["v000006"]
    with pytest.raises(RegistryError, match="incomplete"):
        reg.load("v000005")


@pytest.mark.parametrize("bad", ["../v000001", "/etc/passwd", "v1", "v000001/..", ""])
def test_bad_version_names_refused(tmp_path: Path, bad: str) -> None:
    reg = ModelRegistry(tmp_path / "m")
    _publish(reg)
    with pytest.raises(RegistryError):
        reg.load(bad)


def test_uri_outside_root_refused(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path / "m")
    _publish(reg)
    outside = tmp_path / "elsewhere" / "v000001"
    for uri in (
        outside.as_uri(),
        str(outside),
        (tmp_path / "m" / ".." / "v000001").as_uri(),
        "http://example.com/v000001",
        "v000001/../../x",
    ):
        with pytest.raises(RegistryError):
            reg.resolve_uri(uri)
    assert reg.resolve_uri(str(tmp_path / "m" / "v000001")) == "v000001"


def test_truncated_weights_refused(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path)
    _publish(reg)
    weights = tmp_path / "v000001" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ModelRejected, match="checksum"):
        reg.load("v000001")
    _rewrite_manifest(tmp_path / "v000001")
    with pytest.raises(ModelRejected, match="safetensors"):
        reg.load("v000001")


def _assert_refused_after(tmp_path: Path, tamper: Callable[[dict], None], match: str) -> None:
    """Publish v1, change its weights with `tamper(state)` and rewrite its manifest's checksums
    to match: loading it is still refused, for `match`."""
    reg = ModelRegistry(tmp_path)
    _publish(reg)
    weights = tmp_path / "v000001" / "model.safetensors"
    state = load_file(str(weights))
    tamper(state)
    save_file(state, str(weights))
    _rewrite_manifest(tmp_path / "v000001")
    with pytest.raises(ModelRejected, match=match):
        reg.load("v000001")


def test_nan_weights_refused(tmp_path: Path) -> None:
    def nan(state: dict) -> None:
        state["id_embedding.weight"][1, 0] = float("nan")

    _assert_refused_after(tmp_path, nan, "non-finite")


def test_wrong_shape_refused(tmp_path: Path) -> None:
    def wrong_shape(state: dict) -> None:
        state["id_embedding.weight"] = torch.zeros(9, 8)

    _assert_refused_after(tmp_path, wrong_shape, "shape")


class _Boom:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_renamed_safetensors_refused(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path)
    _publish(reg)
    weights = tmp_path / "v000001" / "model.safetensors"
    weights.write_bytes(pickle.dumps({"id_embedding.weight": _Boom()}))
    _rewrite_manifest(tmp_path / "v000001")
    with pytest.raises(ModelRejected, match="safetensors"):
        reg.load("v000001")


def test_missing_manifest_entry_and_corrupt_items_refused(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path)
    _publish(reg)
    items = tmp_path / "v000001" / "items.json"
    data = json.loads(items.read_text())
    data["item_ids"] = data["item_ids"][:2]
    items.write_text(json.dumps(data))
    with pytest.raises(ModelRejected, match="checksum"):
        reg.load("v000001")
    _rewrite_manifest(tmp_path / "v000001")
    with pytest.raises(ModelRejected, match="num_items"):
        reg.load("v000001")
