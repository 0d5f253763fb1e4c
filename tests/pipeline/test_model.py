"""SeqRecModel: shapes, pooling at the last real position, cold start from text, determinism."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pipeline.config import ModelConfig
from pipeline.errors import ConfigError
from pipeline.model import SeqRecConfig, SeqRecModel


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _model(seed: int = 0, **kw) -> SeqRecModel:
    torch.manual_seed(seed)
    cfg = SeqRecConfig(
        num_items=20, hidden_size=16, num_layers=1, num_heads=2, max_length=8, dropout=0.1, **kw
    )
    return SeqRecModel(cfg).eval()


def test_config_from_model_config_and_roundtrip() -> None:
    cfg = SeqRecConfig.from_model_config(ModelConfig(hidden_size=32, num_heads=4), num_items=7)
    assert (cfg.hidden_size, cfg.num_heads, cfg.num_items, cfg.num_event_types) == (32, 4, 7, 5)
    assert SeqRecConfig.from_dict(cfg.to_dict()) == cfg
    assert (
        SeqRecConfig.from_model_config(ModelConfig(id_dropout=0.05), num_items=3).id_dropout == 0.05
    )
    # A config saved before a field existed still loads, with that field's default.
    old = {k: v for k, v in cfg.to_dict().items() if k not in {"id_dropout", "text_encoder"}}
    assert SeqRecConfig.from_dict(old).id_dropout == SeqRecConfig(num_items=1).id_dropout
    with pytest.raises(ValueError, match="num_heads"):
        SeqRecConfig(num_items=1, hidden_size=10, num_heads=3)


def test_shapes() -> None:
    model = _model()
    items = model.item_vectors(torch.arange(21), torch.randn(21, 384))
    assert items.shape == (21, 16)
    seq = items[torch.randint(0, 21, (3, 5))]
    types = torch.randint(0, 5, (3, 5))
    assert model(seq, types).shape == (3, 5, 16)
    users = model.encode(seq, types, torch.tensor([5, 2, 1]))
    assert users.shape == (3, 16)
    assert model.score(users, items).shape == (3, 21)


def test_encode_is_hidden_at_last_real_position_and_ignores_right_padding() -> None:
    model = _model()
    items = model.item_vectors(torch.arange(21), torch.randn(21, 384))
    seq = items[torch.randint(1, 21, (2, 6))]
    types = torch.randint(0, 5, (2, 6))
    lengths = torch.tensor([6, 3])
    with torch.no_grad():
        hidden = model(seq, types)
        users = model.encode(seq, types, lengths)
        alone = model.encode(seq[1:2, :3], types[1:2, :3], torch.tensor([3]))
    torch.testing.assert_close(users[0], hidden[0, 5])
    torch.testing.assert_close(users[1], hidden[1, 2])
    torch.testing.assert_close(users[1], alone[0], atol=1e-5, rtol=1e-5)


def test_unknown_id_works_from_text() -> None:
    model = _model()
    text = torch.nn.functional.normalize(torch.randn(2, 384), dim=1)
    with torch.no_grad():
        unknown = model.item_vectors(torch.zeros(2, dtype=torch.long), text)
    assert torch.isfinite(unknown).all()
    assert not torch.allclose(unknown[0], unknown[1])  # the text alone tells them apart


def test_too_long_sequence_is_refused() -> None:
    model = _model()
    with pytest.raises(ValueError, match="max_length"):
        model(torch.zeros(1, 9, 16), torch.zeros(1, 9, dtype=torch.long))


def test_deterministic_with_seed() -> None:
    a, b = _model(seed=3), _model(seed=3)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(_model(seed=4).id_embedding.weight, a.id_embedding.weight)


def test_id_dropout_only_in_training() -> None:
    model = _model(id_dropout=1.0)
    ids, text = torch.arange(1, 5), torch.randn(4, 384)
    with torch.no_grad():
        model.train()
        dropped = model.item_vectors(ids, text)
        cold = model.item_vectors(torch.zeros(4, dtype=torch.long), text)
        model.eval()
        kept = model.item_vectors(ids, text)
    torch.testing.assert_close(dropped, cold)
    assert not torch.allclose(kept, cold)


def test_repeat_bias_is_opt_in_and_applies_only_to_seen_items() -> None:
    assert _model().repeat_bias is None  # manifests written before it existed load without it
    assert SeqRecConfig.from_model_config(ModelConfig(), num_items=3).repeat_bias
    model = _model(repeat_bias=True)
    with torch.no_grad():
        model.repeat_bias.fill_(-2.5)
    users, items = torch.randn(2, 16), torch.randn(5, 16)
    seen = torch.tensor([[True, False, False, False, True], [False] * 5])
    plain = users @ items.T
    assert torch.allclose(model.score(users, items), plain)
    assert torch.allclose(model.score(users, items, seen), plain - 2.5 * seen.float())
    # The offset is scale x parameter; a larger scale lets Adam move it further per step.
    scaled = _model(repeat_bias=True, repeat_bias_scale=10.0)
    with torch.no_grad():
        scaled.repeat_bias.fill_(-0.25)
    assert float(scaled.repeat_offset().detach()) == pytest.approx(-2.5)
    assert torch.allclose(scaled.score(users, items, seen), plain - 2.5 * seen.float())
    assert float(_model().repeat_offset()) == 0.0


def test_item_norm_can_be_turned_off() -> None:
    assert isinstance(_model().item_norm, torch.nn.LayerNorm)  # old manifests: on
    model = _model(item_norm=False, use_text=False)
    ids = torch.tensor([1, 2, 3])
    assert torch.equal(model.item_vectors(ids, torch.zeros(3, 384)), model.id_embedding(ids))


@given(
    hidden_size=st.integers(1, 64),
    num_heads=st.integers(1, 8),
    max_length=st.integers(0, 4),
    dropout=st.floats(-0.5, 1.5),
    id_dropout=st.floats(-0.5, 1.5),
    scale=st.floats(-1.0, 2.0),
)
def test_a_setting_and_a_published_model_accept_the_same_shapes(
    hidden_size: int,
    num_heads: int,
    max_length: int,
    dropout: float,
    id_dropout: float,
    scale: float,
) -> None:
    shape = {
        "hidden_size": hidden_size,
        "num_heads": num_heads,
        "max_length": max_length,
        "dropout": dropout,
        "id_dropout": id_dropout,
        "repeat_bias_scale": scale,
    }
    try:
        ModelConfig(**shape)
        setting_ok = True
    except ConfigError:
        setting_ok = False
    try:
        SeqRecConfig(num_items=3, **shape)
        model_ok = True
    except ValueError:
        model_ok = False
    assert setting_ok == model_ok
