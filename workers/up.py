"""`streamrec up`: the broker (unless a cluster is configured) plus every worker as child
processes, restarted if they die, all stopped together on Ctrl-C/SIGTERM (gorse's all-in-one).

`Supervisor` is also what the demo uses to run the workers.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence

from pipeline.broker import EmbeddedBroker
from pipeline.config import Config, to_env
from pipeline.datasets import Dataset
from pipeline.kafka import ensure_topics
from pipeline.metrics import SupervisorMetrics, serve
from pipeline.registry import ModelRegistry

__all__ = ["Supervisor", "run", "serving_workers", "workers_for"]

log = logging.getLogger(__name__)

_STOP_GRACE_S = 10.0


class Supervisor:
    """Starts `streamrec <worker>` children with this process's config; restarts crashed ones.

    A child that keeps dying is restarted after a delay that doubles with each consecutive
    failure (restart_delay_s up to max_restart_delay_s), and from the third on it is logged as
    a crash loop; a child that stayed up for `stable_s` starts counting afresh.
    """

    def __init__(
        self,
        config: Config,
        workers: Sequence[str],
        restart_delay_s: float = 1.0,
        log_level: str = "INFO",
        max_restart_delay_s: float = 60.0,
        stable_s: float = 60.0,
        metrics: SupervisorMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._workers = list(workers)
        self._restart_delay_s = restart_delay_s
        self._max_restart_delay_s = max_restart_delay_s
        self._stable_s = stable_s
        self._log_level = log_level
        self._metrics = metrics
        self._clock = clock
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.restarts = 0
        self.failures: dict[str, int] = {}  # consecutive failed runs per child
        self._started_at: dict[str, float] = {}
        self._restart_at: dict[str, float] = {}  # exited children waiting for their restart

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
        self._started_at[name] = self._clock()
        if self._metrics is not None:
            self._metrics.running.labels(worker=name).set(1)
            self._metrics.restarts.labels(worker=name)  # at 0 until the first restart
        return subprocess.Popen(cmd, env=env)

    def start(self) -> None:
        seen: dict[str, int] = {}
        for worker in self._workers:
            n = seen.get(worker, 0)
            seen[worker] = n + 1
            name = worker if n == 0 else f"{worker}-{n}"
            self.children[name] = self._spawn(name)

    def restart_delay(self, failures: int) -> float:
        """Seconds before the restart that follows `failures` consecutive failed runs."""
        return min(self._max_restart_delay_s, self._restart_delay_s * 2 ** max(0, failures - 1))

    def check(self) -> None:
        """Notice children that exited and restart those whose back-off has passed. Never
        blocks: the other children are watched while one waits."""
        now = self._clock()
        for name, proc in list(self.children.items()):
            if name in self._restart_at:
                if now >= self._restart_at[name]:
                    del self._restart_at[name]
                    self.children[name] = self._spawn(name)
                    self.restarts += 1
                    if self._metrics is not None:
                        self._metrics.restarts.labels(worker=name).inc()
                continue
            code = proc.poll()
            if code is None:
                continue
            if now - self._started_at.get(name, now) >= self._stable_s:
                self.failures[name] = 0  # it had been running fine: not part of a loop
            self.failures[name] = self.failures.get(name, 0) + 1
            delay = self.restart_delay(self.failures[name])
            self._restart_at[name] = now + delay
            if self._metrics is not None:
                self._metrics.running.labels(worker=name).set(0)
            if self.failures[name] >= 3:
                log.error(
                    "%s is crash-looping: it exited %d times in a row (last exit code %s); "
                    "restarting it in %.0fs. Its log above says why; a record that killed "
                    "it twice is quarantined to the DLQ on its next start.",
                    name,
                    self.failures[name],
                    code,
                    delay,
                )
            else:
                log.warning("%s exited with code %s; restarting in %.0fs", name, code, delay)

    def stop(self) -> None:
        self._restart_at.clear()
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

    def __enter__(self) -> Supervisor:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


NO_MODEL_HELP = (
    "no model in %s yet, and none is trained on someone else's data: the workers start without "
    "one (the updater keeps folding events into user state, the scorer and fine-tune worker wait "
    "for a model) and swap to the first one published. Train it on your own data:\n"
    "  streamrec bootstrap --items items.jsonl --events events.jsonl --announce   # your files\n"
    "  streamrec bootstrap --from-topics          # what the items and events topics hold now\n"
    "(same --paths-data-dir and broker settings as this command; `streamrec up "
    "--bootstrap-dataset ml-100k` trains on MovieLens instead)"
)


def ensure_model(
    config: Config, max_train_seconds: float | None = None, *, dataset: Dataset | str | None = None
) -> bool:
    """When the registry has no model: bootstrap one from `dataset` (a Dataset, or a built-in
    name: ml-100k, synthetic), or with none given log how to bootstrap from the user's own data
    and train nothing. Returns whether the registry has a model afterwards."""
    if ModelRegistry(config.paths.models).current_version() is not None:
        return True
    if dataset is None:
        log.warning(NO_MODEL_HELP, config.paths.models)
        return False
    from workers.bootstrap import run as bootstrap

    if isinstance(dataset, str):
        config = config.replace(training=dataclasses.replace(config.training, dataset=dataset))
        log.info("no model in %s yet: bootstrapping one from %s", config.paths.models, dataset)
        bootstrap(config, max_train_seconds=max_train_seconds)
    else:
        log.info("no model in %s yet: bootstrapping one from %s", config.paths.models, dataset.name)
        bootstrap(config, max_train_seconds=max_train_seconds, dataset=dataset)
    return True


def serving_workers(config: Config) -> tuple[str, ...]:
    """The workers that turn events into recommendations: the updater alone when it scores
    (updater.score: a scorer would answer every event a second time), else updater + scorer."""
    return ("updater",) if config.updater.score else ("updater", "scorer")


def workers_for(config: Config) -> tuple[str, ...]:
    """The workers `up` runs: the serving ones, and the fine-tune worker unless disabled."""
    return serving_workers(config) + (("finetune",) if config.finetune.enabled else ())


def run(config: Config, *, stop: threading.Event, bootstrap_dataset: str | None = None) -> int:
    """The broker, a bootstrap only when `bootstrap_dataset` names a built-in dataset and the
    registry is empty, and the workers (with or without a model)."""
    broker = EmbeddedBroker(config.broker) if config.kafka.embedded else None
    server = None
    try:
        if broker is not None:
            broker.start()
        ensure_topics(config.kafka, config.bootstrap_servers, config.topics)
        ensure_model(config, dataset=bootstrap_dataset)
        workers = workers_for(config)
        metrics = SupervisorMetrics()
        if config.metrics.supervisor_port:
            server = serve(metrics, config.metrics.host, config.metrics.supervisor_port)
        with Supervisor(config, workers=workers, metrics=metrics) as supervisor:
            log.info(
                "streamrec up: broker %s, workers %s; metrics on %s ports %d/%d/%d, "
                "supervisor %d; Ctrl-C stops",
                config.bootstrap_servers,
                ", ".join(workers),
                config.metrics.host,
                config.updater.metrics_port,
                config.scorer.metrics_port,
                config.finetune.metrics_port,
                config.metrics.supervisor_port,
            )
            while not stop.wait(1.0):
                supervisor.check()
    finally:
        if server is not None:
            server.shutdown()
        if broker is not None:
            broker.stop()
    return 0
