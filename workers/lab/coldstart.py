"""`streamrec experiment coldstart`: does a deployment on a catalog its model never saw beat
popularity from the first minutes (issue 19)?

Bootstraps a model on the first era of the synthetic drift scenario (workers/lab/experiment.
drift_scenario), then deploys it on the second era alone: the first era's items are retired, the
second era's (new ids, own titles, own popularity; the model never saw them, not even their
text) published, and only the second era's events replayed through the real pipeline, with no
warm-up (a new deployment: no user history, an empty feedback store). Three arms on the same
events, each on its own topics and copy of the bootstrap registry:

- `fallback`: scorer.trending = blend; fine-tune on, the first run after
  finetune.first_after_events events, then every finetune.every_events;
- `baseline`: scorer.trending = off; fine-tune on, the first run after every_events, as before
  issue 19;
- `popularity`: scorer.trending = only; no fine-tune.

The replay pauses at each fine-tune boundary until the run finished (experiment.chunk_bounds)
and goes round by round within a chunk, so every event is judged by a recommendation of its
own (prequential HR@10 / NDCG@10), over the first `first_events` replayed events and over the
whole replay, and once more on only the events every arm judged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import torch

from pipeline.broker import embedded_broker_for
from pipeline.config import Config, PathsConfig
from pipeline.continual import prequential
from pipeline.datasets import Dataset
from pipeline.messages import Event, Item
from pipeline.registry import ModelRegistry
from workers.lab.experiment import _arm_config, _run_arm, _share_cache, drift_scenario

__all__ = ["run", "ARMS", "same_events"]

ARMS = ("fallback", "baseline", "popularity")


def _eras(
    seed: int, n_users: int, n_items: int, n_events: int
) -> tuple[Dataset, tuple[Item, ...], list[Event]]:
    """(first era as a dataset, the deployment's items, the second era's events)."""
    data = drift_scenario(seed=seed, n_users=n_users, n_items=n_items, n_events=n_events)
    first_items = tuple(i for i in data.items if not i.item_id.startswith("n"))
    second_items = tuple(i for i in data.items if i.item_id.startswith("n"))
    head, tail = data.events[:n_events], list(data.events[n_events:])
    first = Dataset(f"{data.name}-era1", head, first_items)
    # The turned-over catalog: the first era's items retired (a text-less upsert only flips
    # availability), the second era's published.
    retired = tuple(Item(i.item_id, tail[0].ts, available=False) for i in first_items)
    return first, retired + second_items, tail


def run(
    config: Config,
    *,
    as_json: bool = False,
    n_users: int = 300,
    n_items: int = 300,
    n_events: int = 15_000,
    first_events: int = 5_000,
    bootstrap_models: Path | None = None,
    stop: threading.Event | None = None,
) -> dict[str, Any]:
    """Run the three arms on the drift scenario's second era (`n_events` events over `n_items`
    new items by `n_users` users) and print the comparison; returns it."""
    torch.set_num_threads(1)
    started = time.monotonic()
    first, items, tail = _eras(config.training.seed, n_users, n_items, n_events)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    work = config.paths.root / "experiments" / f"coldstart-{stamp}"
    boot = config.replace(
        paths=PathsConfig(data_dir=str(work / "bootstrap")),
        training=dataclasses.replace(config.training, bootstrap_fraction=1.0),
    )
    _share_cache(config, work / "bootstrap")
    if bootstrap_models is not None:  # reuse a bootstrap of the same first era as is
        shutil.copytree(bootstrap_models, work / "bootstrap" / "models")
        boot_metrics = ModelRegistry(work / "bootstrap" / "models").load().metrics
    else:
        from workers.bootstrap import run as bootstrap

        with contextlib.redirect_stdout(sys.stderr):  # stdout: the result alone (--json)
            boot_metrics = bootstrap(boot, progress=False, dataset=first).metrics
    ft = config.finetune
    plans = {  # arm -> (scorer.trending, fine-tune, first_after_events, chunk sizes)
        "fallback": (
            "blend",
            True,
            ft.first_after_events,
            [ft.first_after_events, ft.every_events]
            if ft.first_after_events
            else [ft.every_events],
        ),
        "baseline": ("off", True, 0, [ft.every_events]),
        "popularity": ("only", False, 0, [ft.every_events]),
    }
    # Judged apart: the first minutes, and the events before the fallback's first fine-tune
    # (where no arm has trained on the new catalog yet).
    windows = {
        "first": first_events,
        "before_first_finetune": ft.first_after_events or first_events,
    }
    arms: dict[str, Any] = {}
    recs: dict[str, dict[str, list[str]]] = {}
    with embedded_broker_for(config.kafka, config.broker):
        for arm, (trending, finetune, first_after, chunks) in plans.items():
            if stop is not None and stop.is_set():
                break
            root = work / arm
            _share_cache(config, root)  # first: it makes `root` 0700, copytree would not
            shutil.copytree(work / "bootstrap" / "models", root / "models")
            arm_config = _arm_config(config, arm, root, stamp.replace("-", ""), ft.every_events)
            arm_config = arm_config.replace(
                scorer=dataclasses.replace(arm_config.scorer, trending=trending),
                finetune=dataclasses.replace(arm_config.finetune, first_after_events=first_after),
            )
            arms[arm], recs[arm] = _run_arm(
                arm_config, arm, items, [], tail, chunks, finetune=finetune
            )
            arms[arm].update(_windows(tail, recs[arm], windows))
            arms[arm].update(
                {
                    "scorer_trending": trending,
                    "finetune": finetune,
                    "first_after_events": first_after if finetune else None,
                    "chunks": chunks if finetune else None,
                }
            )
    result = {
        "experiment": "coldstart",
        "source": first.name.removesuffix("-era1"),
        "bootstrap_events": len(first.events),
        "bootstrap_items": len(first.items),
        "replayed_events": len(tail),
        "replayed_items": len({e.item_id for e in tail}),
        "users": n_users,
        "first_events": min(first_events, len(tail)),
        "bootstrap_offline": {
            k: round(float(v), 4)
            for k, v in boot_metrics.items()
            if k in ("hr@10", "ndcg@10") and v is not None
        },
        "finetune_every_events": ft.every_events,
        "first_after_events": ft.first_after_events,
        "windows": windows,
        "arms": arms,
        "same_events": same_events(tail, recs, windows) if recs else {},
        "seconds": round(time.monotonic() - started, 1),
    }
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() if as_json else _text(result))
    return result


def _windows(
    tail: list[Event], by_trigger: dict[str, list[str]], windows: dict[str, int]
) -> dict[str, Any]:
    out = {}
    for name, n in windows.items():
        early = prequential(tail[:n], by_trigger, k=10)
        out[name] = {
            "hr@10": round(early["hr@10"], 4),
            "ndcg@10": round(early["ndcg@10"], 4),
            "judged": int(early["judged"]),
        }
    return out


def same_events(
    tail: list[Event], recs: dict[str, dict[str, list[str]]], windows: dict[str, int], k: int = 10
) -> dict[str, Any]:
    """Every arm judged on only the events that all arms answered with a recommendation of their
    own (round by round that is every judged event; this makes sure), over the first n events
    of each of `windows` and over the whole replay (`all`)."""
    common = set.intersection(*(set(r) for r in recs.values()))
    out: dict[str, Any] = {}
    for window, events in [(name, tail[:n]) for name, n in windows.items()] + [("all", tail)]:
        figures = {arm: prequential(events, r, k=k, only=common) for arm, r in recs.items()}
        out[window] = {
            "judged": int(next(iter(figures.values()))["judged"]),
            **{
                arm: {f"hr@{k}": round(f[f"hr@{k}"], 4), f"ndcg@{k}": round(f[f"ndcg@{k}"], 4)}
                for arm, f in figures.items()
            },
        }
    return out


def _text(r: dict[str, Any]) -> str:
    first = r["first_events"]
    lines = [
        f"coldstart experiment on {r['source']}: bootstrap on the first era "
        f"({r['bootstrap_events']:,} events, {r['bootstrap_items']} items), then only the "
        f"second era's {r['replayed_events']:,} events on {r['replayed_items']} items the "
        f"model never saw; fine-tune every {r['finetune_every_events']:,} events",
        f"  {'arm':10s} {'scorer.trending':15s} {'first fine-tune':>15s}  "
        f"{'HR@10 first':>11s} {'NDCG@10 first':>13s}  {'HR@10 all':>9s} "
        f"{'NDCG@10 all':>11s}  {'promoted/rejected':>17s}",
    ]
    for arm in ARMS:
        a = r["arms"].get(arm)
        if not a:
            continue
        first_ft = (
            f"{(a['first_after_events'] or r['finetune_every_events']):,}" if a["finetune"] else "-"
        )
        lines.append(
            f"  {arm:10s} {a['scorer_trending']:15s} {first_ft:>15s}  "
            f"{a['first']['hr@10']:11.4f} {a['first']['ndcg@10']:13.4f}  "
            f"{a['hr@10']:9.4f} {a['ndcg@10']:11.4f}  "
            f"{a['promotions']:>8d}/{a['rejections']:<8d}"
        )
    same = r.get("same_events") or {}
    before = (r.get("windows") or {}).get("before_first_finetune", 0)
    for window, label in (
        ("before_first_finetune", f"first {before:,}, before any fine-tune"),
        ("first", f"first {first:,}"),
        ("all", "whole replay"),
    ):
        w = same.get(window)
        if w:
            figures = ", ".join(f"{arm} {w[arm]['ndcg@10']:.4f}" for arm in ARMS if arm in w)
            lines.append(f"  same events, {label} ({w['judged']:,} judged): NDCG@10 {figures}")
    lines.append(f"  {r['seconds']:.0f}s")
    return "\n".join(lines)
