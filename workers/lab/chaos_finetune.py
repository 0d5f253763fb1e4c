"""Chaos scenario 4, `kill-finetune`: SIGKILL a process that fine-tunes, saves and publishes model
versions, at random moments, and check after every kill that the registry is sound.

The child (`python -m workers.lab.chaos_finetune REGISTRY SEED`) loops as the fine-tune worker does:
load CURRENT, `continual.fine_tune` on fresh synthetic events, `ModelRegistry.publish` (temp dir,
fsync, rename, CURRENT switched atomically). The parent kills it at a random delay after it
reports ready, so kills land in loading, training, saving and publishing alike. No broker: the
registry on disk is what this scenario is about (the other scenarios cover the Kafka side).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["SCENARIO", "run_kill_finetune"]

SCENARIO = "kill-finetune"


def _child(root: Path, seed: int) -> None:
    """Fine-tune and publish forever (until killed)."""
    import numpy as np
    import torch

    from pipeline.config import TrainingConfig
    from pipeline.continual import fine_tune
    from pipeline.items import text_lookup
    from pipeline.messages import Event
    from pipeline.registry import ModelRegistry

    torch.set_num_threads(1)
    registry = ModelRegistry(root)
    rng = np.random.default_rng(seed)
    print("ready", flush=True)
    round_ = 0
    while True:
        current = registry.load()
        ids = list(current.item_ids)
        events = [
            Event(
                f"k{seed}-{round_}-{i}",
                f"u{rng.integers(0, 30)}",
                ids[int(rng.integers(0, len(ids)))],
                "click",
                1_700_000_000_000 + i,
            )
            for i in range(400)
        ]
        text = current.text_vectors
        candidate = fine_tune(
            current.model,
            ids,
            events,
            new_from=0,
            text_of=text_lookup(ids, text),
            training=TrainingConfig(epochs=1, batch_size=16, device="cpu"),
            replay_ratio=0.0,
            holdout_users=5,
            seed=round_,
        )
        registry.publish(
            candidate.model,
            candidate.model.config,
            candidate.item_ids,
            current.catalog_meta,
            candidate.candidate_metrics,
            current.version,
            len(events),
            text_vectors=text,
        )
        round_ += 1


def _check(root: Path, known_good: set[str], previous: str | None) -> dict[str, Any]:
    """Does CURRENT load and verify, does every version completed since the last kill, does
    the CURRENT before the kill still, and is every version ever complete still there?"""
    from pipeline.registry import ModelRegistry

    registry = ModelRegistry(root)
    out: dict[str, Any] = {
        "current": registry.current_version(),
        "current_loads": True,
        "failures": [],
    }
    try:
        registry.load()
    except Exception as exc:
        out["current_loads"] = False
        out["failures"].append(f"CURRENT {out['current']}: {exc!r}")
    for entry in registry.versions():
        if entry["version"] in known_good and entry["version"] != previous:
            continue  # verified after an earlier kill; nothing rewrites a complete version
        try:
            registry.load(entry["version"])
            known_good.add(entry["version"])
        except Exception as exc:
            out["failures"].append(f"{entry['version']}: {exc!r}")
    missing = known_good - {e["version"] for e in registry.versions()}
    out["failures"] += [f"{v}: vanished" for v in sorted(missing)]
    out["partial_dirs"] = sum(1 for p in root.iterdir() if p.name.startswith(".tmp-"))
    return out


def run_kill_finetune(models: Path, root: Path, *, kills: int, seed: int) -> dict[str, Any]:
    """Kill a publishing fine-tune process `kills` times; returns the scenario's result."""
    import shutil

    registry_root = root / SCENARIO / "models"
    shutil.copytree(models, registry_root)
    rng = random.Random(seed)
    known_good: set[str] = set()
    checks_after: list[dict[str, Any]] = []
    faults: list[dict[str, Any]] = []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.time()
    for k in range(kills):
        child = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "workers.lab.chaos_finetune",
                str(registry_root),
                str(seed * 1000 + k),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        assert child.stdout is not None
        ready = child.stdout.readline().strip() == b"ready"
        delay = rng.uniform(0.05, 3.0)
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        code = child.wait(30)
        child.stdout.close()
        faults.append(
            {
                "fault": "SIGKILL",
                "after_ready_s": round(delay, 2),
                "ready": ready,
                "exit_code": code,
            }
        )
        previous = checks_after[-1]["current"] if checks_after else None
        checks_after.append(_check(registry_root, known_good, previous))
    versions = len(known_good)
    failures = [f for c in checks_after for f in c["failures"]]
    checks = {
        "every_kill_landed": all(f["ready"] and f["exit_code"] == -signal.SIGKILL for f in faults),
        "current_always_loads": all(c["current_loads"] for c in checks_after),
        "no_version_partial_or_lost": not failures,
        "versions_were_published": versions > 1,
    }
    return {
        "scenario": SCENARIO,
        "faults_injected": len(faults),
        "versions_complete": versions,
        "partial_dirs_left": checks_after[-1]["partial_dirs"] if checks_after else 0,
        "current_versions_seen": len({c["current"] for c in checks_after}),
        "failures": failures[:20],
        "faults": faults,
        "checks": checks,
        "pass": all(checks.values()),
        "seconds": round(time.time() - started, 1),
    }


if __name__ == "__main__":
    _child(Path(sys.argv[1]), int(sys.argv[2]))
