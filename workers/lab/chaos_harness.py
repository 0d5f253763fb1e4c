"""The process control `streamrec chaos` builds its scenarios from: worker processes it can
kill and restart, a paced replay, a collector of every output topic, and the context a
scenario's fault schedule gets. The verdict (reference and checks) is chaos_verdict.py.

Size: the real workers' process control (start, kill, pause, restart), the replay and the
output collector are what every scenario drives together; the verdict is chaos_verdict.py.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson

from pipeline.broker import EmbeddedBroker
from pipeline.config import (
    BrokerConfig,
    Config,
    KafkaConfig,
    PathsConfig,
    ScorerConfig,
    TopicsConfig,
    UpdaterConfig,
    ValidationConfig,
    to_env,
)
from pipeline.files import open_private, private_dirs
from pipeline.kafka import KafkaSink, TableReader
from pipeline.registry import ModelRegistry
from workers.lab.bench.load import Freshness
from workers.runtime import CHAOS_ENV, FAULT_ENV

__all__ = [
    "Profile",
    "PROFILES",
    "prepare_model",
    "Worker",
    "Collector",
    "Replay",
    "Context",
    "config_for",
    "output_of",
]

log = logging.getLogger(__name__)

_ITEMS = 40
_TRIGGERS_KEPT = 8
_REPLAY_BATCH_S = 0.05


@dataclasses.dataclass(frozen=True)
class Profile:
    rate: float  # events/s offered
    min_duration_s: float  # the replay runs at least this long (longer while faults go on)
    users: int
    kills: int  # faults per kill scenario
    every_s: tuple[float, float]  # pause between a recovery and the next fault
    repeats: int  # per named fault point
    settle_timeout_s: float


# One row per profile, in Profile's field order: rate, min_duration_s, users, kills, every_s,
# repeats, settle_timeout_s.
PROFILES = {
    "short": Profile(200, 15, 200, 2, (5, 8), 1, 90),
    "full": Profile(1000, 60, 2000, 8, (5, 15), 5, 180),
}


# -- the pieces a scenario is made of ------------------------------------------------------------


def prepare_model(root: Path, items: list[Any] | None = None) -> Path:
    """A registry holding a small random model over `items` (default: 40 films m0..m39, one
    genre each; MiniLM text), built once per run."""
    import torch

    from pipeline.items import Catalog, TextEncoder
    from pipeline.messages import Item
    from pipeline.model import SeqRecConfig, SeqRecModel

    models = root / "models"
    if ModelRegistry(models).current_version() is not None:
        return models
    torch.manual_seed(0)
    now_ms = int(time.time() * 1000)
    genres = ["Action", "Comedy", "Drama", "Horror", "Romance"]
    items = items or [
        Item(
            f"m{i}",
            now_ms - 60_000,
            title=f"{genres[i % 5]} film number {i}",
            categories=(genres[i % 5],),
        )
        for i in range(_ITEMS)
    ]
    encoder = TextEncoder(None, root / "cache" / "text")
    catalog = Catalog()
    catalog.upsert(items, encoder.encode([i.text() for i in items]))
    seq = SeqRecConfig(
        num_items=len(items), hidden_size=32, num_layers=1, num_heads=2, max_length=20
    )
    ModelRegistry(models).publish(
        SeqRecModel(seq).eval(),
        seq,
        [i.item_id for i in items],
        catalog.meta(),
        {},
        None,
        0,
        text_vectors=catalog.text_vectors,
    )
    return models


class Worker:
    """One `streamrec <name>` child process that a scenario kills, pauses and restarts."""

    def __init__(self, name: str, config: Config, log_path: Path) -> None:
        self.name = name
        self._config = config
        self._log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts: list[float] = []  # wall-clock times of restarts (not the first start)

    def start(self, fault: str = "", restart: bool = False) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMREC_")}
        env.update(to_env(self._config))
        if fault:  # both switches: a fault point alone is ignored (workers/runtime.py)
            env[FAULT_ENV] = fault
            env[CHAOS_ENV] = "1"
        with open_private(self._log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "workers",
                    self.name.rstrip("0123456789"),
                    "--log-level",
                    "INFO",
                ],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        if restart:
            self.restarts.append(time.time())

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout_s: float) -> int | None:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGCONT)
        self.proc.terminate()
        if self.wait(20) is None:
            self.proc.kill()
            self.proc.wait()

    def log_text(self) -> str:
        return self._log_path.read_text(errors="replace") if self._log_path.exists() else ""


class Collector:
    """Reads user vectors, recommendations and dead letters from the beginning, in a thread."""

    def __init__(self, config: Config) -> None:
        t = config.topics
        self._topics = t
        self._reader = TableReader(
            config.kafka,
            config.bootstrap_servers,
            [t.user_vectors, t.recommendations, t.dlq],
            client_id="chaos-collector",
        )
        self.lock = threading.Lock()
        self.vectors: dict[str, dict[str, Any]] = {}  # user -> last vector by arrival
        # user -> trigger -> last vector, for the user's last few triggers only: holding every
        # vector (a 256-entry history each) made the GC crawl and the collector fall behind.
        self.final: dict[str, collections.OrderedDict[str | None, dict[str, Any]]] = {}
        self.vector_counts: collections.Counter[tuple[str, str | None]] = collections.Counter()
        self.recs: dict[tuple[str, Any, str], list[str]] = collections.defaultdict(list)
        self.last_rec: dict[str, dict[str, Any]] = {}
        self.dead: list[tuple[int, int, str]] = []
        self.arrivals: dict[str, list[float]] = {"updater": [], "scorer": []}  # record ts (s)
        self.freshness = Freshness()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Collector:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                records = self._reader.poll(50, 5000)
            except Exception as exc:  # broker paused or restarted: keep reading
                log.info("collector: %s", exc)
                time.sleep(0.2)
                continue
            now = time.time()
            with self.lock:
                for r in records:
                    if not r.value:
                        continue
                    self._take(
                        r.topic,
                        r.partition,
                        r.offset,
                        orjson.loads(r.value),
                        r.timestamp_ms / 1000,
                        now,
                    )

    def _take(
        self,
        topic: str,
        partition: int,
        offset: int,
        value: dict[str, Any],
        ts_s: float,
        now: float,
    ) -> None:
        t = self._topics
        if topic == t.user_vectors:
            user, trigger = value["user_id"], value.get("trigger_event_id")
            self.vectors[user] = value
            recent = self.final.setdefault(user, collections.OrderedDict())
            recent[trigger] = value
            recent.move_to_end(trigger)
            if len(recent) > _TRIGGERS_KEPT:
                recent.popitem(last=False)
            self.vector_counts[(user, trigger)] += 1
            self.arrivals["updater"].append(ts_s)
            self.freshness.received(trigger, now)
        elif topic == t.recommendations:
            key = (
                value["user_id"],
                value.get("trigger_event_id") or value.get("trigger"),
                value["model_version"],
            )
            self.recs[key].append(value["rec_id"])
            self.last_rec[value["user_id"]] = value
            self.arrivals["scorer"].append(ts_s)
        elif topic == t.dlq:
            self.dead.append((value["partition"], value["offset"], value["reason"]))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._reader.close()


class Replay:
    """Produces synthetic events (plus optional bad records) at a fixed rate, in a thread, until
    stopped and at least `min_duration_s` long. Keeps every good event for the reference."""

    def __init__(
        self,
        config: Config,
        profile: Profile,
        seed: int,
        freshness: Freshness,
        bad_fraction: float = 0.0,
    ) -> None:
        self._config = config
        self._profile = profile
        self._rng = random.Random(seed)
        self._freshness = freshness
        self._bad_fraction = bad_fraction
        self.events: list[tuple[str, str, str, int]] = []  # event_id, user, item, ts
        self.bad_sent: list[str] = []  # the class of each bad record sent
        self.stop = threading.Event()
        self.hold = threading.Event()  # set: produce nothing (a broker restart is under way)
        self.finished_at: float | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Replay:
        self._thread.start()
        return self

    def join(self, timeout_s: float) -> None:
        self._thread.join(timeout=timeout_s)

    def _run(self) -> None:
        from workers.lab.badinput import bad_records

        cfg, p = self._config, self._profile
        topic = cfg.topics.events
        started = time.perf_counter()
        sent = 0
        chunk = max(1, int(p.rate / 100))  # 10 ms slices
        # Records go out in batches of _REPLAY_BATCH_S, as a busy producer's would: Tansu 0.6.0
        # stops serving fetches near the end of a partition past ~20k record batches (module
        # docstring of pipeline/kafka/__init__.py), which one-record batches at 400/s reach in 200 s.
        kafka = dataclasses.replace(cfg.kafka, linger_ms=int(_REPLAY_BATCH_S * 1000))
        flushed = time.perf_counter()
        try:
            with KafkaSink(kafka, cfg.bootstrap_servers, client_id="chaos-replay") as sink:
                while not (
                    self.stop.is_set() and time.perf_counter() - started >= p.min_duration_s
                ):
                    if self.hold.is_set():
                        sink.flush(60)
                        time.sleep(0.05)
                        started = time.perf_counter() - sent / p.rate  # no burst afterwards
                        continue
                    delay = started + sent / p.rate - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                    now_ms = int(time.time() * 1000)
                    for _ in range(chunk):
                        if self._bad_fraction and self._rng.random() < self._bad_fraction:
                            kind, key, value = bad_records(self._rng, now_ms, cfg.validation)
                            sink.send(topic, key, value)
                            self.bad_sent.append(kind)
                        else:
                            self._send_good(sink, topic, now_ms)
                        sent += 1
                    if time.perf_counter() - flushed >= _REPLAY_BATCH_S:
                        sink.flush(60)
                        flushed = time.perf_counter()
                sink.flush(60)
        except BaseException as exc:  # surfaced in the scenario's result
            self.error = exc
        self.finished_at = time.time()

    def _send_good(self, sink: KafkaSink, topic: str, now_ms: int) -> None:
        n = len(self.events)
        user = f"u{self._rng.randrange(self._profile.users)}"
        item = f"m{self._rng.randrange(_ITEMS)}"
        event_id = f"c{n}"
        self.events.append((event_id, user, item, now_ms))
        sink.send(
            topic,
            user.encode(),
            orjson.dumps(
                {
                    "event_id": event_id,
                    "user_id": user,
                    "item_id": item,
                    "type": "click",
                    "ts": now_ms,
                }
            ),
        )
        self._freshness.sent(event_id, user, n, time.time())


# -- what a scenario's schedule works with ------------------------------------------------------


@dataclasses.dataclass
class Context:
    """What a scenario's fault schedule gets: the workers, the collector, the replay."""

    name: str
    profile: Profile
    config: Config
    root: Path
    workers: dict[str, Worker]
    collector: Collector
    replay: Replay
    brokers: list[EmbeddedBroker]
    rng: random.Random
    faults: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)
    last_fault_at: float = 0.0

    @property
    def broker(self) -> EmbeddedBroker:
        return self.brokers[-1]

    def wait_output(self, worker: str, after: float, timeout_s: float) -> float | None:
        """Seconds until `worker`'s first output stamped after `after` (None on timeout)."""
        worker = output_of(worker)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.collector.lock:
                newer = [t for t in self.collector.arrivals[worker][-2000:] if t >= after]
            if newer:
                return min(newer) - after
            time.sleep(0.05)
        return None

    def pause(self) -> None:
        low, high = self.profile.every_s
        time.sleep(self.rng.uniform(low, high))

    def record(self, kind: str, **details: Any) -> None:
        self.last_fault_at = time.time()
        self.faults.append({"fault": kind, "at_s": round(self.last_fault_at, 3), **details})


def config_for(root: Path, port: int, models: Path, **updater: Any) -> Config:
    kafka = KafkaConfig(
        bootstrap_servers=f"127.0.0.1:{port}",
        client_id="chaos",
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
        request_timeout_ms=10_000,
    )
    private_dirs(root)
    if not (root / "models").exists():
        shutil.copytree(models, root / "models")
    cache = models.parent / "cache"
    if cache.exists() and not (root / "cache").exists():
        shutil.copytree(cache, root / "cache")
    return Config(
        kafka=kafka,
        broker=BrokerConfig(port=port),
        topics=TopicsConfig(prefix="chaos.", partitions=4),
        # 64 KiB: a limit + 1 byte record still fits a default producer request (1 MiB).
        validation=ValidationConfig(max_message_bytes=64 * 1024),
        updater=UpdaterConfig(
            **{
                "metrics_port": 0,
                "history_length": 256,
                "snapshot_every_bytes": 4 << 20,
                "score": False,  # the separate topology: the scenarios kill the scorer too
                **updater,
            }
        ),
        scorer=ScorerConfig(metrics_port=0),
        paths=PathsConfig(str(root)),
    )


def output_of(worker: str) -> str:
    """Which collector arrival list shows `worker`'s output (updater2 writes user vectors)."""
    return "scorer" if worker == "scorer" else "updater"
