"""What a serving role declares about itself, so one runtime can run any of them.

Each role module (updater, scorer, finetune) exports `SPEC: WorkerSpec` and `run(config)`.
`workers/runtime.py` builds a process from a spec alone (it imports no role and never asks a
role's name), and the test harnesses build their in-memory loops from the same specs, so the
wiring of a role is written once, here in its declaration.

Adding a role: write its handler (the hooks of `pipeline.loop.Handler`), declare its SPEC, add
its `run` to the CLI's commands. Nothing else changes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, TypeVar

from pipeline.config import Config, KafkaConfig, TopicsConfig

if TYPE_CHECKING:  # the runtime imports these only once the group join is under way
    from pipeline.loop import Handler
    from pipeline.metrics import WorkerMetrics
    from pipeline.versions import ServingModels

__all__ = ["WorkerSpec", "HandlerDeps", "WorkerSection"]

M = TypeVar("M", bound="WorkerMetrics")


class WorkerSection(Protocol):
    """The settings every role's config section has (UpdaterConfig, ScorerConfig, ...)."""

    @property
    def group_id(self) -> str: ...
    @property
    def batch_max_records(self) -> int: ...
    @property
    def poll_timeout_ms(self) -> int: ...
    @property
    def metrics_port(self) -> int: ...


@dataclass(frozen=True)
class HandlerDeps:
    """What a handler is built with besides the config: the pieces a process (or a test) owns."""

    models: ServingModels
    metrics: WorkerMetrics
    clock: Callable[[], float] = time.time
    # The chaos harness's fault hook (runtime.fault_from_env); None outside `streamrec chaos`.
    fault: Callable[[str], None] | None = None

    def metrics_as(self, kind: type[M]) -> M:
        """`metrics` as the subclass the role's SPEC.metrics builds (UpdaterMetrics, ...)."""
        if not isinstance(self.metrics, kind):
            raise TypeError(
                f"this handler needs {kind.__name__}, got "
                f"{type(self.metrics).__name__}: build it with its SPEC.metrics"
            )
        return self.metrics


def _same_kafka(config: Config) -> KafkaConfig:
    return config.kafka


def _on_cpu(config: Config) -> str:
    return "cpu"


@dataclass(frozen=True)
class WorkerSpec:
    """One serving role, declared: its inputs, config section, metrics and handler."""

    name: str
    # The topics its consumer group reads.
    inputs: Callable[[TopicsConfig], tuple[str, ...]]
    # Its config section: group id, batch size, poll timeout, metrics port.
    section: Callable[[Config], WorkerSection]
    # Its Prometheus metrics, bound to a registry of their own.
    metrics: Callable[[], WorkerMetrics]
    # Its handler, with the model loaded (the slow part of a start).
    build_handler: Callable[[Config, HandlerDeps], Handler]
    # The settings of its input consumer (fine-tune trades latency for fuller fetches).
    consumer: Callable[[Config], KafkaConfig] = field(default=_same_kafka)
    # Whether it dead-letters invalid input: false where another role owns that topic's DLQ.
    dead_letters: bool = True
    # Where its text encoder runs.
    encoder_device: Callable[[Config], str] = field(default=_on_cpu)
    # The CPU niceness it lowers itself to before any thread starts (None: as started).
    nice: Callable[[Config], int] | None = None

    def group_id(self, config: Config) -> str:
        return self.section(config).group_id
