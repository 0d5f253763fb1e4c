"""Continual learning, the pure parts: when to fine-tune, what to train and hold out, how to grow
the item vocabulary, whether to promote, and online (prequential) ranking quality.

Consumes events/impressions as plain values and models as objects; no Kafka, no registry, no
files, no threads (workers/finetune.py composes these with the feedback store and the registry).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.config import TrainingConfig
from pipeline.errors import TrainingStopped
from pipeline.messages import Event
from pipeline.model import SeqRecModel
from pipeline.training import FitProgress, UserSequence, build_sequences, evaluate, fit

__all__ = [
    "TriggerPolicy",
    "FinetuneData",
    "Candidate",
    "fine_tune",
    "grow_vocabulary",
    "split_feedback",
    "promotion_decision",
    "OnlineEvaluator",
    "prequential",
    "prequential_rounds",
]


@dataclass(frozen=True)
class TriggerPolicy:
    """Fine-tune after `every_events` new events, or after `every_seconds` with at least one;
    the first fine-tune of a deployment already after `first_after_events`, because a model
    that has not seen the catalog serves mostly trending items until one has run."""

    every_events: int
    every_seconds: float
    first_after_events: int = 0  # 0: the first run waits like the others

    def due(self, new_events: int, seconds_since_last: float, *, first: bool = False) -> bool:
        if new_events <= 0:
            return False
        if first and self.first_after_events and new_events >= self.first_after_events:
            return True
        return new_events >= self.every_events or seconds_since_last >= self.every_seconds


def grow_vocabulary(
    model: SeqRecModel, item_ids: Sequence[str], new_ids: Iterable[str]
) -> tuple[SeqRecModel, list[str]]:
    """A copy of `model` whose id embedding has a row for every id of `new_ids` not yet known.

    New rows start as a copy of row 0 (the unknown-item row), so a new item's vector is exactly
    the text-projection cold start it was served with before; every old row, and therefore every
    output for old items, is unchanged. Returns (grown model on CPU in eval mode, grown item ids).
    """
    known = set(item_ids)
    added = [i for i in dict.fromkeys(new_ids) if i not in known]
    config = dataclasses.replace(model.config, num_items=len(item_ids) + len(added))
    grown = SeqRecModel(config)
    state = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
    old = state["id_embedding.weight"]  # (N + 1, D)
    state["id_embedding.weight"] = torch.cat([old, old[:1].expand(len(added), -1)])  # (N' + 1, D)
    grown.load_state_dict(state, strict=True)
    return grown.eval(), list(item_ids) + added


@dataclass(frozen=True)
class FinetuneData:
    """train: sequences to fit (touched users + a replay sample of the others); holdout: one
    sequence per held-out target (a recently active user's newest events), each ending at its
    target, never seen in training."""

    train: list[UserSequence]
    holdout: list[UserSequence]
    new_users: int
    replayed_users: int
    train_events: int


def split_feedback(
    events: Sequence[Event],
    item_index: Mapping[str, int],
    *,
    new_from: int,
    replay_ratio: float,
    holdout_users: int,
    rng: np.random.Generator,
    holdout_events_per_user: int = 1,
) -> FinetuneData:
    """What one fine-tune trains and evaluates on. `events` are the retained events oldest
    first; `events[new_from:]` arrived since the last run.

    Holdout: the `holdout_users` users whose newest new event is the most recent (by event
    time, then arrival); each gives its newest `holdout_events_per_user` new events as targets, but
    never more than half of its new events (at least one), so the run still trains on what the
    user just did. A target's sequence is the user's history up to it in (ts, arrival) order,
    as training.evaluate expects; several targets per user make the gate less noisy where few
    users are active between runs. Train: every other event, as the sequences of users with new
    events plus `replay_ratio` times as many sequences of other users, sampled uniformly (the
    replay that guards against forgetting).
    """

    def when(i: int) -> tuple[int, int]:
        return events[i].ts, i

    new_by_user: dict[str, list[int]] = {}
    for i in range(max(new_from, 0), len(events)):
        new_by_user.setdefault(events[i].user_id, []).append(i)
    for idxs in new_by_user.values():
        idxs.sort(key=when)
    newest = sorted(new_by_user.items(), key=lambda kv: when(kv[1][-1]), reverse=True)[
        : max(holdout_users, 0)
    ]
    held_index: set[int] = set()
    for _, idxs in newest:
        held_index.update(idxs[-min(max(holdout_events_per_user, 1), max(1, len(idxs) // 2)) :])
    train_events = [e for i, e in enumerate(events) if i not in held_index]
    sequences = build_sequences(train_events, item_index)
    touched = set(new_by_user)
    fresh = [s for s in sequences if s.user_id in touched]
    older = [s for s in sequences if s.user_id not in touched]
    n_replay = min(len(older), round(replay_ratio * max(len(fresh), 1)))
    picked: Sequence[int] = (
        rng.choice(len(older), size=n_replay, replace=False).tolist() if n_replay else []
    )
    replay = [older[int(i)] for i in sorted(picked)]
    train = [s for s in fresh + replay if len(s) >= 2]
    held_users = [user for user, _ in newest]
    return FinetuneData(
        train,
        _holdout_sequences(events, item_index, held_users, held_index),
        len(fresh),
        len(replay),
        sum(len(s) for s in train),
    )


def _holdout_sequences(
    events: Sequence[Event],
    item_index: Mapping[str, int],
    held_users: Sequence[str],
    held_index: set[int],
) -> list[UserSequence]:
    """One sequence per held-out event: its user's history up to it, in (ts, arrival) order
    (each user's sequence is built once and sliced at its targets)."""
    wanted = set(held_users)
    mine = [i for i, event in enumerate(events) if event.user_id in wanted]
    sequences = {s.user_id: s for s in build_sequences([events[i] for i in mine], item_index)}
    order: dict[str, list[int]] = {}
    for i in sorted(mine, key=lambda i: (events[i].ts, i)):  # build_sequences' order
        order.setdefault(events[i].user_id, []).append(i)
    out = []
    for user in held_users:
        seq = sequences[user]
        for pos, i in enumerate(order[user]):
            if i in held_index and pos >= 1 and seq.items[pos] > 0:
                out.append(UserSequence(user, seq.items[: pos + 1], seq.types[: pos + 1]))
    return out


def promotion_decision(
    candidate: Mapping[str, float],
    current: Mapping[str, float],
    *,
    tolerance: float,
    metric: str = "ndcg@10",
) -> tuple[bool, str]:
    """Promote unless the candidate is worse than current on `metric` by more than `tolerance`
    (absolute). Returns (promote, a sentence with the figures)."""
    cand, cur = float(candidate.get(metric, 0.0)), float(current.get(metric, 0.0))
    if not math.isfinite(cand):
        return False, f"candidate {metric} is {cand}"
    promote = cand >= cur - tolerance
    verdict = "promoted" if promote else "rejected"
    return promote, (
        f"{verdict}: candidate {metric} {cand:.4f} vs current {cur:.4f} "
        f"(tolerance {tolerance:.4f}, {int(candidate.get('users', 0))} held-out targets)"
    )


def _gain(items: Sequence[str], target: str, k: int) -> tuple[float, float]:
    for rank, item in enumerate(items[:k], start=1):
        if item == target:
            return 1.0, 1.0 / math.log2(rank + 1)
    return 0.0, 0.0


class OnlineEvaluator:
    """Streaming prequential HR@k / NDCG@k: the recommendation a user's event triggered, judged
    by that user's next event. Events of one user must arrive in order (they share a partition);
    recommendations may arrive before or after that next event. Memory bounded by `max_pending`.
    """

    def __init__(self, k: int = 10, max_pending: int = 200_000) -> None:
        self.k = k
        self._max = max_pending
        self._last_event: OrderedDict[str, str] = OrderedDict()  # user -> newest event id
        self._next_item: OrderedDict[str, str] = OrderedDict()  # event id -> next item of user
        self._recs: OrderedDict[str, list[str]] = OrderedDict()  # trigger id -> items
        self.judged = 0
        self.hits = 0.0
        self.ndcg_sum = 0.0

    def observe_event(
        self, user_id: str, event_id: str, item_id: str
    ) -> tuple[float, float] | None:
        previous = self._last_event.pop(user_id, None)
        self._put(self._last_event, user_id, event_id)
        if previous is None or previous == event_id:
            return None
        items = self._recs.pop(previous, None)
        if items is None:
            self._put(self._next_item, previous, item_id)
            return None
        return self._judge(items, item_id)

    def observe_recommendation(
        self, trigger_event_id: str | None, item_ids: Sequence[str]
    ) -> tuple[float, float] | None:
        if trigger_event_id is None:
            return None  # a model-swap re-scoring: no event to be judged by
        target = self._next_item.pop(trigger_event_id, None)
        if target is None:
            self._put(self._recs, trigger_event_id, list(item_ids))
            return None
        return self._judge(item_ids, target)

    def _judge(self, items: Sequence[str], target: str) -> tuple[float, float]:
        hit, gain = _gain(items, target, self.k)
        self.judged += 1
        self.hits += hit
        self.ndcg_sum += gain
        return hit, gain

    def _put(self, table: OrderedDict[str, Any], key: str, value: Any) -> None:
        table[key] = value
        table.move_to_end(key)
        while len(table) > self._max:
            table.popitem(last=False)

    def figures(self) -> dict[str, float]:
        n = max(self.judged, 1)
        return {
            "judged": float(self.judged),
            f"hr@{self.k}": self.hits / n,
            f"ndcg@{self.k}": self.ndcg_sum / n,
        }


def prequential(
    events: Sequence[Event],
    recs: Mapping[str, Sequence[str]],
    k: int = 10,
    only: Container[str] | None = None,
) -> dict[str, float]:
    """Batch prequential HR@k / NDCG@k over a replay: `recs` maps trigger event id → recommended
    item ids. Each event with a recommendation of its own is judged by its user's next event;
    triggers folded into a later event of the same micro-batch got none and are not counted.
    With `only`, just the triggers in it are judged (two runs compared on the same events)."""
    last: dict[str, str] = {}
    judged, hits, gains = 0, 0.0, 0.0
    for event in events:
        previous = last.get(event.user_id)
        last[event.user_id] = event.event_id
        if previous is None or previous not in recs or (only is not None and previous not in only):
            continue
        hit, gain = _gain(recs[previous], event.item_id, k)
        judged, hits, gains = judged + 1, hits + hit, gains + gain
    n = max(judged, 1)
    return {"judged": float(judged), f"hr@{k}": hits / n, f"ndcg@{k}": gains / n}


def prequential_rounds(events: Sequence[Event]) -> list[list[Event]]:
    """`events` regrouped into rounds in which each user appears at most once: round r holds
    every user's r-th event, in the order the users reach it.

    Replaying round by round, and waiting for each round's recommendations before the next,
    gives every event a recommendation of its own (no two events of one user share a
    micro-batch) whatever the CPU speed. Each user's events keep their order; only the
    interleaving across users changes, which a model fixed over `events` cannot notice.
    """
    rounds: list[list[Event]] = []
    seen: dict[str, int] = {}
    for event in events:
        r = seen.get(event.user_id, 0)
        seen[event.user_id] = r + 1
        if r == len(rounds):
            rounds.append([])
        rounds[r].append(event)
    return rounds


@dataclass
class Candidate:
    """The outcome of one fine-tune: the trained candidate (grown vocabulary), its item ids, and
    the held-out figures of candidate and current (the current model grown the same way)."""

    model: SeqRecModel
    item_ids: list[str]
    candidate_metrics: dict[str, float]
    current_metrics: dict[str, float]
    loss: float
    data: FinetuneData
    seconds: float


def fine_tune(
    current: SeqRecModel,
    item_ids: Sequence[str],
    events: Sequence[Event],
    *,
    new_from: int,
    text_of: Callable[[Sequence[str]], np.ndarray],
    training: TrainingConfig,
    replay_ratio: float,
    holdout_users: int,
    holdout_events_per_user: int = 1,
    max_seconds: float | None = None,
    seed: int = 0,
    stop: Callable[[], bool] | None = None,
) -> Candidate:
    """Warm-start a copy of `current` on the feedback and evaluate it against `current`.

    `text_of(ids)` gives (len(ids), T) text vectors (zeros for unknown items). Items first seen in
    `events` are grown into the vocabulary; both models are evaluated on the same held-out
    targets over the same grown item space, so a new item counts for both (as the cold start the
    current model serves it with). Raises ValueError when there is nothing to train on, and
    TrainingStopped from the next training step once `stop()` is true.
    """
    started = time.monotonic()
    baseline, grown_ids = grow_vocabulary(current, item_ids, (e.item_id for e in events))
    index = {item_id: row + 1 for row, item_id in enumerate(grown_ids)}
    data = split_feedback(
        events,
        index,
        new_from=new_from,
        replay_ratio=replay_ratio,
        holdout_users=holdout_users,
        holdout_events_per_user=holdout_events_per_user,
        rng=np.random.default_rng(seed),
    )
    if not data.train:
        raise ValueError("no sequence with two or more interactions to fine-tune on")
    item_text = torch.from_numpy(np.ascontiguousarray(text_of(grown_ids), dtype=np.float32))
    candidate = copy.deepcopy(baseline)

    def check_stop(_progress: FitProgress) -> None:
        if stop is not None and stop():
            raise TrainingStopped("fine-tune abandoned: the worker is stopping")

    result = fit(
        candidate,
        data.train,
        item_text,
        dataclasses.replace(training, seed=seed),
        max_seconds=max_seconds,
        callbacks=[check_stop],
    )
    device = next(candidate.parameters()).device
    baseline.to(device)
    current_metrics = evaluate(baseline, data.holdout, item_text.to(device)) if data.holdout else {}
    candidate_metrics = (
        evaluate(candidate, data.holdout, item_text.to(device)) if data.holdout else {}
    )
    loss = float(result.history[-1]["loss"]) if result.history else float("nan")
    return Candidate(
        candidate.to("cpu").eval(),
        grown_ids,
        candidate_metrics,
        current_metrics,
        loss,
        data,
        time.monotonic() - started,
    )
