"""The CLI as a user runs it, as child processes: `streamrec broker`, and `streamrec up` fed by
`streamrec replay`, read by `streamrec tail`, scraped on its metrics port, stopped by Ctrl-C."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from pipeline.broker import free_port, wait_for_broker
from pipeline.config import KafkaConfig, TopicsConfig
from pipeline.kafka import ensure_topics
from tests.integration.support import up_flags, wait_for

pytestmark = pytest.mark.integration


def _streamrec(*args: str, **kwargs) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMREC_")}
    return subprocess.Popen([sys.executable, "-m", "workers", *args], env=env, **kwargs)


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMREC_")}
    return subprocess.run(
        [sys.executable, "-m", "workers", *args],
        env=env,
        timeout=timeout,
        capture_output=True,
        text=True,
    )


def _start_broker_command(port: int, prefix: str) -> tuple[subprocess.Popen, str]:
    """`streamrec broker` on `port`, and its "broker ready" line once it has made the topics."""
    proc = _streamrec(
        "broker",
        "--broker-port",
        str(port),
        "--topics-prefix",
        prefix,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    line = ""
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if "broker ready" in line or not line:
            break
    return proc, line


def test_broker_command_serves_creates_topics_and_stops_on_sigterm():
    port = free_port()
    proc, line = _start_broker_command(port, "cli.")
    try:
        assert "broker ready" in line
        created = ensure_topics(
            KafkaConfig(bootstrap_servers=f"127.0.0.1:{port}"),
            f"127.0.0.1:{port}",
            TopicsConfig(prefix="cli."),
        )
        assert created == []  # the command already created all six, idempotently
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        proc.stderr.close()


def test_broker_command_exits_non_zero_when_its_broker_dies():
    port = free_port()
    proc, line = _start_broker_command(port, "dead.")
    try:
        match = re.search(r"pid (\d+)", line)
        assert match, line
        os.kill(int(match.group(1)), signal.SIGKILL)  # the Tansu process, not the command
        _, rest = proc.communicate(timeout=30)  # it polls every 0.5 s
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == 1
    assert (
        f"embedded broker on 127.0.0.1:{port} (pid {match.group(1)}) died, killed by SIGKILL"
        in rest
    )


def test_up_replay_tail_metrics_and_ctrl_c(data_dir, tmp_path):
    shutil.copytree(data_dir / "models", tmp_path / "models")
    shutil.copytree(data_dir / "cache", tmp_path / "cache")
    port, updater_port, scorer_port = free_port(), free_port(), free_port()
    common = up_flags(port, tmp_path, updater=updater_port, scorer=scorer_port)
    up = _streamrec("up", *common)
    try:
        wait_for_broker(f"127.0.0.1:{port}", 60)
        replay = _run(
            "replay", "--dataset", "synthetic", "--limit", "300", "--rate", "300", *common
        )
        assert replay.returncode == 0, replay.stderr
        assert "replayed 300 events" in replay.stdout
        # 20, not 3: the first recommendations may come before the scorer's table reader has
        # read the replayed items (not in the model's catalog), and then cite no history item.
        tail = _run("tail", "--from-beginning", "--max", "20", "--timeout-s", "90", *common)
        assert tail.returncode == 0, tail.stderr
        # A trending slot's reason reads "Trending now ...; because you interacted with ...".
        assert tail.stdout.count("user ") == 20
        assert "because you interacted with" in tail.stdout.lower()
        page = urllib.request.urlopen(f"http://127.0.0.1:{updater_port}/metrics", timeout=10).read()
        assert (
            b'streamrec_messages_consumed_total{topic="streamrec.events",worker="updater"}' in page
        )
        assert b'streamrec_stage_seconds_bucket{le="0.001",stage="poll",worker="updater"}' in page
    finally:
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=60) == 0

    def updater_gone() -> bool:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{updater_port}/metrics", timeout=2)
        except OSError:
            return True
        return False

    wait_for(updater_gone, 10, "the updater child to stop with `up`")  # every child stops with it
