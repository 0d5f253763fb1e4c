"""The fault schedules of `streamrec chaos` and the checks each scenario must pass (issue 7's
numbering in `Scenario.issue_number`). A schedule runs while the replay produces; it injects
faults through the `Context` and records them; the checks read the verdict's figures.

Size: one short schedule function and one check list per named scenario, side by side.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.broker import EmbeddedBroker
from pipeline.kafka import ensure_topics
from workers.lab.chaos_harness import Context
from workers.lab.chaos_verdict import base_checks
from workers.runtime import FAULT_POINTS

__all__ = ["Scenario", "SCENARIOS"]


# -- the fault schedules ---------------------------------------------------------------------------


def _kill_loop(ctx: Context, worker: str, sig: int) -> None:
    """Every 5-15 s (after the worker has recovered), `sig` it; restart 1 s after it exited."""
    w = ctx.workers[worker]
    for _ in range(ctx.profile.kills):
        ctx.pause()
        sent = time.time()
        w.signal(sig)
        code = w.wait(30)
        exit_s = time.time() - sent
        if code is None:  # a SIGTERM that did not drain in time
            w.signal(signal.SIGKILL)
            code = w.wait(10)
        ctx.record(signal.Signals(sig).name, worker=worker, exit_code=code, exit_s=round(exit_s, 2))
        time.sleep(1.0)
        restarted = time.time()
        w.start(restart=True)
        ctx.wait_output(worker, restarted, 120)


def _schedule_kill_updater(ctx: Context) -> None:
    _kill_loop(ctx, "updater", signal.SIGKILL)


def _schedule_kill_scorer(ctx: Context) -> None:
    _kill_loop(ctx, "scorer", signal.SIGKILL)


def _schedule_sigterm(ctx: Context) -> None:
    for k in range(ctx.profile.kills):
        _kill_loop(
            dataclasses.replace(ctx, profile=dataclasses.replace(ctx.profile, kills=1)),
            ("updater", "scorer")[k % 2],
            signal.SIGTERM,
        )
    ctx.last_fault_at = max(f["at_s"] for f in ctx.faults) if ctx.faults else 0.0


def _schedule_fault_points(ctx: Context) -> None:
    """SIGKILL at each named point `repeats` times (the n-th time the point is reached)."""
    w = ctx.workers["updater"]
    for point in FAULT_POINTS:
        for _ in range(ctx.profile.repeats):
            nth = ctx.rng.randint(2, 6)
            w.start(fault=f"{point}:{nth}", restart=True)
            code = w.wait(120)
            ctx.record(
                "fault_point", point=point, nth=nth, exit_code=code, reached=code == -signal.SIGKILL
            )
            if code is None:
                w.stop()
            time.sleep(1.0)
    w.start(restart=True)


def _corrupt(path: Path, rng: random.Random) -> bool:
    data = bytearray(path.read_bytes())
    if len(data) < 16:
        return False
    if rng.random() < 0.5:
        data = data[: len(data) // 2]  # truncated
    else:
        at = rng.randrange(12, len(data))
        data[at] ^= 0xFF  # one flipped byte
    path.write_bytes(bytes(data))
    return True


def _schedule_corrupt_snapshot(ctx: Context) -> None:
    """SIGKILL, then truncate or flip a byte of every partition's newest snapshot; restart."""
    w = ctx.workers["updater"]
    state = Path(ctx.config.paths.state) / "updater"
    for _ in range(ctx.profile.repeats):
        ctx.pause()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not list(state.glob("*/snapshot.prev")):
            time.sleep(0.2)
        w.signal(signal.SIGKILL)
        w.wait(30)
        corrupted = sum(_corrupt(p, ctx.rng) for p in state.glob("*/snapshot"))
        ctx.record("corrupt_snapshot", snapshots=corrupted)
        time.sleep(1.0)
        restarted = time.time()
        w.start(restart=True)
        ctx.wait_output("updater", restarted, 120)
    ctx.notes["corrupt_snapshot_warnings"] = w.log_text().count("corrupt snapshot")


def proc_state(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "?"


def _schedule_pause_updater(ctx: Context) -> None:
    """Two updaters; one SIGSTOPs itself between applying a batch and persisting it, stays
    stopped past its session timeout while the other takes its partitions, then gets SIGCONT:
    the store's ownership epoch must refuse its stale write (and so its commit)."""
    a, b = ctx.workers["updater"], ctx.workers["updater2"]
    b.start()
    owners = Path(ctx.config.paths.state) / "updater"
    for k in range(max(1, ctx.profile.kills // 2)):
        if k:
            a.stop()
        ctx.pause()
        a.start(fault=f"after_state_update:{ctx.rng.randint(3, 8)}:stop")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc_state(a.proc.pid) != "T":
            time.sleep(0.1)
        if proc_state(a.proc.pid) != "T":
            ctx.record("SIGSTOP", worker="updater", reached=False)
            continue
        stopped_at = time.time()
        deadline = time.monotonic() + 60  # until the other instance owns every partition
        while time.monotonic() < deadline and not all(
            (p / "owner").stat().st_mtime > stopped_at for p in owners.glob("*")
        ):
            time.sleep(0.2)
        paused_s = time.time() - stopped_at
        a.signal(signal.SIGCONT)
        ctx.record("SIGSTOP", worker="updater", reached=True, paused_s=round(paused_s, 1))
        ctx.wait_output("updater", time.time(), 60)
    time.sleep(3.0)  # let the resumed instance reach its checkpoint
    ctx.notes["ownership_lost_warnings"] = a.log_text().count("lost ownership")


def log_times(text: str, needle: str) -> list[float]:
    """Wall-clock times of the log lines containing `needle` (the CLI's asctime format)."""
    import datetime

    out = []
    for line in text.splitlines():
        if needle in line:
            try:
                stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
            except ValueError:
                continue
            out.append(stamp.timestamp())
    return out


def _schedule_broker_loss(ctx: Context) -> None:
    """SIGKILL the broker once the updater has caught up, restart it empty on the same port."""
    w = ctx.workers["updater"]
    detect = []
    for _ in range(max(1, ctx.profile.kills // 4)):
        ctx.pause()
        ctx.replay.hold.set()
        deadline = time.monotonic() + 60
        while ctx.collector.freshness.unanswered() and time.monotonic() < deadline:
            time.sleep(0.1)
        ctx.broker.kill()
        killed = time.time()
        fresh = EmbeddedBroker(
            ctx.config.broker, log_path=ctx.root / f"tansu{len(ctx.brokers)}.log"
        )
        ctx.brokers.append(fresh.start())
        ensure_topics(ctx.config.kafka, ctx.config.bootstrap_servers, ctx.config.topics)
        ctx.record("broker_loss", restart_s=round(time.time() - killed, 2))
        restarted = time.time()
        w.restarts.append(restarted)  # recovery: first output after the broker came back
        ctx.replay.hold.clear()
        ctx.wait_output("updater", restarted, 120)
        seen = [t - restarted for t in log_times(w.log_text(), "restarted (") if t >= killed]
        detect.append(round(min(seen), 2) if seen else None)
    ctx.notes["reset_detected_after_s"] = detect
    ctx.notes["updater_alive"] = w.proc is not None and w.proc.poll() is None


def _schedule_rebalance_storm(ctx: Context) -> None:
    """2-4 updaters (once 5, more than partitions), one added or removed every 10 s."""
    pool = [ctx.workers[n] for n in ("updater", "updater2", "updater3", "updater4", "updater5")]
    running = pool[:2]
    for w in running:
        w.start()
    changes = max(3, ctx.profile.kills * 4)
    exits = []
    for k in range(changes):
        time.sleep(10.0)
        idle = [w for w in pool if w not in running]
        grow = (
            len(running) < 2
            or (len(running) < 4 and ctx.rng.random() < 0.5)
            or (k == changes // 2 and len(running) < 5)
        )
        if grow and idle:
            w = idle[0]
            w.start()
            running.append(w)
            ctx.record("add", worker=w.name, instances=len(running))
            continue
        w = running.pop(ctx.rng.randrange(len(running)))
        sig = signal.SIGTERM if k % 2 else signal.SIGKILL
        sent = time.time()
        w.signal(sig)
        code = w.wait(30)
        exits.append({"sig": sig.name, "exit_code": code, "exit_s": round(time.time() - sent, 2)})
        ctx.record("remove", worker=w.name, instances=len(running), signal=sig.name, exit_code=code)
    ctx.notes["removal_exits"] = exits


def _schedule_stall(ctx: Context) -> None:
    """Pause the broker (SIGSTOP) for 30 s (short: 10 s), as a network stall would."""
    stall_s = 30.0 if ctx.profile.kills >= 8 else 10.0
    pid = ctx.broker.pid
    assert pid is not None
    for _ in range(max(1, ctx.profile.kills // 4)):
        ctx.pause()
        os.killpg(os.getpgid(pid), signal.SIGSTOP)
        time.sleep(stall_s)
        os.killpg(os.getpgid(pid), signal.SIGCONT)
        ctx.record("broker_stall", seconds=stall_s)
        ctx.workers["updater"].restarts.append(time.time())
        ctx.wait_output("updater", time.time(), 90)
    for name, w in ctx.workers.items():
        ctx.notes[f"{name}_alive_after_stall"] = w.proc is not None and w.proc.poll() is None


def _schedule_bad_input(ctx: Context) -> None:
    """No faults: the replay mixes bad records in; sample the updater's memory meanwhile."""
    w = ctx.workers["updater"]
    samples = []
    deadline = time.monotonic() + ctx.profile.min_duration_s
    while time.monotonic() < deadline:
        samples.append(rss_mb(w.proc.pid if w.proc else 0))
        time.sleep(1.0)
    ctx.notes["updater_rss_mb"] = {
        "first": samples[0] if samples else None,
        "max": max(samples) if samples else None,
        "last": samples[-1] if samples else None,
    }


def _schedule_none(ctx: Context) -> None:
    time.sleep(ctx.profile.min_duration_s)


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return 0.0


# -- checks per scenario ---------------------------------------------------------------------------


def _checks_kill_updater(r: dict[str, Any], ctx: Context) -> dict[str, bool]:
    rec = r.get("recovery_updater", {})
    c = base_checks(r)
    c["all_restarts_recovered"] = rec.get("recovered") == rec.get("restarts")
    c["recovery_p95_within_10s"] = rec.get("p95_s", 1e9) <= 10
    c["lag_zero_within_30s"] = (r["lag_zero_after_replay_end_s"] or 1e9) <= 30
    return c


def _checks_kill_scorer(r: dict[str, Any], ctx: Context) -> dict[str, bool]:
    c = base_checks(r)
    c["last_rec_answers_last_event"] = r["users_last_rec_wrong"] == 0
    c["no_missing_recommendation"] = r["vectors_without_recommendation"] == 0
    c["duplicates_share_rec_id"] = r["duplicates_same_rec_id"]
    return c


def _checks_kill_colocated(r: dict[str, Any], ctx: Context) -> dict[str, bool]:
    """The updater scoring its users (updater.score): its recovery, and the scorer's guarantees
    on the recommendations it now produces itself."""
    return {**_checks_kill_updater(r, ctx), **_checks_kill_scorer(r, ctx)}


def _checks_sigterm(r: dict[str, Any], ctx: Context) -> dict[str, bool]:
    c = _checks_kill_scorer(r, ctx)
    c["exit_0_within_5s"] = all(f["exit_code"] == 0 and f["exit_s"] <= 5 for f in ctx.faults)
    c["no_duplicate_recommendation"] = r["duplicate_recommendations"] == 0
    return c


def _checks_fault_points(r: dict[str, Any], ctx: Context) -> dict[str, bool]:
    c = base_checks(r)
    c["every_point_reached"] = all(f["reached"] for f in ctx.faults)
    return c


def _checks_corrupt(r: dict[str, Any], ctx: Context) -> dict[str, bool]:
    c = base_checks(r)
    c["corruption_detected"] = r.get("corrupt_snapshot_warnings", 0) >= 1
    return c


def _checks_stall(r: dict[str, Any], ctx: Context) -> dict[str, bool]:
    c = base_checks(r)
    c["no_crash"] = all(v for k, v in r.items() if k.endswith("_alive_after_stall"))
    c["lag_zero_within_60s"] = (r["lag_zero_after_last_fault_s"] or 1e9) <= 60
    return c


def _checks_pause(r: dict[str, Any], ctx: Context) -> dict[str, bool]:
    c = base_checks(r)
    c["pause_reached"] = all(f.get("reached") for f in ctx.faults)
    c["stale_writer_refused"] = r.get("ownership_lost_warnings", 0) >= 1
    return c


def _checks_broker_loss(r: dict[str, Any], ctx: Context) -> dict[str, bool]:
    c = base_checks(r)
    detect = r.get("reset_detected_after_s") or [None]
    c["reset_detected_within_10s"] = all(d is not None and d <= 10 for d in detect)
    c["updater_alive"] = bool(r.get("updater_alive"))
    return c


def _checks_storm(r: dict[str, Any], ctx: Context) -> dict[str, bool]:
    c = base_checks(r)
    c["lag_zero_within_60s_of_last_change"] = (r["lag_zero_after_last_fault_s"] or 1e9) <= 60
    c["sigterm_exits_0_within_10s"] = all(
        e["exit_code"] == 0 and e["exit_s"] <= 10
        for e in r.get("removal_exits", [])
        if e["sig"] == "SIGTERM"
    )
    return c


def _checks_bad_input(r: dict[str, Any], ctx: Context) -> dict[str, bool]:
    c = base_checks(r)
    dead = ctx.collector.dead
    positions = [(p, o) for p, o, _ in dead]
    r["bad_records_sent"] = len(ctx.replay.bad_sent)
    r["bad_classes_sent"] = dict(collections.Counter(ctx.replay.bad_sent))
    r["dead_letters"] = len(dead)
    r["dead_letters_distinct_offsets"] = len(set(positions))
    r["dead_letter_reasons"] = dict(collections.Counter(reason for _, _, reason in dead))
    c["every_bad_record_in_dlq_once"] = len(dead) == len(set(positions)) == len(ctx.replay.bad_sent)
    rss = ctx.notes.get("updater_rss_mb") or {}
    c["memory_flat"] = bool(rss.get("first")) and rss["max"] <= rss["first"] * 1.2 + 20
    return c


@dataclasses.dataclass(frozen=True)
class Scenario:
    issue_number: int
    workers: tuple[str, ...]
    schedule: Callable[[Context], None]
    checks: Callable[[dict[str, Any], Context], dict[str, bool]]
    updater: dict[str, Any] = dataclasses.field(default_factory=dict)
    bad_fraction: float = 0.0
    start_workers: bool = True  # False: the schedule starts them (with faults armed)

    @property
    def answers(self) -> bool:
        """Whether the run produces recommendations: a scorer, or the updater scoring."""
        return "scorer" in self.workers or bool(self.updater.get("score"))


SCENARIOS: dict[str, Scenario] = {
    "kill-updater": Scenario(1, ("updater",), _schedule_kill_updater, _checks_kill_updater),
    "kill-scorer": Scenario(2, ("updater", "scorer"), _schedule_kill_scorer, _checks_kill_scorer),
    "kill-colocated": Scenario(
        1, ("updater",), _schedule_kill_updater, _checks_kill_colocated, updater={"score": True}
    ),
    "sigterm": Scenario(5, ("updater", "scorer"), _schedule_sigterm, _checks_sigterm),
    "fault-points": Scenario(
        3,
        ("updater",),
        _schedule_fault_points,
        _checks_fault_points,
        updater={"snapshot_every_bytes": 8 * 1024},
        start_workers=False,
    ),
    "corrupt-snapshot": Scenario(
        3,
        ("updater",),
        _schedule_corrupt_snapshot,
        _checks_corrupt,
        updater={"snapshot_every_bytes": 8 * 1024},
    ),
    "pause-updater": Scenario(
        7, ("updater", "updater2"), _schedule_pause_updater, _checks_pause, start_workers=False
    ),
    "broker-loss": Scenario(8, ("updater",), _schedule_broker_loss, _checks_broker_loss),
    "rebalance-storm": Scenario(
        6,
        ("updater", "updater2", "updater3", "updater4", "updater5"),
        _schedule_rebalance_storm,
        _checks_storm,
        start_workers=False,
    ),
    "broker-stall": Scenario(9, ("updater",), _schedule_stall, _checks_stall),
    "clean": Scenario(0, ("updater",), _schedule_none, lambda r, ctx: base_checks(r)),
    "bad-input": Scenario(
        0, ("updater",), _schedule_bad_input, _checks_bad_input, bad_fraction=0.1
    ),
}
