"""The issue's two poison pills through `streamrec up` against the real broker: after each, a
fresh user's event is still answered, and no worker restarts."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.request

import orjson
import pytest
from kafka import KafkaProducer

from pipeline.broker import free_port, wait_for_broker
from pipeline.config import ValidationConfig
from tests.integration.support import NOW_MS, drain, up_flags, wait_for

pytestmark = pytest.mark.integration

PREFIX = "pill."


def _metrics(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def _sample(page: str, name: str, labels: str = "") -> float | None:
    match = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", page, re.M)
    return float(match.group(1)) if match else None


def test_poison_pills_are_dead_lettered_and_every_canary_is_answered(data_dir, tmp_path):
    shutil.copytree(data_dir / "models", tmp_path / "models")
    shutil.copytree(data_dir / "cache", tmp_path / "cache")
    port = free_port()
    ports = {name: free_port() for name in ("updater", "scorer", "finetune", "supervisor")}
    args = [*up_flags(port, tmp_path, **ports), "--topics-prefix", PREFIX]
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMREC_")}
    up = subprocess.Popen([sys.executable, "-m", "workers", "up", *args], env=env)
    bootstrap = f"127.0.0.1:{port}"
    try:
        wait_for_broker(bootstrap, 60)
        producer = KafkaProducer(
            bootstrap_servers=bootstrap, linger_ms=1, max_request_size=1_100_000
        )
        deep = (
            orjson.dumps(
                {
                    "event_id": "deep",
                    "user_id": "u-deep",
                    "item_id": "m1",
                    "type": "click",
                    "ts": NOW_MS - 5,
                }
            )[:-1]
            + b',"context":'
            + b'{"a":' * 300
            + b"{}"
            + b"}" * 300
            + b"}"
        )
        pills = [(b"u-pill", b"\x01" * 1_000_000), (b"u-deep", deep)]
        for n, (key, value) in enumerate(pills):
            producer.send(PREFIX + "events", key=key, value=value)
            canary = f"canary-{n}"
            producer.send(
                PREFIX + "events",
                key=canary.encode(),
                value=orjson.dumps(
                    {
                        "event_id": canary,
                        "user_id": canary,
                        "item_id": "m3",
                        "type": "click",
                        "ts": NOW_MS - 1,
                    }
                ),
            )
            producer.flush(30)
            recs = drain(
                bootstrap,
                PREFIX + "recommendations",
                lambda values, c=canary: any(v["trigger_event_id"] == c for v in values),
                timeout_s=120,
            )
            assert any(r["trigger_event_id"] == canary and r["items"] for r in recs), canary
        producer.close()

        letters = drain(bootstrap, PREFIX + "dlq", lambda values: len(values) >= 2, 60)
        assert sorted(d["reason"] for d in letters) == ["limit_exceeded", "not_json"]
        bound = ValidationConfig().dead_letter_max_bytes
        assert all(len(orjson.dumps(d)) <= bound for d in letters)
        (big,) = [d for d in letters if d["reason"] == "not_json"]
        assert big["value_truncated"] and big["value_length"] == 1_000_000

        # The fine-tune worker stored both canaries (it used to crash-loop on the deep one).
        wait_for(
            lambda: (
                (
                    _sample(
                        _metrics(ports["finetune"]),
                        "streamrec_finetune_feedback_events",
                        '{worker="finetune"}',
                    )
                    or 0
                )
                >= 2
            ),
            90,
            "the fine-tune worker to store the canaries",
        )
        page = _metrics(ports["supervisor"])
        for worker in ("updater", "finetune"):  # co-located scoring: no scorer under up
            assert _sample(page, "streamrec_up_child_running", f'{{worker="{worker}"}}') == 1.0
            assert not _sample(
                page, "streamrec_up_child_restarts_total", f'{{worker="{worker}"}}'
            ), f"{worker} restarted"
        assert up.poll() is None
    finally:
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=60) == 0
