"""`streamrec up`: the broker (unless a cluster is configured) plus every worker as child
processes, restarted if they die, all stopped together on Ctrl-C/SIGTERM (gorse's all-in-one).

`Supervisor` is also what the demo uses to run the workers.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from pipeline.broker import EmbeddedBroker
from pipeline.config import Config, to_env
from pipeline.kafka import ensure_topics
from pipeline.registry import ModelRegistry

__all__ = ["Supervisor", "run", "WORKERS", "workers_for"]

log = logging.getLogger(__name__)

WORKERS = ("updater", "scorer", "finetune")
_STOP_GRACE_S = 10.0


class Supervisor:
    """Starts `streamrec <worker>` children with this process's config; restarts crashed ones."""

    def __init__(self, config: Config, workers: Sequence[str] = WORKERS,
                 restart_delay_s: float = 1.0, log_level: str = "INFO") -> None:
        self._config = config
        self._workers = list(workers)
        self._restart_delay_s = restart_delay_s
        self._log_level = log_level
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.restarts = 0

    def _spawn(self, name: str) -> subprocess.Popen[bytes]:
        """Start child `name`: a worker kind, or `<kind>-<n>` for its n-th extra instance, which
        gets metrics port + n so instances on one host do not collide."""
        worker, _, nth = name.partition("-")
        env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMREC_")}
        env.update(to_env(self._config))
        port = getattr(getattr(self._config, worker), "metrics_port", 0)
        if nth and port:
            env[f"STREAMREC_{worker.upper()}_METRICS_PORT"] = str(port + int(nth))
        cmd = [sys.executable, "-m", "workers", worker, "--log-level", self._log_level]
        log.info("starting %s", name)
        return subprocess.Popen(cmd, env=env)

    def start(self) -> None:
        seen: dict[str, int] = {}
        for worker in self._workers:
            n = seen.get(worker, 0)
            seen[worker] = n + 1
            name = worker if n == 0 else f"{worker}-{n}"
            self.children[name] = self._spawn(name)

    def check(self) -> None:
        """Restart any child that exited."""
        for worker, proc in list(self.children.items()):
            code = proc.poll()
            if code is not None:
                log.warning("%s exited with code %s; restarting in %.0fs", worker, code,
                            self._restart_delay_s)
                time.sleep(self._restart_delay_s)
                self.children[worker] = self._spawn(worker)
                self.restarts += 1

    def stop(self) -> None:
        for proc in self.children.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + _STOP_GRACE_S
        for worker, proc in self.children.items():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0fs; killing it", worker, _STOP_GRACE_S)
                proc.kill()
                proc.wait()

    def __enter__(self) -> "Supervisor":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def ensure_model(config: Config, max_train_seconds: float | None = None) -> None:
    """Bootstrap a first model when the registry has none, so `up` works out of the box."""
    if ModelRegistry(config.paths.models).current_version() is None:
        from workers.bootstrap import run as bootstrap

        log.info("no model in %s yet: bootstrapping one from %s", config.paths.models,
                 config.training.dataset)
        bootstrap(config, max_train_seconds=max_train_seconds)


def workers_for(config: Config) -> tuple[str, ...]:
    """The workers `up` runs: all of them, less the fine-tune worker when it is disabled."""
    return tuple(w for w in WORKERS if w != "finetune" or config.finetune.enabled)


def run(config: Config, *, stop: threading.Event) -> int:
    broker = EmbeddedBroker(config.broker) if config.kafka.embedded else None
    try:
        if broker is not None:
            broker.start()
        ensure_topics(config.kafka, config.bootstrap_servers, config.topics)
        ensure_model(config)
        workers = workers_for(config)
        with Supervisor(config, workers=workers) as supervisor:
            log.info("streamrec up: broker %s, workers %s; metrics on %s ports %d/%d; Ctrl-C stops",
                     config.bootstrap_servers, ", ".join(workers), config.metrics.host,
                     config.updater.metrics_port, config.scorer.metrics_port)
            while not stop.wait(1.0):
                supervisor.check()
    finally:
        if broker is not None:
            broker.stop()
    return 0
