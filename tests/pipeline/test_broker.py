"""pipeline.broker failure paths that need no real broker: clear BrokerErrors, idempotent stop."""

from __future__ import annotations

import os
import socket
import stat
import time
from pathlib import Path

import pytest

from pipeline.broker import EmbeddedBroker, free_port, wait_for_broker
from pipeline.config import BrokerConfig
from pipeline.errors import BrokerError


def _script(tmp_path: Path, body: str) -> str:
    path = tmp_path / "fake-tansu"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_missing_binary_is_named() -> None:
    broker = EmbeddedBroker(BrokerConfig(port=free_port(), binary="/nonexistent/tansu"))
    with pytest.raises(BrokerError, match="/nonexistent/tansu"):
        broker.start()


def test_port_in_use_is_reported_before_launching(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        broker = EmbeddedBroker(BrokerConfig(port=port, binary=_script(tmp_path, "exit 0")))
        with pytest.raises(BrokerError, match=f"127.0.0.1:{port} is already in use"):
            broker.start()
        assert not broker.running()


def test_early_exit_reports_code_and_last_log_lines(tmp_path: Path) -> None:
    binary = _script(tmp_path, "echo starting up; echo 'fatal: storage engine refused' >&2; exit 3")
    broker = EmbeddedBroker(BrokerConfig(port=free_port(), binary=binary, start_timeout_s=10))
    started = time.monotonic()
    with pytest.raises(BrokerError) as info:
        broker.start()
    assert time.monotonic() - started < 5  # a dead process fails fast, not at the deadline
    assert "exited with code 3" in str(info.value)
    assert "fatal: storage engine refused" in str(info.value)
    assert not broker.running()


def test_the_broker_log_file_is_private(tmp_path: Path) -> None:
    binary = _script(tmp_path, "echo a client connected from 10.0.0.7; exit 3")
    log_path = tmp_path / "tansu.log"
    old = os.umask(0o002)
    try:
        broker = EmbeddedBroker(
            BrokerConfig(port=free_port(), binary=binary, start_timeout_s=10), log_path=log_path
        )
        with pytest.raises(BrokerError):
            broker.start()
    finally:
        os.umask(old)
    assert "10.0.0.7" in log_path.read_text()
    assert stat.S_IMODE(log_path.stat().st_mode) == 0o600


def test_not_ready_in_time_stops_the_process(tmp_path: Path) -> None:
    binary = _script(tmp_path, "exec sleep 30")
    broker = EmbeddedBroker(BrokerConfig(port=free_port(), binary=binary, start_timeout_s=0.5))
    with pytest.raises(BrokerError, match=r"not ready after 0\.5s"):
        broker.start()
    assert not broker.running() and broker.pid is None


def test_stop_is_idempotent_without_start() -> None:
    broker = EmbeddedBroker(BrokerConfig(port=free_port()))
    assert broker.stop() is None
    assert broker.stop() is None


def test_wait_for_broker_times_out_naming_the_address() -> None:
    port = free_port()
    with pytest.raises(BrokerError, match=f"127.0.0.1:{port}"):
        wait_for_broker(f"127.0.0.1:{port}", timeout_s=0.3)


def test_wait_for_broker_rejects_a_malformed_address() -> None:
    with pytest.raises(BrokerError, match="host:port"):
        wait_for_broker("localhost", timeout_s=0.1)
