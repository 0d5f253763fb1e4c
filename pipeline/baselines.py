"""SASRec, the in-run baseline of `streamrec evaluate` (RecBole 1.2.1's architecture, our loss).

Architecture as in RecBole 1.2.1 `recbole/model/sequential_recommender/sasrec.py`: plain item id
embeddings (row 0 = padding), learned absolute positions, LayerNorm + dropout on their sum,
post-LayerNorm transformer blocks (multi-head causal self-attention, GELU feed-forward of
`inner_size`), weights N(0, 0.02), and tied output scores `hidden @ item_embedding.T`. Training is
the one used for streamrec's model (training.fit): a full-softmax cross-entropy over all items at
every position of a window. It has no text, no event types and no repeat bias.

The class speaks the same duck-typed interface as SeqRecModel (`config.max_length`,
`config.num_items`, `item_vectors`, `forward`, `encode`, `score`, `repeat_bias`), so the same fit,
evaluate and scoring code serves both. Pure model code: no file, network or print.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SASRecConfig", "SASRec", "SASRecBaseline"]


@dataclass(frozen=True)
class SASRecConfig:
    """Hyper-parameters; defaults are the ones tuned on ML-100K validation (docs/QUALITY.md)."""

    num_items: int
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    inner_size: int = 256
    max_length: int = 50
    dropout: float = 0.3  # RecBole's hidden_dropout_prob and attn_dropout_prob, one value
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        if self.num_items < 1:
            raise ValueError(f"num_items={self.num_items} must be >= 1")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must divide hidden_size={self.hidden_size}"
            )
        if self.max_length < 1 or self.num_layers < 1 or self.inner_size < 1:
            raise ValueError("max_length, num_layers and inner_size must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} is not in [0, 1)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _Block(nn.Module):
    """RecBole's TransformerLayer: post-LN attention, then post-LN GELU feed-forward."""

    def __init__(self, cfg: SASRecConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.heads = cfg.num_heads
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.attn_dropout = nn.Dropout(cfg.dropout)
        self.dense = nn.Linear(d, d)
        self.attn_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.ff_in, self.ff_out = nn.Linear(d, cfg.inner_size), nn.Linear(cfg.inner_size, d)
        self.ff_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.heads
        q, k, v = (
            lin(x).view(b, n, h, d // h).transpose(1, 2)
            for lin in (self.query, self.key, self.value)
        )  # (B, H, L, dh)
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()  # (L, L)
        att = (q @ k.transpose(-1, -2)) / (d // h) ** 0.5  # (B, H, L, L)
        att = self.attn_dropout(att.masked_fill(~causal, float("-inf")).softmax(-1))
        ctx = (att @ v).transpose(1, 2).reshape(b, n, d)  # (B, L, D)
        x = self.attn_norm(self.dropout(self.dense(ctx)) + x)  # (B, L, D)
        ff = self.ff_out(F.gelu(self.ff_in(x)))  # (B, L, D)
        out: torch.Tensor = self.ff_norm(self.dropout(ff) + x)  # (B, L, D)
        return out


class SASRec(nn.Module):
    """Id embeddings + learned positions + causal post-LN transformer; tied output scores."""

    repeat_bias = None  # interface parity with SeqRecModel: SASRec has no repeat bias

    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.item_embedding = nn.Embedding(config.num_items + 1, d, padding_idx=0)
        self.position_embedding = nn.Embedding(config.max_length, d)
        self.norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(_Block(config) for _ in range(config.num_layers))
        self.apply(self._init)

    def _init(self, module: nn.Module) -> None:
        # RecBole's SASRec._init_weights
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, self.config.initializer_range)
        elif isinstance(module, nn.LayerNorm):
            module.bias.data.zero_()
            module.weight.data.fill_(1.0)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()

    def item_vectors(
        self, id_index: torch.Tensor, text: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Embedding rows of id_index (N,) → (N, D); `text` is ignored (interface parity)."""
        vectors: torch.Tensor = self.item_embedding(id_index)  # (N, D)
        return vectors

    def forward(self, item_vecs: torch.Tensor, types: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden state after every position: item_vecs (B, L, D) right padded → (B, L, D).
        `types` is ignored. Causal attention keeps right padding out of real positions."""
        n = item_vecs.shape[1]
        if n > self.config.max_length:
            raise ValueError(f"sequence length {n} exceeds max_length={self.config.max_length}")
        positions = torch.arange(n, device=item_vecs.device)  # (L,)
        x: torch.Tensor = self.dropout(self.norm(item_vecs + self.position_embedding(positions)))
        for block in self.blocks:
            x = block(x)
        return x  # (B, L, D)

    def encode(
        self, item_vecs: torch.Tensor, types: torch.Tensor | None, lengths: torch.Tensor
    ) -> torch.Tensor:
        """User vectors: the hidden state at position lengths-1 → (B, D)."""
        hidden = self.forward(item_vecs, types)  # (B, L, D)
        last = (lengths.to(hidden.device) - 1).clamp(min=0)  # (B,)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, D)

    def score(
        self, user_vecs: torch.Tensor, item_vecs: torch.Tensor, seen: torch.Tensor | None = None
    ) -> torch.Tensor:
        """user_vecs (B, D) @ item_vecs (N, D).T → (B, N); `seen` is ignored (no repeat bias)."""
        return user_vecs @ item_vecs.T  # (B, N)


# SASRecBaseline's fields by where they go: each has the same name there.
_ARCHITECTURE_FIELDS = (
    "hidden_size",
    "num_layers",
    "num_heads",
    "inner_size",
    "max_length",
    "dropout",
)
_TRAINING_FIELDS = (
    "learning_rate",
    "weight_decay",
    "batch_size",
    "epochs",
    "patience",
    "window_stride",
)


@dataclass(frozen=True)
class SASRecBaseline:
    """How `streamrec evaluate` builds and trains its SASRec baseline (tuned on valid only).

    Architecture fields go to SASRecConfig; the rest replace the run's TrainingConfig fields.
    """

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    inner_size: int = 256
    max_length: int = 50
    dropout: float = 0.3
    learning_rate: float = 1e-3
    weight_decay: float = 0.1
    batch_size: int = 64
    epochs: int = 200
    # At a constant lr 1e-3 its validation NDCG@10 climbs slowly with ±0.005 swings between
    # epochs: patience 5 stopped seed 0 at epoch 15 (valid 0.1146), patience 30 at 30 (0.1219).
    patience: int = 30
    window_stride: int = 50

    def __post_init__(self) -> None:
        if self.learning_rate <= 0 or self.weight_decay < 0:
            raise ValueError("learning_rate must be > 0 and weight_decay >= 0")
        if min(self.batch_size, self.epochs, self.patience, self.window_stride) < 1:
            raise ValueError("batch_size, epochs, patience and window_stride must be >= 1")

    def model_config(self, num_items: int) -> SASRecConfig:
        return SASRecConfig(num_items, **self._values(_ARCHITECTURE_FIELDS))

    def training_fields(self) -> dict[str, Any]:
        """TrainingConfig fields this baseline sets (replace() them into the run's config)."""
        return {
            **self._values(_TRAINING_FIELDS),
            "warmup_steps": 0,
            "lr_schedule": "constant",
        }

    def _values(self, names: tuple[str, ...]) -> dict[str, Any]:
        return {name: getattr(self, name) for name in names}
