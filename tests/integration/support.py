"""Shared pieces of the integration tests: a data dir with a small published model, configs,
and reading a topic until a condition holds (deadline, no sleeps)."""

from __future__ import annotations

import shutil
import threading
import time

import orjson
from kafka import KafkaConsumer, KafkaProducer

from pipeline.config import Config, PathsConfig, ScorerConfig, TopicsConfig, UpdaterConfig
from pipeline.messages import Item
from tests.probes import http_get  # noqa: F401  (re-exported for the integration tests)
from workers import finetune, scorer, updater
from workers.lab.chaos_harness import prepare_model
from workers.runtime import run_worker
from workers.spec import WorkerSpec

SERVING = (updater.SPEC, scorer.SPEC)

NOW_MS = int(time.time() * 1000)
GENRES = ["Action", "Comedy", "Drama", "Horror", "Romance"]


def catalog_items():
    """The 40 items m0..m39 of the data dir's model, one genre each."""
    return [
        Item(
            f"m{i}",
            NOW_MS - 60_000,
            title=f"{GENRES[i % 5]} film number {i}",
            categories=(GENRES[i % 5],),
        )
        for i in range(40)
    ]


def make_data_dir(root):
    """A data dir whose registry holds a small random model over the 40 `catalog_items` with
    real MiniLM text (the chaos harness's model)."""
    prepare_model(root, catalog_items())
    return root


def up_flags(broker_port, data_dir, *, updater=0, scorer=0, finetune=0, supervisor=0):
    """The flags of a `streamrec up` on this broker port and data dir, with each worker's
    metrics port (0: any free one)."""
    return [
        "--broker-port",
        str(broker_port),
        "--paths-data-dir",
        str(data_dir),
        "--updater-metrics-port",
        str(updater),
        "--scorer-metrics-port",
        str(scorer),
        "--finetune-metrics-port",
        str(finetune),
        "--metrics-supervisor-port",
        str(supervisor),
    ]


def config_for(kafka_config, topics, data_dir, **sections):
    """A Config on this broker, topics and data dir; the separate topology (updater and scorer,
    SERVING) on any free metrics port (the scorer with epsilon 0.1) unless `sections` say
    otherwise, and any other sections."""
    return Config(
        kafka=kafka_config,
        topics=topics,
        paths=PathsConfig(str(data_dir)),
        updater=sections.pop("updater", UpdaterConfig(metrics_port=0, score=False)),
        scorer=sections.pop("scorer", ScorerConfig(metrics_port=0, epsilon=0.1)),
        **sections,
    )


def tiny_bench(kafka_config, data_dir, root, **options):
    """`streamrec bench` (workers.lab.bench.run) at a tiny scale, 100 events/s for 2 s from 20
    users over 40 items, with data_dir's model copied to where the bench keeps it; the result."""
    from workers.lab.bench import run

    shutil.copytree(data_dir, root / "bench")  # the bench keeps its model under <root>/bench
    config = config_for(kafka_config, TopicsConfig(), root)
    return run(config, rate=100, duration_s=2, users=20, items=40, **options)


def producer_for(bootstrap):
    return KafkaProducer(bootstrap_servers=bootstrap, linger_ms=1)


def event_value(i, user, item, ts=None):
    return orjson.dumps(
        {
            "event_id": f"ev-{i}",
            "user_id": user,
            "item_id": item,
            "type": "click",
            "ts": ts or NOW_MS - 10_000 + i,
        }
    )


def wait_for(check, timeout_s: float, what: str, *, interval_s: float = 0.1):
    """`check()`'s first truthy result, polled until the deadline; an AssertionError naming
    `what` when it never comes. A check that raises OSError (a port not open yet) counts as
    not yet."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            result = check()
        except OSError:
            result = None
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)


WARM_UP_USER = "warm-up-user"


def wait_until_serving(bootstrap, topics, timeout_s=120.0):
    """Until the updater and scorer answer: one event of WARM_UP_USER comes back as a
    recommendation (every worker has joined its group and loaded its model by then)."""
    with producer_for(bootstrap) as producer:
        producer.send(
            topics.events, key=WARM_UP_USER.encode(), value=event_value(10**6, WARM_UP_USER, "m1")
        )
        producer.flush()
    trigger = f"ev-{10**6}"
    recs = drain(
        bootstrap,
        topics.recommendations,
        lambda vs: any(v["trigger_event_id"] == trigger for v in vs),
        timeout_s,
    )
    assert any(v["trigger_event_id"] == trigger for v in recs), "the workers never answered"


def drain(bootstrap, topic, until, timeout_s=60.0):
    """Read `topic` from the beginning until `until(values)` is true or the deadline passes."""
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
        fetch_max_wait_ms=50,
    )
    values = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=200).values():
                values.extend(orjson.loads(r.value) for r in batch)
            if until(values):
                return values
    finally:
        consumer.close()
    return values


class WorkerThreads:
    """Real workers (`run_worker`, as `streamrec <role>` runs them) in threads of this process,
    stopped and joined on exit; an error in any of them fails the test there."""

    def __init__(self, config, specs: tuple[WorkerSpec, ...] = SERVING):
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.threads = [
            threading.Thread(
                target=self._run, args=(config, spec), daemon=True, name=f"test-{spec.name}"
            )
            for spec in specs
        ]

    def _run(self, config, spec):
        try:
            run_worker(config, spec, stop=self.stop)
        except BaseException as exc:  # surfaced by the test
            self.errors.append(exc)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)
        assert not self.errors, self.errors


WITH_FINETUNE = (*SERVING, finetune.SPEC)
