"""`python -m workers.lab.bench.codecs`: what `kafka.compression_type` costs streamrec's producers.

On a private embedded broker (a free port), for each codec, through `KafkaSink` (the producer
every worker uses) and `TableReader` (a consumer like the workers'):
- cpu: client CPU seconds (this process, every thread) per 1,000 records to produce a backlog
  as fast as possible, and to read it back (decompression included); the broker's CPU over
  the same produce, and how much its resident memory grew (memory storage keeps every
  record), from /proc;
- latency: wall time of send-k-then-flush, as a worker produces one micro-batch's outputs
  (k = 1 and k = 20), p50 and p99;
- wire: kafka-python's own compression-rate-avg (compressed / uncompressed batch bytes).
Payloads: UserVector values like the updater's (64 floats, 50-item history: ~2.3 KB, what the
workers produce) and events (~150 B, what applications produce). Prints one JSON object (every
repeat, and each figure's median) on stdout and a table of the medians on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from pipeline.broker import EmbeddedBroker, free_port
from pipeline.codec import encode
from pipeline.config import BrokerConfig, KafkaConfig, TopicsConfig
from pipeline.kafka import KafkaSink, TableReader, ensure_topics
from pipeline.messages import UserVector

__all__ = ["run", "main", "format_table"]

_TICKS = os.sysconf("SC_CLK_TCK")


def _vector_values(n: int, seed: int = 0) -> list[tuple[bytes, bytes]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        user = f"user-{i % 5000}"
        items = tuple(f"i{int(x)}" for x in rng.integers(0, 2000, 50))
        message = UserVector(
            user_id=user,
            model_version="v3",
            vector=tuple(rng.normal(size=64).astype(np.float32).tolist()),
            history=items,
            event_ts=1_764_000_000_000 + i,
            updated_at=1_764_000_000_500 + i,
            history_types=tuple(random.Random(i).choice(["view", "click"]) for _ in items),
            trigger_event_id=f"ev-{i}",
            trigger_produced_at=1_764_000_000_000 + i,
        )
        out.append((user.encode(), encode(message)))
    return out


def _event_values(n: int) -> list[tuple[bytes, bytes]]:
    rnd = random.Random(1)
    return [
        (
            f"user-{rnd.randrange(10_000)}".encode(),
            orjson.dumps(
                {
                    "event_id": uuid.UUID(int=rnd.getrandbits(128)).hex,
                    "user_id": f"user-{i}",
                    "item_id": f"i{rnd.randrange(2000)}",
                    "type": "click",
                    "ts": 1_764_000_000_000 + i,
                }
            ),
        )
        for i in range(n)
    ]


def _broker_cpu_s(pid: int | None) -> float:
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def _broker_rss_mb(pid: int | None) -> float:
    if pid is None:
        return 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _pcts(values_s: list[float]) -> dict[str, float]:
    arr = np.asarray(values_s) * 1000
    return {
        "p50_ms": round(float(np.percentile(arr, 50)), 3),
        "p99_ms": round(float(np.percentile(arr, 99)), 3),
    }


def _one(
    kafka: KafkaConfig,
    bootstrap: str,
    broker_pid: int | None,
    codec: str,
    values: list[tuple[bytes, bytes]],
    rounds: int,
) -> dict[str, Any]:
    cfg = dataclasses.replace(kafka, compression_type=codec)
    topics = TopicsConfig(prefix=f"codec{uuid.uuid4().hex[:6]}.", partitions=2)
    ensure_topics(cfg, bootstrap, topics)
    out: dict[str, Any] = {}
    with KafkaSink(cfg, bootstrap, client_id=f"bench-{codec}") as sink:
        sink.send(topics.dlq, None, b"warm-up")  # connect and fetch metadata outside the timing
        sink.flush(30)
        rss0 = _broker_rss_mb(broker_pid)
        cpu0, wall0, broker0 = time.process_time(), time.perf_counter(), _broker_cpu_s(broker_pid)
        for key, value in values:
            sink.send(topics.user_vectors, key, value)
        sink.flush(120)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        broker = _broker_cpu_s(broker_pid) - broker0
        out["broker_rss_growth_mb"] = round(_broker_rss_mb(broker_pid) - rss0, 1)
        out["produce_cpu_ms_per_1k"] = round(cpu / len(values) * 1e6, 1)
        out["produce_records_per_s"] = round(len(values) / wall)
        out["broker_cpu_ms_per_1k"] = round(broker / len(values) * 1e6, 1)
        metrics = sink._producer.metrics() if sink._producer is not None else {}
        rate = metrics.get("producer-metrics", {}).get("compression-rate-avg")
        out["compression_rate"] = round(rate, 3) if rate is not None else None
        for k in (1, 20):
            times = []
            for r in range(rounds):
                batch = values[(r * k) % len(values) :][:k]
                started = time.perf_counter()
                for key, value in batch:
                    sink.send(topics.recommendations, key, value)
                sink.flush(30)
                times.append(time.perf_counter() - started)
            out[f"send_flush_{k}"] = _pcts(times)
    with TableReader(cfg, bootstrap, [topics.user_vectors]) as reader:
        cpu0 = time.process_time()
        read = reader.catch_up(120)
        out["consume_cpu_ms_per_1k"] = round(
            (time.process_time() - cpu0) / max(1, len(read)) * 1e6, 1
        )
    return out


def run(codecs: list[str], records: int, rounds: int, repeats: int) -> dict[str, Any]:
    payloads = {"user_vectors": _vector_values(records), "events": _event_values(records)}
    result: dict[str, Any] = {
        "records": records,
        "rounds": rounds,
        "repeats": repeats,
        "value_bytes_avg": {
            name: round(sum(len(v) for _, v in vals) / len(vals)) for name, vals in payloads.items()
        },
        "runs": {},
    }
    with (
        tempfile.TemporaryDirectory() as tmp,
        EmbeddedBroker(BrokerConfig(port=free_port()), log_path=Path(tmp) / "tansu.log") as broker,
    ):
        kafka = KafkaConfig(bootstrap_servers=broker.bootstrap)
        for name, values in payloads.items():
            for _repeat in range(repeats):  # codecs interleaved, so drift hits them alike
                for codec in codecs:
                    figures = _one(kafka, broker.bootstrap, broker.pid, codec, values, rounds)
                    result["runs"].setdefault(name, {}).setdefault(codec, []).append(figures)
    result["median"] = {
        name: {codec: _median(runs) for codec, runs in by_codec.items()}
        for name, by_codec in result["runs"].items()
    }
    return result


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure's median over the repeats."""
    out: dict[str, Any] = {}
    for key, first in runs[0].items():
        if isinstance(first, dict):
            out[key] = _median([r[key] for r in runs])
        elif first is not None:
            out[key] = round(float(np.median([r[key] for r in runs])), 3)
    return out


def format_table(result: dict[str, Any]) -> str:
    head = (
        f"{'payload':13} {'codec':7} {'prod CPU':>9} {'broker':>7} {'cons CPU':>9} "
        f"{'rec/s':>7} {'ratio':>6} {'RSS+MB':>7} {'k=1 p50/p99 ms':>15} {'k=20 p50/p99 ms':>16}"
    )
    lines = [head, "(CPU in ms per 1,000 records; ratio = compressed/raw batch bytes)"]
    for name, by_codec in result["median"].items():
        for codec, m in by_codec.items():
            one, twenty = m["send_flush_1"], m["send_flush_20"]
            lines.append(
                f"{name:13} {codec:7} {m['produce_cpu_ms_per_1k']:9.1f} "
                f"{m['broker_cpu_ms_per_1k']:7.1f} {m['consume_cpu_ms_per_1k']:9.1f} "
                f"{m['produce_records_per_s']:7.0f} {m.get('compression_rate', 1.0):6.2f} "
                f"{m['broker_rss_growth_mb']:7.1f} "
                f"{one['p50_ms']:7.2f}/{one['p99_ms']:<7.2f} {twenty['p50_ms']:7.2f}/"
                f"{twenty['p99_ms']:<7.2f}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--codec", action="append", choices=["none", "gzip", "snappy", "lz4", "zstd"]
    )
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=300, help="send+flush rounds per k")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    result = run(
        args.codec or ["none", "lz4", "zstd", "snappy", "gzip"],
        args.records,
        args.rounds,
        args.repeats,
    )
    sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
    sys.stderr.write(format_table(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
