"""`streamrec bench`: freshness and throughput of the real updater and scorer processes.

Three measurements in one run, on fresh topics (a unique prefix) of the embedded broker or the
configured cluster, printed as one JSON object plus a table:
- ceiling: a plain consume -> parse -> produce pass-through with the same Kafka client, the
  yardstick the others are reported against (absolute figures on shared machines vary);
- offered load: synthetic events at a fixed rate; latency from the moment an event was produced
  to the moment the first recommendation reflecting it was consumed;
- saturation: a backlog produced as fast as possible; sustained events/s until the last event's
  recommendation arrives, with CPU seconds per 1,000 events of each worker.
`--mode memory` (in process, no broker) measures the updater's state instead: bench_state.py.
`--mode probe` starts nothing: it times a running deployment (`streamrec up`, or the configured
cluster's workers) from outside, producing to its events topic at a fixed rate under its own
user ids (`probe-u<n>`) and matching its recommendations by `trigger_event_id`. The probe's
events become real state and feedback there, like any client's.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson

from pipeline.broker import EmbeddedBroker, free_port
from pipeline.config import Config, PathsConfig, TopicsConfig
from pipeline.errors import StreamrecError
from pipeline.kafka import KafkaSink, KafkaSource, TableReader, ensure_topics
from pipeline.registry import ModelRegistry
from workers.lab.bench_state import format_state_memory, state_memory
from workers.up import Supervisor

__all__ = ["run", "probe", "percentiles", "Freshness", "format_table"]

log = logging.getLogger(__name__)

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def percentiles(values_ms: list[float]) -> dict[str, float]:
    if not values_ms:
        return {}
    arr = np.asarray(values_ms)
    return {"p50_ms": float(np.percentile(arr, 50)), "p90_ms": float(np.percentile(arr, 90)),
            "p99_ms": float(np.percentile(arr, 99)), "p99.9_ms": float(np.percentile(arr, 99.9)),
            "max_ms": float(arr.max()), "count": int(arr.size)}


class Freshness:
    """Matches consumed recommendations to produced events: an event counts as answered by the
    first recommendation for its user whose trigger is that event or a later one of the same
    user (events collapsed into one micro-batch are answered together)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, list[tuple[int, float]]] = defaultdict(list)  # user -> (seq, t)
        self._seq_of: dict[str, tuple[str, int]] = {}
        self.latencies_ms: list[float] = []
        self.sent_at: list[float] = []  # when each event of latencies_ms was produced
        self.recommendations = 0
        self.last_received = 0.0

    def sent(self, event_id: str, user_id: str, seq: int, at: float) -> None:
        with self._lock:
            self._seq_of[event_id] = (user_id, seq)
            self._pending[user_id].append((seq, at))

    def received(self, trigger_event_id: str | None, at: float) -> None:
        with self._lock:
            self.recommendations += 1
            self.last_received = at
            known = self._seq_of.get(trigger_event_id or "")
            if known is None:
                return
            user_id, seq = known
            pending = self._pending[user_id]
            answered = [t for s, t in pending if s <= seq]
            self._pending[user_id] = [(s, t) for s, t in pending if s > seq]
            self.latencies_ms.extend((at - t) * 1000 for t in answered)
            self.sent_at.extend(answered)

    def clear(self) -> None:
        with self._lock:
            self.latencies_ms.clear()
            self.sent_at.clear()

    def by_window(self, start: float, window_s: float) -> list[dict[str, float]]:
        """p50/p99 of the events produced in each window_s slice after `start`: shows whether
        latency drifts during a run (it does on Tansu, whose fetches slow as a log grows)."""
        with self._lock:
            pairs = sorted(zip(self.sent_at, self.latencies_ms))
        slices: dict[int, list[float]] = defaultdict(list)
        for at, latency in pairs:
            slices[int((at - start) // window_s)].append(latency)
        return [{"from_s": k * window_s, "p50_ms": round(float(np.percentile(v, 50)), 1),
                 "p99_ms": round(float(np.percentile(v, 99)), 1)} for k, v in sorted(slices.items())]

    def unanswered(self) -> int:
        with self._lock:
            return sum(len(p) for p in self._pending.values())


def _collect(reader: TableReader, freshness: Freshness, stop: threading.Event) -> None:
    while not stop.is_set():
        for record in reader.poll(50, 5000):
            if record.value:
                freshness.received(orjson.loads(record.value).get("trigger_event_id"), time.time())


def _cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


class _EventSource:
    """Synthetic events over `users` users (skewed activity) and the bench catalog's items."""

    def __init__(self, users: int, items: int, seed: int, user_prefix: str = "u",
                 item_ids: list[str] | None = None) -> None:
        rng = np.random.default_rng(seed)
        activity = rng.pareto(1.2, size=users) + 1.0
        self._p = activity / activity.sum()
        self._rng = rng
        self._item_ids = item_ids or [f"i{i}" for i in range(items)]
        self._user_prefix = user_prefix
        self._run = uuid.uuid4().hex[:8]
        self.seq = 0

    def batch(self, n: int) -> list[tuple[str, str, bytes, int]]:
        users = self._rng.choice(len(self._p), size=n, p=self._p)
        items = self._rng.integers(0, len(self._item_ids), size=n)
        now_ms = int(time.time() * 1000)
        out = []
        for u, i in zip(users.tolist(), items.tolist()):
            event_id, user = f"b{self._run}-{self.seq}", f"{self._user_prefix}{u}"
            out.append((event_id, user, orjson.dumps(
                {"event_id": event_id, "user_id": user, "item_id": self._item_ids[i], "type": "click",
                 "ts": now_ms}), self.seq))
            self.seq += 1
        return out


def _registry_items(config: Config, items: int) -> list[str] | None:
    """The first `items` item ids of the registry's current model (events about items the
    model knows), or None where there is no registry at hand (then i0..i<items>)."""
    try:
        return list(ModelRegistry(config.paths.models).load().item_ids)[:items]
    except StreamrecError:
        return None


def _ensure_bench_model(config: Config) -> str:
    registry = ModelRegistry(config.paths.models)
    if registry.current_version() is None:
        from workers.bootstrap import run as bootstrap

        log.info("bench: training a small synthetic model once into %s", config.paths.models)
        bootstrap(config.replace(training=dataclasses.replace(
            config.training, dataset="synthetic", epochs=3)), progress=False)
    return str(registry.current_version())


def _ceiling(config: Config, n: int) -> dict[str, Any]:
    """Plain consume -> orjson parse -> produce, one process, the client library's own pace."""
    topics = TopicsConfig(prefix=f"{config.topics.prefix}ceiling.", partitions=config.topics.partitions)
    ensure_topics(config.kafka, config.bootstrap_servers, topics)
    source = _EventSource(1000, 100, seed=1)
    with KafkaSink(config.kafka, config.bootstrap_servers, client_id="bench-ceiling") as sink:
        for _event_id, user, value, _seq in source.batch(n):
            sink.send(topics.events, user.encode(), value)
        sink.flush(120)
        consumer = KafkaSource(config.kafka, config.bootstrap_servers, f"bench-{uuid.uuid4().hex[:6]}",
                               [topics.events])
        done = 0
        started = None
        try:
            deadline = time.monotonic() + 120
            while done < n and time.monotonic() < deadline:
                records = consumer.poll(50, 5000)
                if records and started is None:
                    started = time.perf_counter()
                for record in records:
                    parsed = orjson.loads(record.value or b"{}")
                    sink.send(topics.user_vectors, record.key, orjson.dumps(parsed))
                done += len(records)
                if records:
                    sink.flush(60)
                    consumer.commit({(r.topic, r.partition): r.offset + 1 for r in records})
            seconds = time.perf_counter() - (started or time.perf_counter())
        finally:
            consumer.close()
    return {"messages": done, "seconds": round(seconds, 3),
            "msgs_per_s": round(done / seconds, 1) if seconds > 0 else None}


def _produce_paced(sink: Any, topic: str, source: Any, freshness: Freshness, rate: float,
                   duration_s: float, *, clock: Callable[[], float] = time.perf_counter,
                   sleep: Callable[[float], None] = time.sleep) -> tuple[int, float, float]:
    """Send `rate` events a second for `duration_s` in 5 ms slices; a slice that falls behind
    (a slow flush on a busy machine) sends everything already due, so the offered rate holds.
    Returns (events sent, seconds it took, the most any event went out after its scheduled
    time in ms): latency counts from the actual send, so a producer that falls behind hides
    queueing; the last figure shows by how much."""
    started = clock()
    total = int(rate * duration_s)
    sent = 0
    behind_s = 0.0
    chunk = max(1, int(rate / 200))
    while sent < total:
        delay = started + sent / rate - clock()
        if delay > 0:
            sleep(delay)
        first_due = started + sent / rate
        due = int((clock() - started) * rate) + 1
        for event_id, user, value, seq in source.batch(min(total - sent, max(chunk, due - sent))):
            sink.send(topic, user.encode(), value)
            freshness.sent(event_id, user, seq, time.time())
            sent += 1
        behind_s = max(behind_s, clock() - first_due)  # the slice's first event, sent now
        sink.flush(10)
    return sent, clock() - started, behind_s * 1000


def _offered_load(sink: KafkaSink, topic: str, source: _EventSource, freshness: Freshness,
                  rate: float, duration_s: float,
                  lag_at_end: Callable[[], dict[str, int]] | None = None) -> dict[str, Any]:
    """Produce at `rate`, wait for the answers, and report latency as a client sees it, the
    recommendations consumed per second while producing and (where the workers' metrics are
    at hand) their consumer lag the moment producing stopped."""
    started = time.time()
    recommendations_before = freshness.recommendations
    sent, took, behind_ms = _produce_paced(sink, topic, source, freshness, rate, duration_s)
    recommendations = freshness.recommendations - recommendations_before
    lag = lag_at_end() if lag_at_end is not None else None
    _wait_answered(freshness, 30)
    out = {"events": sent, "achieved_events_per_s": round(sent / took, 1) if took > 0 else None,
           "producer_max_behind_schedule_ms": round(behind_ms, 1),
           "recommendations_per_s": round(recommendations / took, 1) if took > 0 else None,
           **percentiles(freshness.latencies_ms), "unanswered": freshness.unanswered(),
           "by_10s_window": freshness.by_window(started, 10.0)}
    if lag is not None:
        out["consumer_lag_at_end"] = lag
    return out


def _wait_answered(freshness: Freshness, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while freshness.unanswered() and time.monotonic() < deadline:
        time.sleep(0.05)


def run(config: Config, *, rate: float = 1000.0, duration_s: float = 60.0, users: int = 10_000,
        items: int = 2000, saturation_events: int = 50_000, ceiling_events: int = 50_000,
        modes: tuple[str, ...] = ("ceiling", "offered", "saturation"),
        instances: int = 1) -> dict[str, Any]:
    memory = state_memory(config.updater) if "memory" in modes else None
    if set(modes) == {"memory"}:
        return {"state_memory": memory}
    if "probe" in modes:
        if set(modes) != {"probe"}:
            raise ValueError("--mode probe times a running deployment; run it on its own")
        return probe(config, rate=rate, duration_s=duration_s, users=users, items=items)
    bench_root = config.paths.root / "bench"
    config = config.replace(paths=PathsConfig(str(bench_root)))
    broker = EmbeddedBroker(config.broker) if config.kafka.embedded else None
    result: dict[str, Any] = {"config": {
        "rate": rate, "duration_s": duration_s, "users": users, "catalog_items": items,
        "partitions": config.topics.partitions, "instances_per_worker": instances,
        "updater_batch_max_records": config.updater.batch_max_records,
        "scorer_batch_max_records": config.scorer.batch_max_records,
        "fetch_max_wait_ms": config.kafka.fetch_max_wait_ms, "linger_ms": config.kafka.linger_ms,
        "broker": "embedded tansu" if broker else config.kafka.bootstrap_servers}}
    try:
        if broker is not None:
            broker.start()
        result["config"]["model_version"] = _ensure_bench_model(config)
        result["config"]["model"] = dataclasses.asdict(config.model)
        item_ids = _registry_items(config, items)
        if item_ids:
            result["config"]["catalog_items"] = len(item_ids)
        run_config = config.replace(
            topics=dataclasses.replace(config.topics, prefix=f"bench{uuid.uuid4().hex[:6]}."),
            updater=dataclasses.replace(config.updater, metrics_port=free_port()),
            scorer=dataclasses.replace(config.scorer, metrics_port=free_port()))
        ensure_topics(run_config.kafka, run_config.bootstrap_servers, run_config.topics)
        if "ceiling" in modes:
            log.info("bench: ceiling pass-through over %d messages", ceiling_events)
            result["ceiling"] = _ceiling(run_config, ceiling_events)
        if "catalog" in modes:
            log.info("bench: catalog scale, 1M items")
            result["catalog"] = catalog_scale(config)
        if {"offered", "saturation"} & set(modes):
            result.update(_run_workers(run_config, rate=rate, duration_s=duration_s, users=users,
                                       items=items, saturation_events=saturation_events,
                                       modes=modes, instances=instances, item_ids=item_ids,
                                       broker_pid=broker.pid if broker else None))
        if memory is not None:
            result["state_memory"] = memory
        ceiling = (result.get("ceiling") or {}).get("msgs_per_s")
        sustained = (result.get("saturation") or {}).get("events_per_s")
        if ceiling and sustained:
            result["saturation"]["ratio_to_ceiling"] = round(sustained / ceiling, 3)
    finally:
        if broker is not None:
            broker.stop()
    return result


def probe(config: Config, *, rate: float, duration_s: float, users: int,
          items: int) -> dict[str, Any]:
    """Event -> recommendation latency of the deployment `config` points at, seen from outside:
    the figure a client gets, with everything that runs there (fine-tunes and swaps included)."""
    result: dict[str, Any] = {"config": {
        "rate": rate, "duration_s": duration_s, "users": users, "catalog_items": items,
        "mode": "probe", "events_topic": config.topics.events,
        "recommendations_topic": config.topics.recommendations,
        "broker": config.kafka.bootstrap_servers or config.broker.bootstrap}}
    freshness = Freshness()
    item_ids = _registry_items(config, items)
    result["config"]["item_ids"] = "registry" if item_ids else "synthetic"
    source = _EventSource(users, items, seed=int(time.time()), user_prefix="probe-u",
                          item_ids=item_ids)
    reader = TableReader(config.kafka, config.bootstrap_servers, [config.topics.recommendations],
                         client_id="bench-probe-reader", from_end=True)
    if not reader.wait_at_end(30):  # else answers to the first events could be skipped as old
        reader.close()
        raise StreamrecError(f"bench probe: could not find the end of "
                             f"{config.topics.recommendations} within 30 s")
    stop = threading.Event()
    collector = threading.Thread(target=_collect, args=(reader, freshness, stop), daemon=True)
    collector.start()
    try:
        with KafkaSink(config.kafka, config.bootstrap_servers, client_id="bench-probe") as sink:
            log.info("bench: probing %s at %.0f events/s for %.0fs", config.topics.events, rate,
                     duration_s)
            result["offered"] = _offered_load(sink, config.topics.events, source, freshness,
                                              rate, duration_s)
    finally:
        stop.set()
        collector.join(timeout=5)
        reader.close()
    return result


def _run_workers(config: Config, *, rate: float, duration_s: float, users: int, items: int,
                 saturation_events: int, modes: tuple[str, ...], instances: int = 1,
                 item_ids: list[str] | None = None,
                 broker_pid: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    freshness = Freshness()
    source = _EventSource(users, items, seed=7, item_ids=item_ids)
    reader = TableReader(config.kafka, config.bootstrap_servers, [config.topics.recommendations],
                         client_id="bench-reader")
    stop = threading.Event()
    collector = threading.Thread(target=_collect, args=(reader, freshness, stop), daemon=True)
    workers = ("updater",) * instances + ("scorer",) * instances
    with Supervisor(config, workers=workers, log_level="WARNING") as supervisor, KafkaSink(
            config.kafka, config.bootstrap_servers, client_id="bench-producer") as sink:
        collector.start()
        _warm_up(sink, config, source, freshness, supervisor)
        if "offered" in modes:
            log.info("bench: offered load %.0f events/s for %.0fs", rate, duration_s)
            freshness.clear()
            started, broker_cpu = time.time(), _cpu_seconds(broker_pid) if broker_pid else 0.0
            out["offered"] = _offered_load(sink, config.topics.events, source, freshness, rate,
                                           duration_s, lag_at_end=lambda: _consumer_lag(config))
            if broker_pid:
                out["offered"]["broker_cpu_share"] = round(
                    (_cpu_seconds(broker_pid) - broker_cpu) / (time.time() - started), 2)
        if "saturation" in modes:
            out["saturation"] = _saturate(sink, config, source, freshness, supervisor,
                                          saturation_events)
        out["stage_seconds"], out["user_encodes"] = _worker_figures(config)
        stop.set()
        collector.join(timeout=5)
    reader.close()
    return out


def _metrics_pages(config: Config) -> dict[str, str]:
    """Each serving worker's Prometheus page (the workers the bench started)."""
    import urllib.request

    pages = {}
    for worker, port in (("updater", config.updater.metrics_port),
                         ("scorer", config.scorer.metrics_port)):
        try:
            with urllib.request.urlopen(f"http://{config.metrics.host}:{port}/metrics",
                                        timeout=5) as response:
                pages[worker] = response.read().decode()
        except OSError:
            continue
    return pages


def _metric_sums(page: str, name: str) -> dict[str, float]:
    """`name`'s samples summed by their first label's value ("" when it has no labels)."""
    out: dict[str, float] = {}
    for line in page.splitlines():
        if line.startswith(name) and line[len(name):len(name) + 1] in ("{", " "):
            labels, value = line[len(name):].rsplit(" ", 1)
            key = labels.split('"', 2)[1] if labels.startswith("{") else ""
            out[key] = out.get(key, 0.0) + float(value)
    return out


def _consumer_lag(config: Config) -> dict[str, int]:
    """Records each worker has not read yet, over its input partitions, as it exports them
    (`streamrec_<worker>_consumer_lag_messages`, refreshed once a second)."""
    return {worker: int(sum(_metric_sums(page, f"streamrec_{worker}_consumer_lag_messages").values()))
            for worker, page in _metrics_pages(config).items()}


def _worker_figures(config: Config) -> tuple[dict[str, dict[str, float]], dict[str, int]]:
    """Seconds spent per stage over the whole run, and the updater's user vectors by refresh
    mode (incremental | full), from each worker's own metrics page: where the time goes, as an
    operator would see it in Prometheus."""
    out: dict[str, dict[str, float]] = {}
    encodes: dict[str, int] = {}
    for worker, page in _metrics_pages(config).items():
        out[worker] = {stage: round(seconds, 2) for stage, seconds in
                       _metric_sums(page, f"streamrec_{worker}_stage_seconds_sum").items()}
        for mode, n in _metric_sums(page, f"streamrec_{worker}_user_encodes_total").items():
            encodes[mode] = encodes.get(mode, 0) + int(n)
    return out, encodes


def _warm_up(sink: KafkaSink, config: Config, source: _EventSource, freshness: Freshness,
             supervisor: Supervisor) -> None:
    """Until the workers answer (group joins, model loads), a trickle of events."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        supervisor.check()
        for event_id, user, value, seq in source.batch(20):
            sink.send(config.topics.events, user.encode(), value)
            freshness.sent(event_id, user, seq, time.time())
        sink.flush(10)
        time.sleep(0.5)
        if freshness.latencies_ms:
            _wait_answered(freshness, 10)
            return
    raise RuntimeError("workers did not answer within 180 s")


def _saturate(sink: KafkaSink, config: Config, source: _EventSource, freshness: Freshness,
              supervisor: Supervisor, n: int) -> dict[str, Any]:
    pids = {name: proc.pid for name, proc in supervisor.children.items()}
    cpu_before = {name: _cpu_seconds(pid) for name, pid in pids.items()}
    events = source.batch(n)
    started = time.time()
    for event_id, user, value, seq in events:
        sink.send(config.topics.events, user.encode(), value)
        freshness.sent(event_id, user, seq, started)
    sink.flush(120)
    produced_s = time.time() - started
    _wait_answered(freshness, 300)
    elapsed = freshness.last_received - started
    cpu: dict[str, float] = {}
    for name, pid in pids.items():  # per worker kind, summed over its instances
        kind = name.partition("-")[0]
        cpu[kind] = cpu.get(kind, 0.0) + _cpu_seconds(pid) - cpu_before[name]
    return {"events": n, "produce_seconds": round(produced_s, 2),
            "seconds_to_last_recommendation": round(elapsed, 2),
            "events_per_s": round(n / elapsed, 1) if elapsed > 0 else None,
            "unanswered": freshness.unanswered(),
            "cpu_seconds_per_1000_events": {k: round(v * 1000 / n, 3) for k, v in cpu.items()}}


def catalog_scale(config: Config, n_items: int = 1_000_000, n_users: int = 2000,
                  exact_users: int = 200) -> dict[str, Any]:
    """Top-10 over `n_items` through the scorer's ANN path vs exact search: recall@10, users/s,
    build time. Items: the trained item tower applied to perturbed real text vectors (no id,
    i.e. cold items); users: the trained encoder over random histories of real items."""
    import faiss
    import torch

    from pipeline.ann import AnnIndex, Exclusions, ann_top_k
    from pipeline.scoring import exclusion_mask, top_k

    faiss.omp_set_num_threads(1)
    loaded = ModelRegistry(config.paths.models).load()
    catalog = loaded.catalog()
    rng = np.random.default_rng(0)
    text = catalog.text_vectors[rng.integers(0, len(catalog), n_items)]
    text = text + 0.3 * rng.standard_normal(text.shape).astype(np.float32) / np.sqrt(text.shape[1])
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    with torch.no_grad():
        items = np.concatenate([loaded.model.item_vectors(
            torch.zeros(len(chunk), dtype=torch.long), torch.from_numpy(chunk)).numpy()
            for chunk in np.array_split(text, max(1, n_items // 65_536))])
    histories = [rng.integers(0, len(catalog), rng.integers(1, 50)).tolist() for _ in range(n_users)]
    users = loaded.encode_users(histories, [[1] * len(h) for h in histories],
                                loaded.item_vectors(catalog))
    available = np.ones(n_items, dtype=bool)
    available[rng.integers(0, n_items, n_items // 100)] = False
    excluded = [rng.integers(0, n_items, 20) for _ in range(n_users)]
    started = time.perf_counter()
    index = AnnIndex(items, nprobe=config.scorer.ann_nprobe)
    build_s = time.perf_counter() - started
    started = time.perf_counter()
    rows, _, _ = ann_top_k(index, users, items, Exclusions(available, excluded), 10)
    ann_users_per_s = n_users / (time.perf_counter() - started)
    started = time.perf_counter()
    exact = np.concatenate([top_k(users[i:i + 20], items,
                                  exclusion_mask(20, n_items, excluded[i:i + 20], available), 10)[0]
                            for i in range(0, exact_users, 20)])
    exact_users_per_s = exact_users / (time.perf_counter() - started)
    recall = float(np.mean([len(set(a) & set(b)) / 10
                            for a, b in zip(rows[:exact_users].tolist(), exact.tolist())]))
    return {"items": n_items, "users": n_users, "index": f"faiss IVF-flat, nprobe "
            f"{config.scorer.ann_nprobe}", "build_seconds": round(build_s, 1),
            "ann_users_per_s": round(ann_users_per_s, 1),
            "exact_users_per_s": round(exact_users_per_s, 1), "recall@10": round(recall, 4),
            "item_vectors_bytes_per_item": int(items.nbytes / n_items)}


def format_table(result: dict[str, Any]) -> str:
    lines = []
    if "ceiling" in result:
        c = result["ceiling"]
        lines.append(f"ceiling (consume->parse->produce): {c['msgs_per_s']} msg/s")
    if "offered" in result:
        o = result["offered"]
        achieved = (f" (achieved {o['achieved_events_per_s']:.0f}, at most "
                    f"{o['producer_max_behind_schedule_ms']:.0f} ms behind schedule)"
                    if o.get("achieved_events_per_s") else "")
        lines.append(f"offered {result['config']['rate']:.0f} ev/s{achieved}: p50 {o.get('p50_ms', 0):.1f} ms  "
                     f"p90 {o.get('p90_ms', 0):.1f}  p99 {o.get('p99_ms', 0):.1f}  "
                     f"p99.9 {o.get('p99.9_ms', 0):.1f}  max {o.get('max_ms', 0):.1f}  "
                     f"(unanswered {o['unanswered']})")
        if "recommendations_per_s" in o:
            lag = o.get("consumer_lag_at_end")
            lag_text = (", consumer lag when producing stopped: " + ", ".join(
                f"{w} {n}" for w, n in lag.items())) if lag else ""
            lines.append(f"  recommendations consumed: {o['recommendations_per_s']:.0f}/s{lag_text}")
        if o.get("by_10s_window"):
            lines.append("  by 10 s window, p50/p99 ms: " + ", ".join(
                f"{w['p50_ms']:.0f}/{w['p99_ms']:.0f}" for w in o["by_10s_window"]))
        if "broker_cpu_share" in o:
            lines.append(f"  embedded broker CPU during the offered load: "
                         f"{100 * o['broker_cpu_share']:.0f}% of a core")
    if "saturation" in result:
        s = result["saturation"]
        lines.append(f"saturation: {s['events_per_s']} events/s sustained "
                     f"(ratio to ceiling {s.get('ratio_to_ceiling')}), CPU s/1000 events "
                     f"{s['cpu_seconds_per_1000_events']}")
    for worker, stages in (result.get("stage_seconds") or {}).items():
        lines.append(f"{worker} seconds per stage: " + ", ".join(f"{k} {v}" for k, v in stages.items()))
    encodes = result.get("user_encodes") or {}
    if encodes:
        total = sum(encodes.values()) or 1
        lines.append(f"updater user vectors: {encodes.get('incremental', 0)} incremental, "
                     f"{encodes.get('full', 0)} full re-encodes "
                     f"({100 * encodes.get('incremental', 0) / total:.0f}% incremental)")
    if "catalog" in result:
        c = result["catalog"]
        lines.append(f"catalog {c['items']:,} items: ANN recall@10 {c['recall@10']}, "
                     f"{c['ann_users_per_s']} users/s (exact {c['exact_users_per_s']}), "
                     f"build {c['build_seconds']} s")
    if "state_memory" in result:
        lines.extend(format_state_memory(result["state_memory"]))
    return "\n".join(lines)
