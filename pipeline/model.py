"""SeqRecModel: a causal transformer over a user's item/event sequence (SASRec-style, tied scores).

Reads top to bottom: config → item representation (id + MiniLM text → LayerNorm) → input
embedding (item + event type) → GPT-2 encoder (built from config, no hub) → pooling at the last
real position. Scores are user_vec @ item_vecs.T. `extend` is the serving path: the same encoder
run over new positions only, attending to cached keys/values of the earlier ones. No file,
network or print here; device and dtype come from the caller, saving/loading goes through
registry.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2Config, GPT2Model
from transformers.models.gpt2.modeling_gpt2 import GPT2Block

from pipeline.config import ModelConfig, architecture_problems

__all__ = ["SeqRecConfig", "SeqRecModel"]


@dataclass(frozen=True, kw_only=True)
class SeqRecConfig(ModelConfig):
    """The model config plus the two vocab sizes the weights depend on: what a version stores.

    `num_items` counts trained item ids; id row 0 is reserved for unknown/new items, so the id
    embedding has num_items + 1 rows. `id_dropout` is the training-time chance that an item is
    shown by its text alone (what makes cold-start items work).
    """

    num_items: int
    num_event_types: int = 5
    # The defaults of a manifest written before these fields existed (its weights have no
    # repeat-bias parameter, and its items were normalised); ModelConfig's are the new ones.
    repeat_bias: bool = False
    # The offset is repeat_bias_scale x a parameter: Adam moves a parameter by about the learning
    # rate per step, so at scale 1 a run of ~1,000 steps cannot take the offset much below -2
    # even where the data never repeats; a larger scale lets it reach its optimum.
    repeat_bias_scale: float = 1.0
    item_norm: bool = True

    def __post_init__(self) -> None:
        # The shape rules are ModelConfig's (one validation); a manifest is not a setting, so a
        # bad one raises ValueError, which the registry turns into ModelRejected.
        problems = architecture_problems(self)
        if self.num_items < 0:
            problems.append(("num_items", f"{self.num_items} must be >= 0"))
        if self.num_event_types < 1:
            problems.append(("num_event_types", f"{self.num_event_types} must be >= 1"))
        if problems:
            raise ValueError(
                "invalid SeqRecConfig: " + "; ".join(f"{name} {why}" for name, why in problems)
            )
        if not self.use_text and self.id_dropout > 0:
            # Without text an id-dropped item has nothing left; keep the field honest.
            object.__setattr__(self, "id_dropout", 0.0)

    @classmethod
    def from_model_config(
        cls, cfg: ModelConfig, num_items: int, num_event_types: int = 5, **extra: Any
    ) -> SeqRecConfig:
        shape = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(ModelConfig)}
        return cls(**(shape | extra), num_items=num_items, num_event_types=num_event_types)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SeqRecConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown SeqRecConfig fields: {sorted(unknown)}")
        return cls(**d)


class SeqRecModel(nn.Module):
    """Item tower + causal user encoder; the same item vectors embed inputs and score outputs."""

    def __init__(self, config: SeqRecConfig) -> None:
        super().__init__()
        self.config = config
        d = config.hidden_size
        # --- item representation: id row (0 = unknown) + projected text → LayerNorm
        self.id_embedding = nn.Embedding(config.num_items + 1, d)
        self.text_projection = nn.Linear(config.text_dim, d) if config.use_text else None
        self.item_norm = nn.LayerNorm(d) if config.item_norm else nn.Identity()
        # --- what the user did with the item (view, click, ..., rating)
        self.type_embedding = nn.Embedding(config.num_event_types, d)
        # --- the causal encoder, built from a config (no download); fed with inputs_embeds
        gpt_config = GPT2Config(
            vocab_size=1,
            n_positions=config.max_length,
            n_embd=d,
            n_layer=config.num_layers,
            n_head=config.num_heads,
            resid_pdrop=config.dropout,
            embd_pdrop=config.dropout,
            attn_pdrop=config.dropout,
            use_cache=False,
            bos_token_id=None,
            eos_token_id=None,
            # GPT-2's tanh GELU as one fused kernel: same function as "gelu_new", measured ~5x
            # faster on CPU, where it was half of the updater's encode time.
            activation_function="gelu_pytorch_tanh",
        )
        self.encoder = GPT2Model(gpt_config)
        # --- how much more (or less) likely an item is when the user already has it: dot
        # products of a user with its own history items are high by construction, yet whether
        # people come back to an item is a property of the data (never, in MovieLens ratings;
        # often, in music), so it is learned rather than a fixed exclusion rule.
        self.repeat_bias = nn.Parameter(torch.zeros(())) if config.repeat_bias else None
        nn.init.normal_(self.id_embedding.weight, std=0.02)
        with torch.no_grad():
            self.id_embedding.weight[0].zero_()  # unknown items start from their text alone
        nn.init.normal_(self.type_embedding.weight, std=0.02)

    def item_vectors(self, id_index: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Representations of N items: id_index (N,) long (0 = never trained), text (N, T) → (N, D).

        In training mode each id is replaced by 0 with probability config.id_dropout.
        """
        if self.training and self.config.id_dropout > 0:
            drop = (
                torch.rand(id_index.shape, device=id_index.device) < self.config.id_dropout
            )  # (N,)
            id_index = id_index.masked_fill(drop, 0)  # (N,)
        vectors = self.id_embedding(id_index)  # (N, D)
        if self.text_projection is not None:
            vectors = vectors + self.text_projection(text.to(vectors.dtype))  # (N, D)
        normed: torch.Tensor = self.item_norm(vectors)  # (N, D)
        return normed

    def forward(self, item_vecs: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
        """Hidden state after every position of right-padded sequences.

        item_vecs (B, L, D), types (B, L) long → (B, L, D). Causal attention means position t
        sees only 0..t, so right padding never leaks into real positions and needs no mask.
        """
        if item_vecs.shape[1] > self.config.max_length:
            raise ValueError(
                f"sequence length {item_vecs.shape[1]} exceeds "
                f"max_length={self.config.max_length}; keep the most recent items"
            )
        inputs = item_vecs + self.type_embedding(types)  # (B, L, D)
        out = self.encoder(inputs_embeds=inputs)  # last_hidden_state: (B, L, D)
        hidden: torch.Tensor = out.last_hidden_state  # (B, L, D)
        return hidden

    def encode(
        self, item_vecs: torch.Tensor, types: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        """User vectors: the hidden state at position lengths-1 of each row → (B, D).

        lengths (B,) long, each in 1..L (a 0 is treated as 1; callers skip empty histories).
        """
        hidden = self.forward(item_vecs, types)  # (B, L, D)
        last = (lengths.to(hidden.device) - 1).clamp(min=0)  # (B,)
        index = last.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])  # (B, 1, D)
        return hidden.gather(1, index).squeeze(1)  # (B, D)

    @torch.no_grad()
    def extend(
        self,
        past: torch.Tensor,
        past_lengths: torch.Tensor,
        item_vecs: torch.Tensor,
        types: torch.Tensor,
        new_lengths: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode new positions after cached ones (serving: eval mode, no dropout).

        past (2, NL, B, H, P, dh): attention keys/values of each user's first past_lengths[b]
        positions (right padded; P may be 0); item_vecs (B, N, D), types (B, N) long: the next
        new_lengths[b] (1..N) events. Returns user vectors (B, D), the hidden state after the
        last new event, and the new positions' keys/values (2, NL, B, H, N, dh). Causal
        attention leaves earlier positions untouched by later ones, so this equals `encode`
        over the whole sequence, at the cost of the new positions only.
        Raises ValueError when a sequence would exceed max_length.
        """
        if self.training:
            raise RuntimeError("SeqRecModel.extend is for serving: call .eval() first")
        gpt = self.encoder.config
        if (
            not gpt.scale_attn_weights
            or gpt.scale_attn_by_inverse_layer_idx
            or gpt.reorder_and_upcast_attn
        ):
            raise ValueError("extend supports GPT-2 blocks with plain 1/sqrt(dh) attention only")
        b, n, d = item_vecs.shape
        h, p = self.config.num_heads, past.shape[-2]
        device = item_vecs.device
        steps = torch.arange(n, device=device)  # (N,)
        positions = past_lengths.view(-1, 1).to(device) + steps  # (B, N)
        if int((past_lengths.to(device) + new_lengths.to(device)).max()) > self.config.max_length:
            raise ValueError(f"extended sequence exceeds max_length={self.config.max_length}")
        hidden = (
            item_vecs
            + self.type_embedding(types)
            + self.encoder.wpe(positions.clamp(max=self.config.max_length - 1))
        )  # (B, N, D)
        # A new position sees the user's cached positions and the new ones up to itself.
        sees_past = (
            torch.arange(p, device=device).view(1, 1, p) < past_lengths.to(device).view(-1, 1, 1)
        ).expand(b, n, p)  # (B, N, P)
        sees_new = (steps.view(1, n) <= steps.view(n, 1)).expand(b, n, n)  # (B, N, N)
        mask = torch.cat([sees_past, sees_new], dim=-1).unsqueeze(1)  # (B, 1, N, P+N)
        new_kv = []
        for layer, module in enumerate(self.encoder.h):
            block = cast(GPT2Block, module)
            q, k, v = block.attn.c_attn(block.ln_1(hidden)).split(d, dim=2)  # 3 x (B, N, D)
            q, k, v = (t.view(b, n, h, d // h).transpose(1, 2) for t in (q, k, v))  # (B, H, N, dh)
            keys = torch.cat([past[0, layer].to(k.dtype), k], dim=2)  # (B, H, P+N, dh)
            values = torch.cat([past[1, layer].to(v.dtype), v], dim=2)  # (B, H, P+N, dh)
            attended = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=mask
            )  # (B, H, N, dh)
            hidden = hidden + block.attn.c_proj(
                attended.transpose(1, 2).reshape(b, n, d)
            )  # (B, N, D)
            hidden = hidden + block.mlp(block.ln_2(hidden))  # (B, N, D)
            new_kv.append(torch.stack([k, v]))  # (2, B, H, N, dh)
        hidden = self.encoder.ln_f(hidden)  # (B, N, D)
        last = (new_lengths.to(device) - 1).clamp(min=0)  # (B,)
        users = hidden[torch.arange(b, device=device), last]  # (B, D)
        return users, torch.stack(new_kv, dim=1)  # (B, D), (2, NL, B, H, N, dh)

    def score(
        self, user_vecs: torch.Tensor, item_vecs: torch.Tensor, seen: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Tied scores: user_vecs (B, D) @ item_vecs (N, D).T → (B, N), plus the learned repeat
        bias where `seen` (B, N) bool marks the candidates already in each user's history."""
        scores = user_vecs @ item_vecs.T  # (B, N)
        if self.repeat_bias is not None and seen is not None:
            scores = scores + self.repeat_offset().to(scores.dtype) * seen.to(
                scores.dtype
            )  # (B, N)
        return scores

    def repeat_offset(self) -> torch.Tensor:
        """The score offset for items already in the history (a 0-d tensor; 0 without one)."""
        if self.repeat_bias is None:
            return torch.zeros(())
        return self.repeat_bias * self.config.repeat_bias_scale
