"""Every file streamrec writes under its data root is 0600 and every directory it makes 0700,
whatever the umask: written by the real components, then checked by walking the tree."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.feedback import EVENT, FeedbackStore
from pipeline.files import atomic_write, open_private, private_dirs
from pipeline.items import Catalog, TextEncoder
from pipeline.kafka.membership import MemberSlot
from pipeline.messages import Item
from pipeline.model import SeqRecConfig, SeqRecModel
from pipeline.registry import ModelRegistry
from pipeline.store import PartitionStore


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    old = os.umask(0o002)  # group- and world-readable files, group-writable too
    try:
        yield
    finally:
        os.umask(old)


def _modes(root: Path) -> dict[str, str]:
    """Every path under `root` (itself included) whose mode is not 0700 (dirs) / 0600 (files)."""
    wrong = {}
    for path in [root, *root.rglob("*")]:
        mode = path.lstat().st_mode
        want = 0o700 if stat.S_ISDIR(mode) else 0o600
        if stat.S_IMODE(mode) != want:
            wrong[str(path.relative_to(root.parent))] = oct(stat.S_IMODE(mode))
    return wrong


def test_private_dirs_sets_0700_on_every_directory_it_makes(
    tmp_path: Path, permissive_umask: None
) -> None:
    user_dir = tmp_path / "home"
    user_dir.mkdir(mode=0o755)
    os.chmod(user_dir, 0o755)
    made = private_dirs(user_dir / "data" / "state" / "t-0")
    assert made.is_dir() and not _modes(user_dir / "data")
    assert stat.S_IMODE(user_dir.stat().st_mode) == 0o755  # a user's directory is left alone
    old = user_dir / "data" / "old"
    old.mkdir()
    os.chmod(old, 0o755)  # made by an older build
    private_dirs(old)
    assert stat.S_IMODE(old.stat().st_mode) == 0o755
    private_dirs(old, own=True)
    assert stat.S_IMODE(old.stat().st_mode) == 0o700


def test_private_files_ignore_even_a_zero_umask_and_fix_old_files(tmp_path: Path) -> None:
    old_umask = os.umask(0o777)  # open() and mkdir() alone would give 0000
    try:
        atomic_write(tmp_path / "a", b"x")
        with open_private(tmp_path / "b", "ab") as fh:
            fh.write(b"y")
        private_dirs(tmp_path / "d")
    finally:
        os.umask(old_umask)
    assert not _modes(tmp_path / "d")
    assert {stat.S_IMODE((tmp_path / n).stat().st_mode) for n in "ab"} == {0o600}
    (tmp_path / "c").write_bytes(b"")
    os.chmod(tmp_path / "c", 0o644)
    with open_private(tmp_path / "c", "ab"):
        pass
    assert stat.S_IMODE((tmp_path / "c").stat().st_mode) == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_state_feedback_registry_slots_and_cache_are_private(
    tmp_path: Path, permissive_umask: None
) -> None:
    data = tmp_path / "data"  # as a data dir streamrec makes itself
    with PartitionStore(data / "state", "events", 0, compact_bytes=1) as store:
        store.claim()
        store.restore()
        store.append(None, 1, {"u": 1}, meta={"log": "a"})
        store.compact(1, {"u": 1, "packed": b"\x00\x01"}, meta={"log": "a"})
        store.append(1, 2, {"u": 2})

    with FeedbackStore(data / "feedback", retention_events=10, segment_events=2) as feedback:
        feedback.append([(EVENT, "events", 0, n, {"n": n}) for n in range(5)])
        feedback.set_log_ids({("events", 0): "log-a"})

    torch.manual_seed(0)
    cfg = SeqRecConfig(num_items=2, hidden_size=8, num_layers=1, num_heads=1, max_length=4)
    catalog = Catalog()
    catalog.upsert(
        [Item("i0", 1, "A"), Item("i1", 1, "B")],
        np.random.default_rng(0).standard_normal((2, 384)).astype(np.float32),
    )
    registry = ModelRegistry(data / "models")
    update = registry.publish(
        SeqRecModel(cfg).eval(),
        cfg,
        ["i0", "i1"],
        catalog.meta(),
        {},
        None,
        0,
        text_vectors=catalog.text_vectors,
    )
    registry.rollback(update.version)  # CURRENT written again

    slot = MemberSlot.acquire(data / "state" / "members" / "group")
    assert slot is not None
    slot.write("group", "member-1")
    slot.release()

    encoder = TextEncoder(None, data / "cache")
    encoder._write_shard([encoder._key("text")], np.ones((1, 384), dtype=np.float32))

    names = {p.name for p in data.rglob("*")}
    assert {
        "snapshot",
        "wal",
        "owner",
        "log-ids.json",
        "CURRENT",
        "model.safetensors",
        "manifest.json",
        "text_vectors.npy",
        "slot-0",
    } <= names
    assert _modes(data) == {}
