"""`streamrec experiment prequential`: does continual learning pay? Frozen vs continual, online.

Bootstraps a model on the first part of a dataset, then replays the whole dataset through the
real pipeline (broker, updater, scorer, and for the continual arm the fine-tune worker) twice.
The first part warms user histories and the feedback store up and is not judged; over the
replayed rest, every recommendation an event triggered is judged by that user's next event
(prequential HR@10/NDCG@10). The rest is cut into chunks of `finetune.every_events` events; the
replay pauses at each chunk's end until the fine-tune run finished, and within a chunk it goes
round by round (each user's next event waits for the recommendation of their previous one), so
every event is judged by a recommendation of its own and the figures do not depend on CPU speed.
`--rate R` replays each chunk in time order at R events/s instead.

Size: just over 400 lines: one protocol, its arms, its collector and its report.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import torch

from pipeline.broker import embedded_broker_for
from pipeline.config import Config, PathsConfig
from pipeline.continual import prequential, prequential_rounds
from pipeline.datasets import Dataset, load_movielens_100k, split_by_time, synthetic
from pipeline.files import private_dirs
from pipeline.kafka import KafkaSink, ensure_topics
from pipeline.messages import Event, Item
from pipeline.registry import ModelRegistry
from workers.finetune import SPEC as FINETUNE
from workers.replay import produce_events, produce_items
from workers.scorer import SPEC as SCORER
from workers.tail import recommendations_reader
from workers.updater import SPEC as UPDATER

__all__ = ["run", "drift_scenario", "scenario", "chunk_bounds", "ML100K_REPLAY_FROM"]

log = logging.getLogger(__name__)

_WAIT_S = 600.0


def drift_scenario(
    seed: int = 0, n_users: int = 300, n_items: int = 300, n_events: int = 15_000
) -> Dataset:
    """Two synthetic eras back to back: the same users, but in the second era their favourite
    topics are redrawn and the catalog turned over (new item ids with their own titles and
    popularity). The bootstrap model sees only the first era."""
    first = synthetic(n_users=n_users, n_items=n_items, n_events=n_events, seed=seed, drift_at=None)
    second = synthetic(
        n_users=n_users, n_items=n_items, n_events=n_events, seed=seed + 1, drift_at=None
    )
    offset = first.events[-1].ts - second.events[0].ts + 60_000
    items = first.items + tuple(
        dataclasses.replace(i, item_id=f"n{i.item_id[1:]}", title=f"{i.title} (new season)")
        for i in second.items
    )
    events = first.events + tuple(
        dataclasses.replace(
            e, event_id=f"drift-{e.event_id}", item_id=f"n{e.item_id[1:]}", ts=e.ts + offset
        )
        for e in second.events
    )
    return Dataset(f"synthetic-drift-{seed}", events, items)


ML100K_REPLAY_FROM = 0.5


def scenario(config: Config, name: str, fraction: float | None = None) -> tuple[Dataset, float]:
    """(dataset, bootstrap fraction) of an experiment: ML-100K splits at `fraction` (default
    ML100K_REPLAY_FROM, half and half: the replay must be long enough for a frozen model to
    age; after the serving split of 0.8 only six weeks of the dataset's time are left, docs/
    CONTINUAL.md); the synthetic drift scenario always at its era boundary (0.5)."""
    if name == "ml-100k":
        fraction = ML100K_REPLAY_FROM if fraction is None else fraction
        if not 0.0 < fraction < 1.0:
            raise ValueError(
                f"bootstrap fraction {fraction} is not in (0, 1): nothing would be "
                "replayed or nothing bootstrapped"
            )
        return load_movielens_100k(config.paths.cache), fraction
    if name == "synthetic":
        return drift_scenario(seed=config.training.seed), 0.5
    raise ValueError(f"unknown dataset {name!r} (ml-100k or synthetic)")


class _Collector:
    """Every recommendation of one arm, read from the topic by a group-less reader."""

    def __init__(self, config: Config) -> None:
        self._reader = recommendations_reader(config, "streamrec-exp")
        self.recs: list[dict[str, Any]] = []
        self.by_trigger: dict[str, list[str]] = {}
        self._arrived = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="exp-collector")

    def start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            records = self._reader.poll(100, 5000)
            with self._arrived:
                for record in records:
                    if record.value:
                        rec = orjson.loads(record.value)
                        self.recs.append(rec)
                        if rec.get("trigger_event_id"):
                            self.by_trigger[rec["trigger_event_id"]] = [
                                i["item_id"] for i in rec["items"]
                            ]
                self._arrived.notify_all()

    def wait_for(
        self, triggers: list[str], threads: list[threading.Thread], timeout_s: float = _WAIT_S
    ) -> str | None:
        """Wait until every trigger event id has its recommendation; the first one missing at
        the deadline, or None."""
        deadline = time.monotonic() + timeout_s
        with self._arrived:
            for trigger in triggers:
                while trigger not in self.by_trigger:
                    dead = [t.name for t in threads if not t.is_alive()]
                    if dead:
                        raise RuntimeError(
                            f"experiment: worker thread(s) {dead} died (see the log)"
                        )
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return trigger
                    self._arrived.wait(min(left, 0.5))
        return None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._reader.close()


def _wait(condition: Any, what: str, timeout_s: float = _WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"experiment: timed out waiting for {what}")
        time.sleep(0.05)


def _arm_config(base: Config, arm: str, root: Path, stamp: str, every_events: int) -> Config:
    return base.replace(
        paths=PathsConfig(data_dir=str(root)),
        topics=dataclasses.replace(base.topics, prefix=f"{base.topics.prefix}exp-{stamp}-{arm}."),
        updater=dataclasses.replace(base.updater, metrics_port=0),
        scorer=dataclasses.replace(base.scorer, metrics_port=0),
        finetune=dataclasses.replace(
            base.finetune, metrics_port=0, every_events=every_events, every_seconds=1e9
        ),
    )


def chunk_bounds(n: int, chunk: int | Sequence[int]) -> list[tuple[int, int]]:
    """(start, end) of each replay chunk over `n` events: `chunk` events each, or with a list
    of sizes, those in order and then the last one again until the events run out ([500,
    5000]: 0-500, 500-5500, 5500-10500, ...; the first fine-tune of a deployment comes early)."""
    sizes = [chunk] if isinstance(chunk, int) else list(chunk)
    if not sizes or min(sizes) < 1:
        raise ValueError(f"chunk sizes {sizes} must be >= 1")
    bounds, start = [], 0
    while start < n:
        end = min(n, start + sizes[min(len(bounds), len(sizes) - 1)])
        bounds.append((start, end))
        start = end
    return bounds


def _run_arm(
    config: Config,
    arm: str,
    items: Sequence[Item],
    head: list[Event],
    tail: list[Event],
    chunk: int | Sequence[int],
    rate: float = 0.0,
    *,
    finetune: bool | None = None,
) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """(figures of one arm, its recommended item ids by trigger event id). The fine-tune worker
    runs when `finetune` says so (default: in the arm called continual); the replay waits for
    its run at the end of every chunk but the last (`chunk_bounds`). An empty `head` means no
    warm-up: a new deployment, whose feedback store starts empty."""
    from workers.runtime import build_loop

    started = time.monotonic()
    ensure_topics(config.kafka, config.bootstrap_servers, config.topics)
    stop = threading.Event()
    with_finetune = arm == "continual" if finetune is None else finetune
    specs = [UPDATER, SCORER] + ([FINETUNE] if with_finetune else [])
    built = {spec.name: build_loop(config, spec, stop=stop) for spec in specs}
    finetune_handler: Any = built["finetune"].handler if with_finetune else None
    bounds = chunk_bounds(len(tail), chunk)
    if finetune_handler is not None and head:
        # the warm-up replays what the bootstrap model already learned
        finetune_handler.paused = True
    threads = []
    for name, (loop, *_) in built.items():
        loop.prime(timeout_s=60.0)
        threads.append(threading.Thread(target=loop.run, daemon=True, name=f"exp-{name}"))
    collector = _Collector(config)
    outcomes: list[Any] = []
    try:
        for t in threads:
            t.start()
        collector.start()
        with KafkaSink(config.kafka, config.bootstrap_servers, client_id="streamrec-exp") as sink:
            produce_items(sink, config.topics.items, items)
            time.sleep(1.0)
            if head:
                produce_events(sink, config.topics.events, head, progress=False)
                if collector.wait_for([head[-1].event_id], threads) is not None:
                    raise TimeoutError("experiment: no recommendation for the warm-up's last event")
            ft = finetune_handler
            if ft is not None and head:
                _wait(lambda: ft.feedback_stats()["events"] >= len(head), "feedback warm-up")
                ft.mark_trained()
                ft.paused = False
            warm_s = time.monotonic() - started
            for n, (start, end) in enumerate(bounds):
                _replay_chunk(sink, config.topics.events, tail[start:end], rate, collector, threads)
                log.info(
                    "experiment %s arm: %d of %d replayed events recommended on (%.0fs)",
                    arm,
                    end,
                    len(tail),
                    time.monotonic() - started,
                )
                if ft is not None and n + 1 < len(bounds):
                    _wait_for_run(ft, built, n + 1)
            if ft is not None:
                outcomes = list(ft.outcomes)
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
        collector.close()
        for worker in built.values():
            close = getattr(worker.handler, "close", None)
            if close is not None:
                close()
    return (
        _figures(arm, head, tail, collector, outcomes, bounds, warm_s, time.monotonic() - started),
        collector.by_trigger,
    )


def _replay_chunk(
    sink: KafkaSink,
    topic: str,
    part: list[Event],
    rate: float,
    collector: _Collector,
    threads: list[threading.Thread],
) -> None:
    """rate > 0: in time order at `rate` events/s. rate 0: round by round (each user's next
    event only once the recommendation of their previous one is out), so every event is judged
    by a recommendation of its own, whatever the CPU speed."""
    for group in [part] if rate > 0 else prequential_rounds(part):
        produce_events(sink, topic, group, rate=rate, progress=False)
        awaited = group[-1:] if rate > 0 else group
        missing = collector.wait_for([e.event_id for e in awaited], threads)
        if missing is not None:
            raise TimeoutError(f"experiment: no recommendation for {missing}")


def _wait_for_run(finetune: Any, built: dict[str, Any], runs: int) -> None:
    _wait(lambda: len(finetune.outcomes) >= runs, f"fine-tune run {runs}")
    last = finetune.outcomes[-1]
    if last.outcome == "promoted":
        for name in ("updater", "scorer"):
            models = built[name].models
            _wait(
                lambda m=models: m.version == last.version,
                f"{name} to swap to {last.version}",
                120.0,
            )


def _figures(
    arm: str,
    head: list[Event],
    tail: list[Event],
    collector: _Collector,
    outcomes: list[Any],
    bounds: list[tuple[int, int]],
    warm_s: float,
    total_s: float,
) -> dict[str, Any]:
    seen = {e.item_id for e in head}
    new_items = {e.item_id for e in tail} - seen
    tail_ids = {e.event_id for e in tail}
    served = [
        r
        for r in collector.recs
        if r.get("trigger_event_id") in tail_ids or r.get("trigger") == "model_swap"
    ]
    with_new = sum(any(i["item_id"] in new_items for i in r["items"]) for r in served)
    online = prequential(tail, collector.by_trigger, k=10)
    per_chunk = [
        round(prequential(tail[s:e], collector.by_trigger, k=10)["ndcg@10"], 4) for s, e in bounds
    ]
    sources = Counter(
        (i.get("reason") or {}).get("source", "none") for r in served for i in r["items"]
    )
    runs = [
        {
            "outcome": o.outcome,
            "version": o.version,
            "seconds": round(o.seconds, 1),
            "loss": round(o.loss, 4) if o.loss == o.loss else None,
            "candidate_ndcg@10": round(o.candidate.get("ndcg@10", 0.0), 4),
            "current_ndcg@10": round(o.current.get("ndcg@10", 0.0), 4),
            "holdout_targets": int(o.candidate.get("users", 0)),
        }
        for o in outcomes
    ]
    return {
        "arm": arm,
        "hr@10": round(online["hr@10"], 4),
        "ndcg@10": round(online["ndcg@10"], 4),
        "judged": int(online["judged"]),
        "replayed_events": len(tail),
        "recommendations": len(served),
        "share_with_new_items": round(with_new / max(len(served), 1), 4),
        "new_items": len(new_items),
        "promotions": sum(o.outcome == "promoted" for o in outcomes),
        "rejections": sum(o.outcome == "rejected" for o in outcomes),
        "failed_runs": sum(o.outcome == "failed" for o in outcomes),
        "model_versions": dict(Counter(r["model_version"] for r in served)),
        "ndcg@10_per_chunk": per_chunk,
        "runs": runs,
        "slot_sources": {
            k: round(v / max(sum(sources.values()), 1), 4) for k, v in sorted(sources.items())
        },
        "warmup_seconds": round(warm_s, 1),
        "seconds": round(total_s, 1),
    }


def run(
    config: Config,
    *,
    dataset: str,
    as_json: bool = False,
    runs: int = 10,
    every_events: int = 0,
    bootstrap_models: Path | None = None,
    rate: float = 0.0,
    bootstrap_fraction: float | None = None,
    stop: threading.Event | None = None,
) -> dict[str, Any]:
    """Run both arms on `dataset` and print the comparison; returns it. Fine-tunes every
    `every_events` replayed events (0 = the replayed part split into `runs` chunks)."""
    torch.set_num_threads(1)
    started = time.monotonic()
    data, fraction = scenario(config, dataset, bootstrap_fraction)
    head, tail = split_by_time(data, fraction)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    work = config.paths.root / "experiments" / f"{dataset}-{stamp}"
    boot = config.replace(
        paths=PathsConfig(data_dir=str(work / "bootstrap")),
        training=dataclasses.replace(config.training, bootstrap_fraction=fraction),
    )
    _share_cache(config, work / "bootstrap")
    if bootstrap_models is not None:  # reuse a bootstrap (same dataset and fraction) as is
        shutil.copytree(bootstrap_models, work / "bootstrap" / "models")
        boot_metrics = ModelRegistry(work / "bootstrap" / "models").load().metrics
    else:
        from workers.bootstrap import run as bootstrap

        boot_metrics = bootstrap(boot, progress=False, dataset=data).metrics
    every = every_events or max(100, len(tail.events) // runs)
    if dataset == "ml-100k":  # a rated movie is never rated again: recommending one is pointless
        config = config.replace(scorer=dataclasses.replace(config.scorer, exclude_interacted=True))
    arms: dict[str, Any] = {}
    recs: dict[str, dict[str, list[str]]] = {}
    with embedded_broker_for(config.kafka, config.broker):
        for arm in ("frozen", "continual"):
            if stop is not None and stop.is_set():
                break
            root = work / arm
            _share_cache(config, root)  # first: it makes `root` 0700, copytree would not
            shutil.copytree(work / "bootstrap" / "models", root / "models")
            arm_config = _arm_config(config, arm, root, stamp.replace("-", ""), every)
            arms[arm], recs[arm] = _run_arm(
                arm_config, arm, data.items, list(head.events), list(tail.events), every, rate
            )
    result = _summary(
        dataset, data, head, tail, boot_metrics, every, arms, time.monotonic() - started
    )
    result["bootstrap_fraction"], result["rate"] = fraction, rate
    if len(recs) == 2:
        result["same_events"] = compare_on_same_events(
            list(tail.events), recs["frozen"], recs["continual"]
        )
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() if as_json else _text(result))
    return result


def compare_on_same_events(
    tail: list[Event], frozen: dict[str, list[str]], continual: dict[str, list[str]], k: int = 10
) -> dict[str, Any]:
    """Both arms judged on only the events that both answered with a recommendation of their
    own. Which events collapse into a later one of the same micro-batch depends on timing (and
    training competes for the CPUs), so the arms' full figures judge different events; this one
    compares like with like."""
    common = frozen.keys() & continual.keys()
    a = prequential(tail, frozen, k=k, only=common)
    b = prequential(tail, continual, k=k, only=common)
    key = f"ndcg@{k}"
    return {
        "judged": int(a["judged"]),
        "frozen": {f"hr@{k}": round(a[f"hr@{k}"], 4), key: round(a[key], 4)},
        "continual": {f"hr@{k}": round(b[f"hr@{k}"], 4), key: round(b[key], 4)},
        f"{key}_relative_gain": round(b[key] / a[key] - 1.0, 4) if a[key] else None,
    }


def _share_cache(config: Config, root: Path) -> None:
    """Arms reuse the text-vector and dataset cache instead of re-encoding every title."""
    private_dirs(root)
    private_dirs(config.paths.cache)
    link = root / "cache"
    if not link.exists():
        link.symlink_to(config.paths.cache.resolve(), target_is_directory=True)


def _summary(
    name: str,
    data: Dataset,
    head: Dataset,
    tail: Dataset,
    boot: dict[str, Any],
    every: int,
    arms: dict[str, Any],
    seconds: float,
) -> dict[str, Any]:
    frozen, continual = arms.get("frozen", {}), arms.get("continual", {})
    gain = None
    if frozen.get("ndcg@10") and continual:
        gain = round(continual["ndcg@10"] / frozen["ndcg@10"] - 1.0, 4)
    return {
        "experiment": "prequential",
        "dataset": name,
        "source": data.name,
        "bootstrap_events": len(head.events),
        "replayed_events": len(tail.events),
        "bootstrap_offline": {
            k: round(float(v), 4)
            for k, v in boot.items()
            if k in ("hr@10", "ndcg@10") and v is not None
        },
        "finetune_every_events": every,
        "frozen": frozen,
        "continual": continual,
        "ndcg@10_relative_gain": gain,
        "seconds": round(seconds, 1),
    }


def _text(r: dict[str, Any]) -> str:
    lines = [
        f"prequential experiment on {r['source']}: bootstrap on {r['bootstrap_events']:,} "
        f"events, {r['replayed_events']:,} replayed, fine-tune every "
        f"{r['finetune_every_events']:,} events"
    ]
    for arm in ("frozen", "continual"):
        a = r.get(arm) or {}
        if a:
            lines.append(
                f"  {arm:9s} HR@10 {a['hr@10']:.4f}  NDCG@10 {a['ndcg@10']:.4f}  "
                f"({a['judged']:,} judged)  promotions {a['promotions']}  rejections "
                f"{a['rejections']}  recs with new items {a['share_with_new_items']:.1%}"
            )
    if r.get("ndcg@10_relative_gain") is not None:
        lines.append(f"  continual vs frozen NDCG@10: {r['ndcg@10_relative_gain']:+.1%}")
    same = r.get("same_events") or {}
    if same.get("ndcg@10_relative_gain") is not None:
        lines.append(
            f"  on the {same['judged']:,} events both arms judged: NDCG@10 frozen "
            f"{same['frozen']['ndcg@10']:.4f}, continual "
            f"{same['continual']['ndcg@10']:.4f} "
            f"({same['ndcg@10_relative_gain']:+.1%})"
        )
    lines.append(f"  {r['seconds']:.0f}s")
    return "\n".join(lines)
