"""What every serving worker process does around its handler: one torch thread, metrics server,
topics, registry, text encoder, Kafka clients, the consumer loop, and a clean shutdown.

`run_worker(config, spec)` is the single entry every serving role shares, so the process
lifecycle is written once; what differs between roles is declared in their `SPEC`
(workers/spec.py), and this module imports no role. Signal handlers belong to the CLI; here a
stop Event ends the loop.

Start-up order, for a short restart (issue 7): the group join goes first, before torch,
transformers and the model are imported and loaded (~3-5 s here), because it mostly waits on the
broker (~3 s on Tansu); `KafkaSource.start_join` runs it in a thread meanwhile and rejoins under
the member id of a dead predecessor (`MemberSlot`), so it never waits for that member's session
to expire. Torch and the model modules are therefore imported inside `build_loop`, not at the
top of this module. Each process logs its `start-up timeline` (seconds since the process
started) when its first batch is out; `streamrec chaos` reports it per restart.
"""

from __future__ import annotations

import faulthandler
import gc
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from pipeline.config import Config
from workers.spec import HandlerDeps, WorkerSpec

if TYPE_CHECKING:  # imported in build_loop, after the group join has started
    from pipeline.loop import ConsumerLoop, Handler, Sink, Source, TableSource
    from pipeline.metrics import WorkerMetrics
    from pipeline.versions import ServingModels

__all__ = [
    "run_worker",
    "build_loop",
    "compose_loop",
    "Built",
    "fault_hook",
    "fault_from_env",
    "FAULT_POINTS",
    "CHAOS_ENV",
    "FAULT_ENV",
    "StartupTimeline",
]

log = logging.getLogger(__name__)

# Where `STREAMREC_FAULT_POINT=point[:n[:stop]]` SIGKILLs (or SIGSTOPs) a worker, the n-th time.
FAULT_POINTS = ("after_state_update", "after_produce", "before_commit", "mid_snapshot")
FAULT_ENV = "STREAMREC_FAULT_POINT"
# The second switch: only the chaos harness sets it (to "1"), so a fault point left in a
# production environment (a copied .env, a shell profile) can never kill a worker.
CHAOS_ENV = "STREAMREC_CHAOS"


def fault_from_env(env: Mapping[str, str]) -> Callable[[str], None] | None:
    """The fault hook `env` asks for: armed only when STREAMREC_FAULT_POINT comes with
    STREAMREC_CHAOS=1 (as `streamrec chaos` starts its workers); a fault point without it is
    ignored with a warning. Raises ValueError for a malformed point that is armed."""
    spec = env.get(FAULT_ENV, "")
    if not spec:
        return None
    if env.get(CHAOS_ENV, "") != "1":
        log.warning(
            "%s=%r ignored: fault injection is for `streamrec chaos` only, which also sets %s=1",
            FAULT_ENV,
            spec,
            CHAOS_ENV,
        )
        return None
    hook = fault_hook(spec)
    log.warning(
        "FAULT INJECTION ARMED (%s=%r, %s=1): this process kills or stops itself at "
        "that point; never run it in production",
        FAULT_ENV,
        spec,
        CHAOS_ENV,
    )
    return hook


def fault_hook(spec: str) -> Callable[[str], None] | None:
    """The fault-injection callable for `spec` ("" = none), for `streamrec chaos` only.

    The loop calls it at the first three FAULT_POINTS of every batch, the state store at
    `mid_snapshot`; the n-th call (default 1st) at the named point kills the process with SIGKILL,
    or with `:stop` pauses it with SIGSTOP (once; the harness sends SIGCONT).
    """
    if not spec:
        return None
    point, _, rest = spec.partition(":")
    nth, _, action = rest.partition(":")
    if point not in FAULT_POINTS or not (nth or "1").isdigit() or action not in ("", "stop"):
        raise ValueError(
            f"STREAMREC_FAULT_POINT={spec!r}: expected one of {FAULT_POINTS}[:n[:stop]]"
        )
    sig = signal.SIGSTOP if action == "stop" else signal.SIGKILL
    remaining = [int(nth or 1)]

    def hit(name: str) -> None:
        if name != point:
            return
        remaining[0] -= 1
        if remaining[0] == 0:
            log.warning("fault injection: %s at %s", sig.name, name)
            os.kill(os.getpid(), sig)

    return hit


def _process_age_s() -> float | None:
    """Seconds since this process was created (Linux /proc), None where unknown."""
    try:
        with open("/proc/self/stat") as fh:
            start_ticks = int(fh.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        with open("/proc/uptime") as fh:
            uptime_s = float(fh.read().split()[0])
        return max(0.0, uptime_s - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


class StartupTimeline:
    """When each start-up step of a worker process was done, in seconds since the process
    started, logged as one JSON line (`start-up timeline {...}`) once the first batch is out.

    Steps: `entered` (interpreter, CLI and config), `join_started` (topics checked, group join
    under way), `models_loaded` (torch, transformers, registry, handler), `loop_built`,
    `tables_primed`, `assigned` (the group assigned partitions: the join is done), `restored`
    (state of the assigned partitions restored), `first_batch` (its outputs acknowledged).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        age = _process_age_s()
        self.started_at = time.time() - (age if age is not None else 0.0)
        self.steps: dict[str, float] = {}
        self.source: Any = None  # has `assigned_at` (time.time() of the first assignment)

    def mark(self, step: str) -> None:
        self.steps.setdefault(step, round(time.time() - self.started_at, 3))
        if step == "first_batch":
            assigned = getattr(self.source, "assigned_at", None)
            if assigned is not None:
                self.steps.setdefault("assigned", round(assigned - self.started_at, 3))
            ordered = dict(sorted(self.steps.items(), key=lambda kv: kv[1]))
            log.info("%s start-up timeline %s", self.name, json.dumps(ordered))


def _build_handler(
    config: Config, spec: WorkerSpec, metrics: WorkerMetrics, fault: Callable[[str], None] | None
) -> tuple[Handler, ServingModels]:
    """The worker's handler, with its model loaded: the slow part of a start (torch, transformers,
    safetensors, item vectors), imported here so the group join can start before it."""
    from pipeline.items import TextEncoder
    from pipeline.registry import ModelRegistry
    from pipeline.versions import ServingModels

    encoder = TextEncoder(
        config.model.text_encoder or None,
        config.paths.cache / "text",
        device=spec.encoder_device(config),
    )
    models = ServingModels(
        registry=ModelRegistry(config.paths.models), encoder=encoder, metrics=metrics
    )
    models.start()
    handler = spec.build_handler(config, HandlerDeps(models=models, metrics=metrics, fault=fault))
    return handler, models


def member_dir(config: Config, group_id: str) -> Path:
    """Where a worker's group member ids are kept across restarts (see MemberSlot)."""
    return config.paths.state / "members" / group_id


def compose_loop(
    config: Config,
    spec: WorkerSpec,
    handler: Handler,
    metrics: WorkerMetrics,
    *,
    source_factory: Callable[..., Source],
    sink: Sink,
    table: TableSource,
    **options: Any,
) -> ConsumerLoop:
    """The consumer loop of `spec`'s role over the given I/O (Kafka in `build_loop`, the
    MemoryBus in tests), with the batch, poll, commit and DLQ settings its config declares.
    `options` are ConsumerLoop's own (stop, fault, clock, guard, milestone)."""
    from pipeline.codec import Codec
    from pipeline.loop import ConsumerLoop
    from pipeline.ratelimit import LogLimiter

    section = spec.section(config)
    return ConsumerLoop(
        handler=handler,
        source_factory=source_factory,
        sink=sink,
        table=table,
        codec=Codec(config.validation, worker=spec.name),
        metrics=metrics,
        dlq_topic=config.topics.dlq,
        max_records=section.batch_max_records,
        poll_timeout_ms=section.poll_timeout_ms,
        commit_interval_s=config.kafka.commit_interval_ms / 1000,
        dead_letters=spec.dead_letters,
        liveness_timeout_s=config.metrics.liveness_timeout_s,
        dead_letter_log=LogLimiter(
            config.logging.dead_letter_lines, config.logging.dead_letter_interval_s
        ),
        **options,
    )


class Built(NamedTuple):
    """One worker, composed and not yet running."""

    loop: ConsumerLoop
    handler: Handler
    metrics: WorkerMetrics
    models: ServingModels


def build_loop(
    config: Config,
    spec: WorkerSpec,
    *,
    stop: threading.Event | None = None,
    timeline: StartupTimeline | None = None,
) -> Built:
    """Compose the worker `spec` declares. Does the start-up I/O: checks the topics, starts the
    group join, then loads the model while the join goes on."""
    from pipeline.crashguard import CrashGuard
    from pipeline.kafka import KafkaSink, KafkaSource, RouteCheck, TableReader, ensure_topics

    topics = config.topics
    inputs = list(spec.inputs(topics))
    section = spec.section(config)
    mark = timeline.mark if timeline is not None else (lambda step: None)
    metrics = spec.metrics()
    metrics.watch_topics(inputs)
    fault = fault_from_env(os.environ)
    bootstrap = config.bootstrap_servers
    ensure_topics(config.kafka, bootstrap, topics)
    client_id = f"{config.kafka.client_id}-{spec.name}"
    # Events are keyed by user and their state lives per partition: count those that a producer
    # put on a partition other than murmur2(user id) gives (docs/DESIGN.md, the contract).
    routed = RouteCheck([topics.events], lambda topic, n: metrics.misrouted.labels(topic).inc(n))
    source = KafkaSource(
        spec.consumer(config),
        bootstrap,
        section.group_id,
        inputs,
        client_id=client_id,
        member_dir=member_dir(config, section.group_id),
        route_check=routed if topics.events in inputs else None,
    )
    if timeline is not None:
        timeline.source = source
    try:
        source.start_join()
        mark("join_started")
        handler, models = _build_handler(config, spec, metrics, fault)
        mark("models_loaded")
        guard = CrashGuard(config.paths.state / "crashguard" / section.group_id).open()
        guard.arm_fatal_signals()
        metrics.crashes.inc(guard.state.crashes)
        loop = compose_loop(
            config,
            spec,
            handler,
            metrics,
            source_factory=source.set_hooks,
            sink=KafkaSink(config.kafka, bootstrap, client_id=client_id),
            table=TableReader(
                config.kafka,
                bootstrap,
                [topics.items, topics.model_updates],
                client_id=f"{client_id}-table",
            ),
            stop=stop,
            fault=fault,
            guard=guard,
            milestone=timeline.mark if timeline is not None else None,
        )
    except BaseException:
        source.close()
        raise
    mark("loop_built")
    return Built(loop, handler, metrics, models)


class _StartupAborted(BaseException):
    """A stop signal arrived while the worker was still starting: nothing to drain yet."""


@contextmanager
def _abort_startup_on_stop_signal() -> Iterator[None]:
    """While a worker starts (imports and model load: 5 s, and 30 s on a loaded machine), a
    SIGTERM/SIGINT has nothing to drain, so after the CLI's own handler ran (it sets the stop
    event) the start-up is abandoned at once instead of finished first. Main thread only
    (signal handlers can only be set there); the previous handlers are back on exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def on_stop(signum: int, frame: Any) -> None:
        handler = previous.get(signum)
        if callable(handler):
            handler(signum, frame)
        raise _StartupAborted(signal.Signals(signum).name)

    for sig in previous:
        signal.signal(sig, on_stop)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def lower_cpu_priority(nice: int) -> int:
    """Raise this process's niceness to at least `nice` (never lowers it: that needs
    privileges); returns the niceness in effect."""
    current = os.getpriority(os.PRIO_PROCESS, 0)
    if nice > current:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    return os.getpriority(os.PRIO_PROCESS, 0)


def run_worker(config: Config, spec: WorkerSpec, *, stop: threading.Event | None = None) -> None:
    """Run the worker `spec` declares until `stop` is set; drains the current batch and commits
    on the way out."""
    timeline = StartupTimeline(spec.name)
    timeline.mark("entered")
    if spec.nice is not None:  # before any thread starts: Linux niceness is per thread, inherited
        lower_cpu_priority(spec.nice(config))
    if hasattr(signal, "SIGUSR1"):  # `kill -USR1 <pid>`: every thread's stack to stderr
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    # Millions of small state objects make CPython's default gen-0 threshold (700) trigger
    # collections constantly; measured +20% updater throughput at 50k.
    gc.set_threshold(50_000, 20, 100)
    built: Built | None = None
    server: Any = None
    try:
        with _abort_startup_on_stop_signal():
            built = build_loop(config, spec, stop=stop, timeline=timeline)
            import torch

            torch.set_num_threads(1)  # measured: 5-25x slower kernels with two threads under load
            from pipeline.metrics import serve

            port = spec.section(config).metrics_port
            server = (
                serve(built.metrics, config.metrics.host, port, built.loop.health) if port else None
            )
            if server is not None:
                log.info("%s metrics on http://%s:%d/metrics", spec.name, config.metrics.host, port)
            loop = built.loop
            primed = 0 if loop.stop.is_set() else loop.prime(timeout_s=60.0)
            timeline.mark("tables_primed")
            log.info(
                "%s ready: %d table records read, model %s", spec.name, primed, built.models.version
            )
    except _StartupAborted as exc:
        log.info("%s: %s during start-up; leaving before serving", spec.name, exc)
        if built is not None:
            built.loop.close()  # leaves the group
            _close_handler(built.handler)
        built = None
    try:
        if built is not None:
            built.loop.run()
    finally:
        if built is not None:
            _close_handler(built.handler)
        if server is not None:
            server.shutdown()
        log.info("%s stopped", spec.name)


def _close_handler(handler: Handler) -> None:
    """Handlers that hold files or threads (the updater's state stores) have `close()`."""
    close = getattr(handler, "close", None)
    if close is not None:
        close()
