"""The roles' declarations: each SPEC builds a handler that serves every input it declares."""

from __future__ import annotations

import pytest

from pipeline.config import UpdaterConfig
from pipeline.memorybus import MemoryBus
from pipeline.metrics import UpdaterMetrics, WorkerMetrics
from tests.handlers import MemoryWorker, memory_config
from tests.workers.conftest import TOPICS
from workers import finetune, scorer, updater
from workers.spec import HandlerDeps

SPECS = [updater.SPEC, scorer.SPEC, finetune.SPEC]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_a_spec_builds_a_handler_that_knows_every_input_it_declares(
    spec, registry, encoder, tmp_path
):
    config = memory_config(tmp_path, updater=UpdaterConfig(score=False))  # every role may run
    worker = MemoryWorker(spec, config, MemoryBus(partitions=2), registry=registry, encoder=encoder)
    try:
        kinds = {topic: worker.handler.kind_of(topic) for topic in spec.inputs(TOPICS)}
        assert worker.handler.worker == spec.name and worker.metrics.worker == spec.name
    finally:
        worker.close()
    assert len(kinds) == len(spec.inputs(TOPICS)) >= 2


def test_the_roles_read_their_own_consumer_groups():
    config = memory_config(".")
    assert len({spec.group_id(config) for spec in SPECS}) == len(SPECS)


def test_handler_deps_refuse_the_metrics_of_another_role():
    deps = HandlerDeps(models=None, metrics=WorkerMetrics("scorer"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="needs UpdaterMetrics, got WorkerMetrics"):
        deps.metrics_as(UpdaterMetrics)
