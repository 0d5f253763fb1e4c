"""Full encodes of items and users under a loaded model, and EncoderCache: incremental refresh
gives the vectors of a full re-encode, and says when it could not extend (slid window, late
event, new version, changed item text), within its memory."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.encoder_cache import EncoderCache, encode_users, item_vectors, length_buckets
from pipeline.items import Catalog
from pipeline.messages import Item
from pipeline.model import SeqRecConfig, SeqRecModel
from pipeline.registry import LoadedModel, ModelRegistry

MAX_LENGTH = 8
N_ITEMS = 12


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _catalog(seed: int = 0) -> Catalog:
    cat = Catalog()
    rng = np.random.default_rng(seed)
    items = [Item(f"i{i}", 1, f"Item {i}", categories=("c",)) for i in range(N_ITEMS)]
    cat.upsert(items, rng.standard_normal((N_ITEMS, 384)).astype(np.float32))
    return cat


def _publish_to(
    reg: ModelRegistry,
    model: SeqRecModel,
    cfg: SeqRecConfig,
    ids: list[str],
    cat: Catalog,
    **extra: object,
) -> LoadedModel:
    """Publish ``model`` (trained on 1 event, ndcg 0.1) with ``cat``'s text, and load it back."""
    reg.publish(
        model,
        cfg,
        ids,
        cat.meta(),
        {"ndcg@10": 0.1},
        trained_on_events=1,
        text_vectors=cat.text_vectors,
        **extra,
    )
    return reg.load()


def _publish(root: Path, seed: int) -> LoadedModel:
    torch.manual_seed(seed)
    cfg = SeqRecConfig(
        num_items=N_ITEMS,
        hidden_size=16,
        num_layers=2,
        num_heads=2,
        max_length=MAX_LENGTH,
        dropout=0.0,
        repeat_bias=True,
    )
    model = SeqRecModel(cfg).eval()
    reg = ModelRegistry(root)
    ids = [f"i{i}" for i in range(N_ITEMS)]
    return _publish_to(
        reg,
        model,
        cfg,
        ids,
        _catalog(),
        parent_version=reg.current_version(),
        now_ms=1_700_000_000_000,
    )


def test_item_and_user_vectors_are_the_models_own(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = SeqRecConfig(num_items=4, hidden_size=8, num_layers=1, num_heads=1, max_length=6)
    model = SeqRecModel(cfg).eval()
    cat = _catalog()
    ids = ["i0", "i1", "i2", "i3"]
    loaded = _publish_to(ModelRegistry(tmp_path), model, cfg, ids, cat, parent_version=None)

    vectors = item_vectors(loaded, cat)  # i4 and up are unknown to the model: id row 0 + text
    ids = torch.tensor([1, 2, 3, 4] + [0] * (N_ITEMS - 4))
    with torch.no_grad():
        expected = model.item_vectors(ids, torch.from_numpy(cat.text_vectors)).numpy()
    np.testing.assert_allclose(vectors, expected, rtol=1e-6, atol=1e-6)

    users = encode_users(loaded, [[0, 4, 5], [], [2, -1]], [[0, 1, 2], [], [3, 0]], vectors)
    assert users.shape == (3, 8) and not users[1].any()
    with torch.no_grad():
        table = torch.from_numpy(vectors)
        want = model.encode(table[[0, 4, 5]][None], torch.tensor([[0, 1, 2]]), torch.tensor([3]))
    np.testing.assert_allclose(users[0], want[0].numpy(), rtol=1e-5, atol=1e-5)


def test_length_bucketed_batch_encoding_equals_one_user_at_a_time(
    models: tuple[LoadedModel, LoadedModel],
) -> None:
    loaded = models[0]
    vectors = item_vectors(loaded, _catalog())
    rng = np.random.default_rng(3)
    # 100 users: several length buckets of >= 32 users each, plus a merged remainder.
    histories = [rng.integers(-1, N_ITEMS, size=n).tolist() for n in rng.integers(1, 10, size=100)]
    kinds = [rng.integers(0, 5, size=len(h)).tolist() for h in histories]
    together = encode_users(loaded, histories, kinds, vectors)
    for b, (h, t) in enumerate(zip(histories, kinds)):
        alone = encode_users(loaded, [h], [t], vectors)[0]
        np.testing.assert_allclose(together[b], alone, rtol=1e-5, atol=1e-5)


def test_small_length_buckets_join_longer_ones() -> None:
    lengths = [1] * 40 + [3] * 5 + [9] * 3
    buckets = length_buckets(lengths, list(range(len(lengths))), max_length=6, min_bucket=32)
    assert [(length, len(members)) for length, members in buckets] == [(1, 40), (6, 8)]
    assert sorted(b for _, members in buckets for b in members) == list(range(48))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[LoadedModel, LoadedModel]:
    root = tmp_path_factory.mktemp("models")
    return _publish(root, 0), _publish(root, 1)


def _reference(
    loaded: LoadedModel, windows: list[tuple[np.ndarray, np.ndarray]], table: np.ndarray
) -> np.ndarray:
    """The HF GPT-2 forward over whole windows: what every refresh must equal."""
    return encode_users(
        loaded, [r.tolist() for r, _ in windows], [t.tolist() for _, t in windows], table
    )


def _window(history: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    recent = history[-MAX_LENGTH:]
    return (
        np.array([r for r, _ in recent], dtype=np.int64),
        np.array([t for _, t in recent], dtype=np.int64),
    )


def _encode(
    cache: EncoderCache,
    loaded: LoadedModel,
    keys: list[str],
    windows: list[tuple[np.ndarray, np.ndarray]],
    table: np.ndarray,
    cat: Catalog,
):
    """cache.encode for users ``keys`` with windows [(rows, types), ...] under ``cat``."""
    return cache.encode(
        loaded,
        keys,
        [w[0] for w in windows],
        [w[1] for w in windows],
        table,
        cat.text_stamps,
        cat.version_counter,
    )


def _refresh_one(
    cache: EncoderCache,
    loaded: LoadedModel,
    history: list[tuple[int, int]],
    table: np.ndarray,
    cat: Catalog,
    counts: tuple[int, int],
):
    """Encode user "u" with ``history``: (incremental, full) == ``counts``, and the vector equals
    the full re-encode."""
    window = _window(history)
    refresh = _encode(cache, loaded, ["u"], [window], table, cat)
    assert (refresh.incremental, refresh.full) == counts
    np.testing.assert_allclose(refresh.vectors, _reference(loaded, [window], table), atol=1e-5)
    return refresh


def test_extend_from_nothing_equals_the_hf_forward(models) -> None:
    loaded, _ = models
    model, cfg = loaded.model, loaded.seq_config
    x = torch.randn(3, MAX_LENGTH, cfg.hidden_size)
    t = torch.randint(0, 5, (3, MAX_LENGTH))
    lengths = torch.tensor([MAX_LENGTH, 3, 1])
    empty = torch.zeros(2, cfg.num_layers, 3, cfg.num_heads, 0, cfg.hidden_size // cfg.num_heads)
    users, kv = model.extend(empty, torch.zeros(3, dtype=torch.long), x, t, lengths)
    with torch.no_grad():
        expected = model.encode(x, t, lengths)
    assert torch.allclose(users, expected, atol=1e-5)
    assert kv.shape == (2, cfg.num_layers, 3, cfg.num_heads, MAX_LENGTH, cfg.hidden_size // 2)


def test_extend_refuses_training_mode_and_overlong_sequences(models) -> None:
    loaded, _ = models
    model, cfg = loaded.model, loaded.seq_config
    past = torch.zeros(2, cfg.num_layers, 1, cfg.num_heads, MAX_LENGTH, 8)
    x, t = torch.randn(1, 1, cfg.hidden_size), torch.zeros(1, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="max_length"):
        model.extend(past, torch.tensor([MAX_LENGTH]), x, t, torch.tensor([1]))
    model.train()
    try:
        with pytest.raises(RuntimeError, match="eval"):
            model.extend(past[..., :1, :], torch.tensor([1]), x, t, torch.tensor([1]))
    finally:
        model.eval()


def test_one_appended_event_is_incremental_and_exact(models) -> None:
    loaded, _ = models
    cat = _catalog()
    table = item_vectors(loaded, cat)
    cache = EncoderCache(1 << 20)
    history = [(1, 0), (2, 1), (-1, 2)]  # -1: an item the catalog does not know
    first = _encode(cache, loaded, ["u"], [_window(history)], table, cat)
    assert (first.incremental, first.full) == (0, 1)
    history.append((3, 4))
    _refresh_one(cache, loaded, history, table, cat, (1, 0))
    assert 0 < cache.nbytes <= cache.max_bytes and len(cache) == 1


def test_changed_item_text_and_a_new_version_force_a_full_encode(models) -> None:
    loaded, newer = models
    cat = _catalog()
    cache = EncoderCache(1 << 20)
    history = [(1, 0), (2, 1)]
    _encode(cache, loaded, ["u"], [_window(history)], item_vectors(loaded, cat), cat)
    # Item i2's text changes: its vector changes, so the cached positions are stale.
    cat.upsert([Item("i2", 2, "A new title")], np.ones((1, 384), dtype=np.float32))
    table = item_vectors(loaded, cat)
    history.append((4, 0))
    _refresh_one(cache, loaded, history, table, cat, (0, 1))
    # A new model version: the cache built under the old one is not used.
    history.append((5, 0))
    _refresh_one(cache, newer, history, item_vectors(newer, cat), cat, (0, 1))


def test_the_cache_stays_within_its_byte_budget(models) -> None:
    loaded, _ = models
    cat = _catalog()
    table = item_vectors(loaded, cat)
    one_user = EncoderCache(1 << 20)
    rows, types = _window([(1, 0), (2, 0), (3, 0)])
    one_user.encode(loaded, ["u0"], [rows], [types], table, cat.text_stamps, cat.version_counter)
    budget = int(one_user.nbytes * 2.5)  # room for two such users, not three
    cache = EncoderCache(budget)
    keys = [f"u{i}" for i in range(5)]
    cache.encode(loaded, keys, [rows] * 5, [types] * 5, table, cat.text_stamps, cat.version_counter)
    assert len(cache) == 2 and cache.nbytes <= budget
    # The least recently used went first: the last two keys are the ones extended.
    longer, longer_types = _window([(1, 0), (2, 0), (3, 0), (4, 0)])
    refresh = cache.encode(
        loaded, keys, [longer] * 5, [longer_types] * 5, table, cat.text_stamps, cat.version_counter
    )
    assert refresh.incremental == 2
    assert (
        EncoderCache(0)
        .encode(loaded, ["u"], [rows], [types], table, cat.text_stamps, cat.version_counter)
        .full
        == 1
    )


_STEP = st.one_of(
    st.tuples(
        st.just("append"),
        st.integers(0, 3),
        st.lists(
            st.tuples(st.integers(-1, N_ITEMS - 1), st.integers(0, 4)), min_size=1, max_size=4
        ),
    ),
    st.tuples(
        st.just("late"),
        st.integers(0, 3),
        st.tuples(st.integers(0, N_ITEMS - 1), st.integers(0, 4)),
    ),
    st.tuples(st.just("retext"), st.integers(0, N_ITEMS - 1), st.just(None)),
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(steps=st.lists(_STEP, min_size=1, max_size=14))
def test_any_sequence_of_changes_gives_the_full_re_encode(models, steps) -> None:
    """Appends (several per batch, past the window), late events placed mid-history and item
    text edits in any order: every refresh equals the HF forward over the whole window."""
    loaded, _ = models
    cat = _catalog()
    cache = EncoderCache(1 << 20)
    histories: dict[str, list[tuple[int, int]]] = {f"u{i}": [] for i in range(4)}
    for n, (kind, target, payload) in enumerate(steps):
        if kind == "retext":
            cat.upsert(
                [Item(f"i{target}", 10 + n, f"Retitled {n}")],
                np.full((1, 384), n, dtype=np.float32),
            )
            continue
        history = histories[f"u{target}"]
        if kind == "append":
            history.extend(payload)
        else:
            history.insert(len(history) // 2, payload)
        touched = [user for user, h in histories.items() if h]
        windows = [_window(histories[user]) for user in touched]
        table = item_vectors(loaded, cat)
        refresh = _encode(cache, loaded, touched, windows, table, cat)
        expected = _reference(loaded, windows, table)
        np.testing.assert_allclose(refresh.vectors, expected, atol=1e-5)
        assert refresh.incremental + refresh.full == len(touched)
    assert cache.nbytes <= cache.max_bytes


def test_a_late_event_that_keeps_the_item_prefix_but_not_the_types_is_re_encoded(models) -> None:
    loaded, _ = models
    cat = _catalog()
    table = item_vectors(loaded, cat)
    cache = EncoderCache(1 << 20)
    _encode(cache, loaded, ["u"], [_window([(1, 0)])], table, cat)
    # A late purchase of the same item, placed first.
    _refresh_one(cache, loaded, [(1, 3), (1, 0)], table, cat, (0, 1))


def test_one_batch_extends_users_with_different_cached_lengths(models) -> None:
    """Users padded to the longest cached window and the longest new run in one forward pass:
    no new position may attend to another user's padding."""
    loaded, _ = models
    # Sharper weights than the init's std 0.02, so a masking slip shows well above 1e-5.
    sharp = dataclasses.replace(loaded, model=SeqRecModel(loaded.seq_config).eval())
    with torch.no_grad():
        for param, source in zip(sharp.model.parameters(), loaded.model.parameters()):
            param.copy_(source * 15)
    cat = _catalog()
    table = item_vectors(sharp, cat)
    cache = EncoderCache(1 << 22)
    rng = np.random.default_rng(3)
    histories = {
        f"u{i}": [(int(rng.integers(-1, N_ITEMS)), int(rng.integers(0, 5))) for _ in range(i + 1)]
        for i in range(MAX_LENGTH - 1)
    }
    keys = list(histories)
    windows = [_window(histories[k]) for k in keys]
    _encode(cache, sharp, keys, windows, table, cat)
    for i, key in enumerate(keys):  # 1 or 2 new events each, up to the window
        histories[key] += [(int(rng.integers(0, N_ITEMS)), 1)] * (1 + i % 2)
    windows = [_window(histories[k]) for k in keys]
    refresh = _encode(cache, sharp, keys, windows, table, cat)
    assert refresh.incremental >= len(keys) - 2  # those that stayed inside the window
    expected = _reference(sharp, windows, table)
    np.testing.assert_allclose(refresh.vectors, expected, atol=1e-4, rtol=1e-5)
