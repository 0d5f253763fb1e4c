"""What every serving worker process does around its handler: one torch thread, metrics server,
topics, registry, text encoder, Kafka clients, the consumer loop, and a clean shutdown.

`run_worker(config, name)` is the single entry the updater and scorer share, so the process
lifecycle is written once. Signal handlers belong to the CLI; here a stop Event ends the loop.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import torch

from pipeline.codec import Codec
from pipeline.config import Config
from pipeline.items import TextEncoder
from pipeline.kafka import KafkaSink, KafkaSource, TableReader, ensure_topics
from pipeline.loop import ConsumerLoop
from pipeline.metrics import WorkerMetrics, serve
from pipeline.registry import ModelRegistry
from pipeline.versions import ServingModels

__all__ = ["run_worker", "build_loop"]

log = logging.getLogger(__name__)


def build_loop(config: Config, name: str, *, stop: threading.Event | None = None) -> tuple[ConsumerLoop, Any, WorkerMetrics]:
    """Compose one worker; returns (loop, handler, metrics). Does the start-up I/O."""
    from workers.scorer import ScorerHandler
    from workers.updater import UpdaterHandler

    metrics = WorkerMetrics(name)
    bootstrap = config.bootstrap_servers
    topics = config.topics
    ensure_topics(config.kafka, bootstrap, topics)
    section = config.updater if name == "updater" else config.scorer
    encoder = TextEncoder(config.model.text_encoder or None, config.paths.cache / "text",
                          device=section.device)
    models = ServingModels(registry=ModelRegistry(config.paths.models), encoder=encoder,
                           metrics=metrics)
    models.start()
    handler: Any
    if name == "updater":
        handler = UpdaterHandler(cfg=config.updater, topics=topics,
                                 state_dir=config.paths.state / "updater", models=models,
                                 metrics=metrics)
        inputs = [topics.events, topics.items]
    elif name == "scorer":
        handler = ScorerHandler(cfg=config.scorer, topics=topics, models=models, metrics=metrics)
        inputs = [topics.user_vectors, topics.model_updates]
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
        max_records=section.batch_max_records, poll_timeout_ms=section.poll_timeout_ms, stop=stop)
    return loop, handler, metrics


def run_worker(config: Config, name: str, *, stop: threading.Event | None = None) -> None:
    """Run worker `name` until `stop` is set; drains the current batch and commits on the way out."""
    torch.set_num_threads(1)  # measured: 5-25x slower kernels with two threads under load
    loop, handler, metrics = build_loop(config, name, stop=stop)
    port = config.updater.metrics_port if name == "updater" else config.scorer.metrics_port
    server = serve(metrics, config.metrics.host, port) if port else None
    if server is not None:
        log.info("%s metrics on http://%s:%d/metrics", name, config.metrics.host, port)
    try:
        primed = loop.prime(timeout_s=60.0)
        log.info("%s ready: %d table records read, model %s", name, primed,
                 handler.models_version() if hasattr(handler, "models_version") else "?")
        loop.run()
    finally:
        if hasattr(handler, "close"):
            handler.close()
        if server is not None:
            server.shutdown()
        log.info("%s stopped", name)
