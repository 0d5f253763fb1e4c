"""What every serving worker process does around its handler: one torch thread, metrics server,
topics, registry, text encoder, Kafka clients, the consumer loop, and a clean shutdown.

`run_worker(config, name)` is the single entry the updater and scorer share, so the process
lifecycle is written once. Signal handlers belong to the CLI; here a stop Event ends the loop.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

import torch

from pipeline.codec import Codec
from pipeline.config import Config
from pipeline.items import TextEncoder
from pipeline.kafka import KafkaSink, KafkaSource, TableReader, ensure_topics
from pipeline.loop import ConsumerLoop
from pipeline.metrics import FinetuneMetrics, WorkerMetrics, serve
from pipeline.registry import ModelRegistry
from pipeline.versions import ServingModels

__all__ = ["run_worker", "build_loop", "fault_hook", "FAULT_POINTS"]

log = logging.getLogger(__name__)

# Where `STREAMREC_FAULT_POINT=point[:n[:stop]]` SIGKILLs (or SIGSTOPs) a worker, the n-th time.
FAULT_POINTS = ("after_state_update", "after_produce", "before_commit", "mid_snapshot")


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
        raise ValueError(f"STREAMREC_FAULT_POINT={spec!r}: expected one of {FAULT_POINTS}"
                         "[:n[:stop]]")
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


def build_loop(config: Config, name: str, *, stop: threading.Event | None = None) -> tuple[ConsumerLoop, Any, WorkerMetrics]:
    """Compose one worker; returns (loop, handler, metrics). Does the start-up I/O."""
    from workers.scorer import ScorerHandler
    from workers.updater import UpdaterHandler

    metrics = FinetuneMetrics() if name == "finetune" else WorkerMetrics(name)
    fault = fault_hook(os.environ.get("STREAMREC_FAULT_POINT", ""))
    bootstrap = config.bootstrap_servers
    topics = config.topics
    ensure_topics(config.kafka, bootstrap, topics)
    section: Any = {"updater": config.updater, "scorer": config.scorer,
                    "finetune": config.finetune}.get(name, config.scorer)
    encoder = TextEncoder(config.model.text_encoder or None, config.paths.cache / "text",
                          device=getattr(section, "device", "cpu"))
    models = ServingModels(registry=ModelRegistry(config.paths.models), encoder=encoder,
                           metrics=metrics)
    models.start()
    handler: Any
    if name == "updater":
        handler = UpdaterHandler(cfg=config.updater, topics=topics,
                                 state_dir=config.paths.state / "updater", models=models,
                                 metrics=metrics, fault=fault)
        inputs = [topics.events, topics.items]
    elif name == "scorer":
        handler = ScorerHandler(cfg=config.scorer, topics=topics, models=models, metrics=metrics)
        inputs = [topics.user_vectors, topics.model_updates]
    elif name == "finetune":
        from workers.finetune import build_handler

        handler = build_handler(config, models=models, metrics=metrics)
        inputs = [topics.events, topics.recommendations]
    else:
        raise ValueError(f"unknown worker {name!r}")
    client_id = f"{config.kafka.client_id}-{name}"

    def source_factory(**hooks: Any) -> KafkaSource:
        return KafkaSource(config.kafka, bootstrap, section.group_id, inputs, client_id=client_id,
                           **hooks)

    loop = ConsumerLoop(
        handler=handler, source_factory=source_factory,
        sink=KafkaSink(config.kafka, bootstrap, client_id=client_id),
        codec=Codec(config.validation, worker=name), metrics=metrics, dlq_topic=topics.dlq,
        table=TableReader(config.kafka, bootstrap, [topics.items, topics.model_updates],
                          client_id=f"{client_id}-table"),
        max_records=section.batch_max_records, poll_timeout_ms=section.poll_timeout_ms, stop=stop,
        fault=fault,
        # The updater owns the DLQ of events: finetune reads the same topic and must not
        # dead-letter a bad record a second time.
        dead_letters=name != "finetune")
    return loop, handler, metrics


def run_worker(config: Config, name: str, *, stop: threading.Event | None = None) -> None:
    """Run worker `name` until `stop` is set; drains the current batch and commits on the way out."""
    torch.set_num_threads(1)  # measured: 5-25x slower kernels with two threads under load
    # Millions of small state objects make CPython's default gen-0 threshold (700) trigger
    # collections constantly; measured +20% updater throughput at 50k.
    gc.set_threshold(50_000, 20, 100)
    loop, handler, metrics = build_loop(config, name, stop=stop)
    port = {"updater": config.updater.metrics_port, "scorer": config.scorer.metrics_port,
            "finetune": config.finetune.metrics_port}[name]
    server = serve(metrics, config.metrics.host, port) if port else None
    if server is not None:
        log.info("%s metrics on http://%s:%d/metrics", name, config.metrics.host, port)
    try:
        primed = loop.prime(timeout_s=60.0)
        log.info("%s ready: %d table records read, model %s", name, primed,
                 handler.models_version())
        loop.run()
    finally:
        if hasattr(handler, "close"):
            handler.close()
        if server is not None:
            server.shutdown()
        log.info("%s stopped", name)
