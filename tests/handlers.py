"""Workers on the in-memory bus, built from their SPECs as the runtime builds them on Kafka.

`MemoryWorker(spec, config, bus, ...)` is one role's handler and consumer loop over a
MemoryBus; `memory_config(root, ...)` the config those tests give it. `NoopHandler` is a handler
with every loop hook a no-op, for loop tests that only care about `handle`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.codec import Codec
from pipeline.config import Config, KafkaConfig, PathsConfig, ValidationConfig
from pipeline.loop import TP, ConsumerLoop, Handler, Output
from pipeline.memorybus import MemoryBus, MemorySink, MemorySource, MemoryTable
from pipeline.metrics import WorkerMetrics
from pipeline.versions import ServingModels
from workers.runtime import compose_loop
from workers.spec import HandlerDeps, WorkerSpec


def memory_config(root: Path, *, state_dir: Path | None = None, **sections: Any) -> Config:
    """A config whose data dir is `root` (registry in root/models) and whose loops commit after
    every batch (the tests' clocks stand still, so an interval would never pass)."""
    paths = PathsConfig(data_dir=str(root), state_dir=str(state_dir) if state_dir else "")
    return Config(kafka=KafkaConfig(commit_interval_ms=0), paths=paths, **sections)


def memory_loop(
    bus: MemoryBus,
    handler: Handler,
    source_factory: Callable[..., MemorySource],
    clock: Callable[[], float],
    metrics: WorkerMetrics | None = None,
    **options: Any,
) -> ConsumerLoop:
    """A bare updater ConsumerLoop on `bus` (dead letters to "dlq") around `handler`, for the
    loop's own tests; `options` are ConsumerLoop's (guard, commit_interval_s, ...)."""
    return ConsumerLoop(
        handler=handler,
        source_factory=source_factory,
        sink=MemorySink(bus),
        codec=Codec(ValidationConfig(), worker="updater"),
        metrics=metrics or WorkerMetrics("updater"),
        dlq_topic="dlq",
        clock=clock,
        **options,
    )


class MemoryWorker:
    """One role on `bus`: its handler (model from `registry`, text from `encoder`), its consumer
    loop, and the metrics it reports, read through their public registry (`metric`)."""

    def __init__(
        self,
        spec: WorkerSpec,
        config: Config,
        bus: MemoryBus,
        *,
        registry: Any,
        encoder: Any,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.spec = spec
        self.metrics = spec.metrics()
        self.models = ServingModels(registry=registry, encoder=encoder, metrics=self.metrics)
        self.models.start()
        self.handler: Any = spec.build_handler(
            config, HandlerDeps(models=self.models, metrics=self.metrics, clock=clock)
        )
        self.sources: list[MemorySource] = []
        inputs = list(spec.inputs(config.topics))
        topics = config.topics

        def source_factory(**hooks: Any) -> MemorySource:
            self.sources.append(MemorySource(bus, spec.group_id(config), inputs, **hooks))
            return self.sources[-1]

        self.loop = compose_loop(
            config,
            spec,
            self.handler,
            self.metrics,
            source_factory=source_factory,
            sink=MemorySink(bus, clock),
            table=MemoryTable(bus, [topics.items, topics.model_updates]),
            clock=clock,
        )

    def run_dry(self) -> None:
        """Run the loop until a pass finds nothing to do."""
        while self.loop.run_once():
            pass

    def metric(self, name: str, **labels: str) -> float:
        """The sample `streamrec_<name>` (a series every worker has) or else
        `streamrec_<worker>_<name>` (this role's own), with `labels` and this worker's `worker`
        label, read through the metrics' public registry as a scrape would (0 when never
        recorded)."""
        labels = {"worker": self.metrics.worker, **labels}
        for full in (f"streamrec_{name}", f"streamrec_{self.metrics.worker}_{name}"):
            value = self.metrics.registry.get_sample_value(full, labels)
            if value is not None:
                return value
        return 0.0

    def close(self) -> None:
        close = getattr(self.handler, "close", None)
        if close is not None:
            close()


class NoopHandler(Handler):
    worker = "updater"

    def kind_of(self, topic: str) -> str:
        return "event"

    def handle(self, batch, now_ms) -> list[Output]:  # type: ignore[no-untyped-def]
        return []

    def apply_table(self, batch, now_ms) -> list[Output]:  # type: ignore[no-untyped-def]
        return []

    def on_assign(self, partitions: list[TP]) -> dict[TP, int]:
        return {}

    def on_revoke(self, partitions: list[TP]) -> None:
        return None

    def checkpoint(self, offsets: dict[TP, int]) -> set[TP]:
        return set(offsets)

    def on_reset(self, tp: TP) -> None:
        return None
