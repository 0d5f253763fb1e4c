"""Training and offline evaluation of SeqRecModel over in-memory sequences.

Builds per-user sequences from Events, fits with a full-softmax next-item cross-entropy at every
position (one causal pass per sequence window), and ranks held-out targets against every item.
Progress and checkpoints go through callbacks: no Kafka, no registry, no file I/O, no prints.
The ranking metrics it reports are pipeline/ranking.py's.

Size: fit and evaluate share the sequence windows, padding and device helpers above
them; apart, those helpers would be public for no other caller.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import TrainingConfig
from pipeline.messages import EVENT_TYPE_INDEX, Event
from pipeline.model import SeqRecModel
from pipeline.ranking import hit_rate_at_k, mrr_at_k, ndcg_at_k, rank_of_targets

__all__ = [
    "UserSequence",
    "LeaveOneOut",
    "FitProgress",
    "FitResult",
    "build_item_index",
    "build_sequences",
    "leave_one_out",
    "resolve_device",
    "seen_rows",
    "fit",
    "evaluate",
]

# --- sequences ------------------------------------------------------------------------------


@dataclass(frozen=True)
class UserSequence:
    """One user's interactions, oldest first: `items` model id rows (0 = unknown), `types`."""

    user_id: str
    items: np.ndarray  # (L,) int64
    types: np.ndarray  # (L,) int64

    def __len__(self) -> int:
        return len(self.items)


@dataclass(frozen=True)
class LeaveOneOut:
    """train: all but the last two; valid/test: sequences whose last item is the target."""

    train: list[UserSequence]
    valid: list[UserSequence]
    test: list[UserSequence]


def build_item_index(item_ids: Iterable[str]) -> dict[str, int]:
    """id → model id row 1..N in first-seen order (row 0 is reserved for unknown items)."""
    index: dict[str, int] = {}
    for item_id in item_ids:
        if item_id not in index:
            index[item_id] = len(index) + 1
    return index


def build_sequences(events: Sequence[Event], item_index: Mapping[str, int]) -> list[UserSequence]:
    """Per-user sequences sorted by (ts, arrival index), users in first-seen order.

    Items missing from `item_index` map to row 0; unknown event types map to type 0.
    """
    per_user: dict[str, list[tuple[int, int, int, int]]] = {}
    for arrival, event in enumerate(events):
        per_user.setdefault(event.user_id, []).append(
            (
                event.ts,
                arrival,
                item_index.get(event.item_id, 0),
                EVENT_TYPE_INDEX.get(event.type, 0),
            )
        )
    out = []
    for user_id, rows in per_user.items():
        rows.sort(key=lambda r: (r[0], r[1]))
        out.append(
            UserSequence(
                user_id,
                np.array([r[2] for r in rows], dtype=np.int64),
                np.array([r[3] for r in rows], dtype=np.int64),
            )
        )
    return out


def leave_one_out(sequences: Sequence[UserSequence], min_length: int = 3) -> LeaveOneOut:
    """Last item = test target, second to last = validation target, the rest = training.

    Users with fewer than `min_length` interactions go wholly to training (nothing to hold out).
    """
    train, valid, test = [], [], []
    for s in sequences:
        if len(s) < min_length:
            train.append(s)
            continue
        train.append(UserSequence(s.user_id, s.items[:-2], s.types[:-2]))
        valid.append(UserSequence(s.user_id, s.items[:-1], s.types[:-1]))
        test.append(s)
    return LeaveOneOut(train, valid, test)


# --- batching -------------------------------------------------------------------------------


def _windows(
    sequences: Sequence[UserSequence], max_length: int, stride: int
) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """Training windows (items, types, first loss position) so that every target is predicted
    once per epoch with (nearly) its full context, as when every prefix is its own sequence.

    The first window of a sequence holds its first max_length + 1 items and takes the loss on
    every target. Later targets come in groups of `stride`: each group gets a window of the
    max_length items before its last target, and the loss only on its own `stride` positions,
    so each of them sees at least max_length - stride + 1 items (stride = max_length: disjoint).
    """
    out = []
    span = max_length + 1
    for s in sequences:
        n = len(s)
        if n < 2:
            continue
        out.append((s.items[:span], s.types[:span], 0))
        for first in range(span, n, stride):  # first target (item index) of the group
            last = min(first + stride, n) - 1
            start = last - max_length
            out.append((s.items[start : last + 1], s.types[start : last + 1], first - start - 1))
    return out


def _pad(rows: Sequence[np.ndarray], length: int) -> torch.Tensor:
    out = np.zeros((len(rows), length), dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return torch.from_numpy(out)  # (B, L)


def _item_table(model: SeqRecModel, text_full: torch.Tensor) -> torch.Tensor:
    """Vectors of id rows 0..N (row 0 = unknown item with no text) → (N + 1, D)."""
    ids = torch.arange(text_full.shape[0], device=text_full.device)  # (N + 1,)
    return model.item_vectors(ids, text_full)  # (N + 1, D)


def _with_unknown_row(item_text: torch.Tensor) -> torch.Tensor:
    """Prepend a zero text row for id row 0: (N, T) → (N + 1, T)."""
    zero = torch.zeros(1, item_text.shape[1], dtype=item_text.dtype, device=item_text.device)
    return torch.cat([zero, item_text], dim=0)  # (N + 1, T)


def seen_rows(items: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Which id rows each history holds: items (B, L) id rows (0 = padding/unknown) → (B, num_rows)
    bool, column 0 always False (an unknown item is not a known repeat)."""
    seen = torch.zeros(items.shape[0], num_rows, dtype=torch.bool, device=items.device)
    seen.scatter_(1, items, True)
    seen[:, 0] = False
    return seen  # (B, num_rows)


def _seen_before(items: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Per position, the id rows among the items up to and including it (what the user already
    has when predicting the next one): (B, L) → (B, L, num_rows) bool, column 0 False."""
    onehot = torch.zeros(*items.shape, num_rows, device=items.device)  # (B, L, R)
    onehot.scatter_(2, items.unsqueeze(-1), 1.0)
    seen = onehot.cumsum(1) > 0  # (B, L, R)
    seen[..., 0] = False
    return seen


def resolve_device(name: str) -> torch.device:
    """ "auto" → cuda when available, else cpu; anything else as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _autocast(device: torch.device) -> tuple[contextlib.AbstractContextManager[Any], bool]:
    """(autocast context, needs a GradScaler): bf16 where supported, fp16 otherwise, off on CPU."""
    if device.type != "cuda":
        return contextlib.nullcontext(), False
    if torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16), False
    return torch.autocast("cuda", dtype=torch.float16), True


# --- evaluation -------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    model: SeqRecModel,
    sequences: Sequence[UserSequence],
    item_text: torch.Tensor,
    *,
    ks: Sequence[int] = (10, 20),
    exclude_seen: bool = True,
    batch_size: int = 256,
) -> dict[str, float]:
    """Full-ranking leave-one-out metrics: each sequence's last item is the target, the rest
    (most recent max_length) the input. item_text (N, T) aligned with id rows 1..N.

    Returns {"hr@k", "ndcg@k", "mrr@k" for k in ks, "users"}; targets with id row 0 are skipped.
    `exclude_seen` removes every item of the user's whole history (all but the target, not only
    the last max_length) from the ranking, never the target: the masked protocol.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    max_length = model.config.max_length
    usable = [s for s in sequences if len(s) >= 2 and s.items[-1] > 0]
    text_full = _with_unknown_row(item_text.to(device))  # (N + 1, T)
    ranks = []
    # fp32 even on CUDA: bf16 scores would tie and ties count against the target.
    table = _item_table(model, text_full).float()  # (N + 1, D)
    for start in range(0, len(usable), batch_size):
        chunk = usable[start : start + batch_size]
        inputs = [s.items[:-1][-max_length:] for s in chunk]
        types = [s.types[:-1][-max_length:] for s in chunk]
        length = max(len(r) for r in inputs)
        items_t = _pad(inputs, length).to(device)  # (B, L)
        types_t = _pad(types, length).to(device)  # (B, L)
        lengths = torch.tensor([len(r) for r in inputs], device=device)  # (B,)
        users = model.encode(table[items_t], types_t, lengths).float()  # (B, D)
        seen = seen_rows(items_t, table.shape[0])[:, 1:]  # (B, N)
        scores = model.score(users, table[1:], seen)  # (B, N)
        targets = torch.tensor([int(s.items[-1]) - 1 for s in chunk], device=device)  # (B,)
        exclude = None
        if exclude_seen:  # the masked protocol: the whole history, not only the input window
            whole = _pad([s.items[:-1] for s in chunk], max(len(s) - 1 for s in chunk))
            exclude = seen_rows(whole.to(device), table.shape[0])[:, 1:]  # (B, N)
        ranks.append(rank_of_targets(scores, targets, exclude))
    model.train(was_training)
    all_ranks = np.concatenate(ranks) if ranks else np.zeros(0, dtype=np.int64)
    out: dict[str, float] = {}
    for k in ks:
        out[f"hr@{k}"] = hit_rate_at_k(all_ranks, k)
        out[f"ndcg@{k}"] = ndcg_at_k(all_ranks, k)
        out[f"mrr@{k}"] = mrr_at_k(all_ranks, k)
    out["users"] = float(len(all_ranks))
    return out


# --- fit -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FitProgress:
    """What callbacks receive: after every step (kind="step") and every epoch (kind="epoch")."""

    kind: str
    epoch: int
    epochs: int
    step: int
    steps: int
    loss: float
    metrics: dict[str, float] | None = None


@dataclass
class FitResult:
    best_epoch: int
    best_metrics: dict[str, float] | None
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: bool = False
    seconds: float = 0.0


def _batches(n: int, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    perm = rng.permutation(n)
    for start in range(0, n, batch_size):
        yield perm[start : start + batch_size]


def fit(
    model: SeqRecModel,
    train_sequences: Sequence[UserSequence],
    item_text: torch.Tensor,
    cfg: TrainingConfig,
    *,
    valid_sequences: Sequence[UserSequence] | None = None,
    callbacks: Sequence[Callable[[FitProgress], None]] = (),
    patience: int | None = None,
    exclude_seen: bool = True,
    max_seconds: float | None = None,
    warmup_steps: int | None = None,
    cosine_decay: bool | None = None,
) -> FitResult:
    """Train `model` in place; returns the history. item_text (N, T) aligned with id rows 1..N.

    Loss: full-softmax cross-entropy over all N items, once per target per epoch, each target
    seeing up to max_length items of context (overlapping windows, cfg.window_stride; targets
    with id row 0 are skipped). With `valid_sequences`, evaluates NDCG@10 after each epoch,
    stops after `patience` (default cfg.patience) epochs without improvement and restores the
    best weights. Device: cfg.device ("auto" = CUDA with bf16/fp16 autocast when available).
    Seeded from cfg.seed without disturbing the caller's global RNG state. Learning rate: linear
    warm-up over `warmup_steps` (default cfg.warmup_steps), then constant, or with
    `cosine_decay` (default cfg.lr_schedule == "cosine") a cosine from cfg.learning_rate to 0 at
    the end of cfg.epochs. Raises ValueError when there is nothing to learn.
    """
    patience = cfg.patience if patience is None else patience
    warmup_steps = cfg.warmup_steps if warmup_steps is None else warmup_steps
    cosine_decay = cfg.lr_schedule == "cosine" if cosine_decay is None else cosine_decay
    device = resolve_device(cfg.device)
    model.to(device)
    windows = _windows(
        train_sequences, model.config.max_length, min(cfg.window_stride, model.config.max_length)
    )
    if not windows:
        raise ValueError("no training sequence has two or more interactions")
    text_full = _with_unknown_row(item_text.to(device=device, dtype=torch.float32))  # (N + 1, T)
    if text_full.shape[0] != model.config.num_items + 1:
        raise ValueError(
            f"item_text has {item_text.shape[0]} rows, model has num_items={model.config.num_items}"
        )
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay
    )
    autocast, needs_scaler = _autocast(device)
    scaler = torch.amp.GradScaler("cuda") if needs_scaler else None
    rng = np.random.default_rng(cfg.seed)
    steps = math.ceil(len(windows) / cfg.batch_size)
    total_steps = steps * cfg.epochs

    def lr_at(step: int) -> float:
        scale = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
        if cosine_decay:
            scale *= 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))
        return cfg.learning_rate * scale

    result = FitResult(best_epoch=-1, best_metrics=None)
    best_state: dict[str, torch.Tensor] | None = None
    best_score, bad_epochs = -1.0, 0
    started = time.monotonic()
    cuda_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(cfg.seed)
        for epoch in range(cfg.epochs):
            model.train()
            total, count = 0.0, 0
            for step, idx in enumerate(_batches(len(windows), cfg.batch_size, rng)):
                batch = [windows[i] for i in idx]
                length = max(len(w[0]) for w in batch) - 1
                items = _pad([w[0][:-1] for w in batch], length).to(device)  # (B, L)
                types = _pad([w[1][:-1] for w in batch], length).to(device)  # (B, L)
                targets = _pad([w[0][1:] for w in batch], length).to(device)  # (B, L)
                first = torch.tensor([w[2] for w in batch], device=device)  # (B,)
                position = torch.arange(length, device=device)  # (L,)
                mask = (targets > 0) & (position[None, :] >= first[:, None])  # (B, L)
                with autocast:
                    table = _item_table(model, text_full)  # (N + 1, D)
                    hidden = model(table[items], types)  # (B, L, D)
                    seen = (
                        _seen_before(items, table.shape[0])[mask][:, 1:]
                        if model.repeat_bias is not None
                        else None
                    )  # (M, N)
                    logits = model.score(hidden[mask], table[1:], seen)  # (M, N)
                loss = F.cross_entropy(logits.float(), targets[mask] - 1)
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(epoch * steps + step)
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()  # type: ignore[no-untyped-call]
                    optimizer.step()
                total += float(loss.detach()) * int(mask.sum())
                count += int(mask.sum())
                for cb in callbacks:
                    cb(FitProgress("step", epoch, cfg.epochs, step, steps, float(loss.detach())))
            record: dict[str, Any] = {
                "epoch": epoch,
                "loss": total / max(count, 1),
                "seconds": time.monotonic() - started,
            }
            metrics = None
            if valid_sequences:
                metrics = evaluate(
                    model, valid_sequences, item_text.to(device), exclude_seen=exclude_seen
                )
                record["metrics"] = metrics
                if metrics["ndcg@10"] > best_score:
                    best_score, bad_epochs = metrics["ndcg@10"], 0
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                    result.best_epoch, result.best_metrics = epoch, metrics
                else:
                    bad_epochs += 1
            else:
                result.best_epoch = epoch
            result.history.append(record)
            for cb in callbacks:
                cb(
                    FitProgress(
                        "epoch",
                        epoch,
                        cfg.epochs,
                        steps,
                        steps,
                        record["loss"],
                        copy.deepcopy(metrics),
                    )
                )
            if valid_sequences and bad_epochs >= patience:
                result.stopped_early = True
                break
            if max_seconds is not None and time.monotonic() - started > max_seconds:
                result.stopped_early = True
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    result.seconds = time.monotonic() - started
    return result
