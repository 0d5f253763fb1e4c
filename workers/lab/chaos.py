"""`streamrec chaos`: fault scenarios against the real worker processes, each checked against a
clean reference, one JSON object per scenario.

Every scenario gets its own embedded broker on a free port and its own data dir (a copy of one
small published model). A replay thread produces synthetic events at a fixed rate to 4 partitions
while the scenario injects faults (SIGKILL/SIGTERM/SIGSTOP of worker processes, SIGKILL at named
points of the loop via STREAMREC_FAULT_POINT, corrupted snapshots, a paused broker). A collector
reads every output topic. The reference folds the same events through `pipeline.state.fold` and
encodes each user's final history with the same model in-process: per-user history, vector (within
1e-5) and last applied event id must match; lost / applied-twice events are the multiset
difference of the histories. Long runs live behind this command, not in the test suite.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.broker import EmbeddedBroker, free_port
from pipeline.config import Config
from pipeline.files import private_dirs
from pipeline.kafka import describe_group, ensure_topics
from workers.lab.bench.load import percentiles
from workers.lab.chaos_finetune import SCENARIO as KILL_FINETUNE
from workers.lab.chaos_finetune import run_kill_finetune
from workers.lab.chaos_harness import (
    PROFILES,
    Collector,
    Context,
    Profile,
    Replay,
    Worker,
    config_for,
    output_of,
    prepare_model,
)
from workers.lab.chaos_scenarios import SCENARIOS, Scenario
from workers.lab.chaos_verdict import (
    compare,
    duplicate_recommendations,
    recommendations_answer_last_events,
    recovery_times,
    reference,
    startup_timelines,
)

__all__ = ["run", "run_scenario", "SCENARIOS", "KILL_FINETUNE", "PROFILES", "Profile"]

log = logging.getLogger(__name__)


@contextmanager
def _cluster(
    root: Path, models: Path, worker_names: tuple[str, ...], **updater: Any
) -> Iterator[tuple[Config, list[EmbeddedBroker], dict[str, Worker]]]:
    port = free_port()
    config = config_for(root, port, models, **updater)
    brokers = [EmbeddedBroker(config.broker, log_path=root / "tansu.log").start()]
    workers = {n: Worker(n, config, root / f"{n}.log") for n in worker_names}
    try:
        ensure_topics(config.kafka, config.bootstrap_servers, config.topics)
        yield config, brokers, workers
    finally:
        for w in workers.values():
            w.stop()
        for broker in brokers:
            if broker.pid is not None and broker.running():  # it may be paused (broker-stall)
                os.killpg(os.getpgid(broker.pid), signal.SIGCONT)
            broker.stop(grace_s=1.0)


def run_scenario(
    name: str, profile: Profile, root: Path, models: Path, seed: int
) -> dict[str, Any]:
    spec = SCENARIOS[name]
    started = time.time()
    rng = random.Random(seed)
    with _cluster(root / name, models, spec.workers, **spec.updater) as (config, brokers, workers):
        collector = Collector(config).start()
        replay = Replay(config, profile, seed, collector.freshness, spec.bad_fraction)
        ctx = Context(name, profile, config, root / name, workers, collector, replay, brokers, rng)
        try:
            replay.start()
            if spec.start_workers:
                for w in workers.values():
                    w.start()
                first = ctx.wait_output(spec.workers[-1], started, 180)
                ctx.notes["first_output_s"] = None if first is None else round(first, 2)
                _drop_warm_up(ctx)
            spec.schedule(ctx)
            replay.stop.set()
            replay.join(profile.min_duration_s + 120)
            settle = _settle(ctx, spec)
            result = _verdict(ctx, spec, settle)
        finally:
            replay.stop.set()
            collector.close()
    result["wall_s"] = round(time.time() - started, 1)
    return result


def _drop_warm_up(ctx: Context, timeout_s: float = 30.0) -> None:
    """Latency counts from the moment the workers answer: drop what queued during start-up."""
    deadline = time.monotonic() + timeout_s
    while ctx.collector.freshness.unanswered() > 50 and time.monotonic() < deadline:
        time.sleep(0.1)
    with ctx.collector.lock:
        ctx.collector.freshness.clear()


def _done(ctx: Context, ref_last: dict[str, str], answers: bool) -> bool:
    c = ctx.collector
    with c.lock:
        if any(last not in c.final.get(u, {}) for u, last in ref_last.items()):
            return False
        if any(c.vectors[u].get("trigger_event_id") != last for u, last in ref_last.items()):
            return False
        if answers and any(
            (c.last_rec.get(u) or {}).get("trigger_event_id") != last
            for u, last in ref_last.items()
        ):
            return False
    return True


def _settle(ctx: Context, spec: Scenario) -> dict[str, Any]:
    """Wait until every user's last event shows in the outputs: the lag is back to zero."""
    last: dict[str, str] = {}
    for event_id, user, _item, _ts in ctx.replay.events:
        last[user] = event_id
    deadline = time.monotonic() + ctx.profile.settle_timeout_s
    done = False
    while time.monotonic() < deadline:
        if _done(ctx, last, spec.answers):
            done = True
            break
        time.sleep(0.1)
    now = time.time()
    end = ctx.replay.finished_at or now
    if not done:
        ctx.notes["stall"] = _stall_diagnostics(ctx, spec)
    return {
        "lag_zero": done,
        "lag_zero_after_replay_end_s": round(now - end, 2) if done else None,
        "lag_zero_after_last_fault_s": round(now - max(ctx.last_fault_at, end), 2)
        if done
        else None,
    }


def _stall_diagnostics(ctx: Context, spec: Scenario) -> dict[str, Any]:
    """The lag did not come back: what the broker thinks of the groups, and every live worker's
    thread stacks (SIGUSR1, see workers/runtime.py) in its log, for a post-mortem (--keep)."""
    cfg = ctx.config
    groups = {cfg.updater.group_id} | ({cfg.scorer.group_id} if "scorer" in spec.workers else set())
    out: dict[str, Any] = {
        "groups": {g: describe_group(cfg.kafka, cfg.bootstrap_servers, g) for g in sorted(groups)}
    }
    dumped = []
    for name, worker in ctx.workers.items():
        if worker.proc is not None and worker.proc.poll() is None:
            worker.signal(signal.SIGUSR1)
            dumped.append(name)
    time.sleep(1.0)
    out["stacks_dumped_in_logs_of"] = dumped
    with ctx.collector.lock:
        last = {k: v[-1] for k, v in ctx.collector.arrivals.items() if v}
        out["events_unanswered"] = ctx.collector.freshness.unanswered()
    out["last_output_s_ago"] = {k: round(time.time() - t, 1) for k, t in last.items()}
    return out


def _verdict(ctx: Context, spec: Scenario, settle: dict[str, Any]) -> dict[str, Any]:
    cfg = ctx.config
    ref = reference(
        ctx.replay.events,
        cfg.paths.models,
        cfg.updater.history_length,
        window_slide=cfg.updater.window_slide,
    )
    state = compare(ref, ctx.collector)
    result: dict[str, Any] = {
        "scenario": ctx.name,
        "profile": _profile_name(ctx.profile),
        "events": len(ctx.replay.events),
        "rate": ctx.profile.rate,
        "faults_injected": len(ctx.faults),
        **state,
        **settle,
    }
    if spec.answers:
        result.update(duplicate_recommendations(ctx.collector))
        result.update(recommendations_answer_last_events(ref, ctx.collector))
    with ctx.collector.lock:
        result["vectors_emitted_again"] = sum(
            n - 1 for n in ctx.collector.vector_counts.values() if n > 1
        )
        arrivals = {k: list(v) for k, v in ctx.collector.arrivals.items()}
    for name, worker in ctx.workers.items():
        if worker.restarts:
            result[f"recovery_{name}"] = recovery_times(worker.restarts, arrivals[output_of(name)])
            # Where a restart's time went: seconds since the new process started, per step.
            result[f"restart_timeline_{name}"] = startup_timelines(
                worker.log_text(), min(worker.restarts)
            )
    result.update(ctx.notes)
    result["good_latency_ms"] = {
        k: round(v, 1) if isinstance(v, float) else v
        for k, v in percentiles(ctx.collector.freshness.latencies_ms).items()
    }
    if ctx.replay.error is not None:
        result["replay_error"] = repr(ctx.replay.error)
    result["faults"] = ctx.faults
    checks = spec.checks(result, ctx)
    result["checks"] = checks
    result["pass"] = all(checks.values())
    return result


def _profile_name(profile: Profile) -> str:
    return next((k for k, v in PROFILES.items() if v == profile), "custom")


def _compare_with_clean(result: dict[str, Any], results: list[dict[str, Any]]) -> None:
    """bad-input after clean in the same run: good-event p99 within +20% of the clean p99."""
    clean = next((r for r in results if r.get("scenario") == "clean"), None)
    if result.get("scenario") != "bad-input" or clean is None or "checks" not in result:
        return
    base = clean["good_latency_ms"].get("p99_ms")
    mine = result["good_latency_ms"].get("p99_ms")
    if base and mine:
        result["p99_vs_clean"] = round(mine / base, 3)
        result["checks"]["p99_within_20pct_of_clean"] = mine <= base * 1.2
        result["pass"] = all(result["checks"].values())


def run(
    config: Config,
    *,
    scenarios: list[str],
    profile: str | Profile = "short",
    seed: int = 1,
    rate: float | None = None,
    keep: bool = False,
    emit: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run `scenarios` in order; returns (and passes to `emit` as they finish) their results."""
    chosen = PROFILES[profile] if isinstance(profile, str) else profile
    if rate:
        chosen = dataclasses.replace(chosen, rate=rate)
    base = Path(config.paths.root) / "chaos"
    private_dirs(base)
    root = Path(tempfile.mkdtemp(prefix="run-", dir=base))
    models = prepare_model(base)  # cached across runs
    results = []
    try:
        for k, name in enumerate(scenarios):
            log.info("chaos: %s (%s profile)", name, _profile_name(chosen))
            try:
                if name == KILL_FINETUNE:  # no broker: the registry on disk is the subject
                    result = run_kill_finetune(
                        models, root, seed=seed + k, kills=20 if chosen.kills >= 8 else 4
                    )
                else:
                    result = run_scenario(name, chosen, root, models, seed + k)
            except Exception as exc:
                log.exception("chaos: scenario %s failed to run", name)
                result = {"scenario": name, "pass": False, "error": repr(exc)}
            results.append(result)
            _compare_with_clean(result, results)
            if emit is not None:
                emit(result)
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    return results
