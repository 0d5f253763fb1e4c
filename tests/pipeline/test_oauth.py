"""SASL/OAUTHBEARER: settings checked at load, a token provider in every client's settings, the
token file read on every authentication, the token endpoint asked once per token lifetime, and
kafka-python's OAUTHBEARER mechanism sending what the provider gives."""

from __future__ import annotations

import base64
import http.server
import json
import threading
import urllib.parse
from collections.abc import Iterator
from typing import ClassVar

import pytest

from pipeline.config import KafkaConfig, load
from pipeline.errors import BrokerError, ConfigError
from pipeline.kafka import client_settings
from pipeline.kafka.oauth import REFRESH_MARGIN_S, ClientCredentialsTokenProvider, FileTokenProvider

from kafka.net.sasl.oauth import AbstractTokenProvider, SaslMechanismOAuth  # isort: skip

SECRET = "oauth-client-s3cret"


def _oauth(**settings: str) -> KafkaConfig:
    env = {
        "STREAMREC_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "STREAMREC_KAFKA_SASL_MECHANISM": "OAUTHBEARER",
    }
    env.update({f"STREAMREC_KAFKA_{k.upper()}": v for k, v in settings.items()})
    return load(env=env).kafka


@pytest.mark.parametrize(
    ("settings", "setting"),
    [
        ({}, "kafka.sasl_oauth_token_file"),
        (
            {"sasl_oauth_token_file": "/t", "sasl_oauth_token_url": "https://idp/token"},
            "kafka.sasl_oauth_token_file",
        ),
        ({"sasl_oauth_token_url": "https://idp/token"}, "kafka.sasl_oauth_client_id"),
        (
            {"sasl_oauth_token_url": "https://idp/token", "sasl_oauth_client_id": "c"},
            "kafka.sasl_oauth_client_secret",
        ),
        (
            {
                "sasl_oauth_token_url": "http://idp.example.net/token",
                "sasl_oauth_client_id": "c",
                "sasl_oauth_client_secret": SECRET,
            },
            "kafka.sasl_oauth_token_url",
        ),
    ],
)
def test_oauthbearer_settings_are_checked_at_load(settings, setting):
    with pytest.raises(ConfigError, match=setting.replace(".", r"\.")) as info:
        _oauth(**settings)
    assert SECRET not in str(info.value)


def test_the_client_secret_is_a_secret_and_may_come_from_a_file(tmp_path):
    (tmp_path / "secret").write_text(SECRET + "\n")
    cfg = load(
        env={
            "STREAMREC_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "STREAMREC_KAFKA_SASL_MECHANISM": "OAUTHBEARER",
            "STREAMREC_KAFKA_SASL_OAUTH_TOKEN_URL": "https://idp.example.net/token",
            "STREAMREC_KAFKA_SASL_OAUTH_CLIENT_ID": "streamrec",
            "STREAMREC_KAFKA_SASL_OAUTH_CLIENT_SECRET_FILE": str(tmp_path / "secret"),
        }
    )
    assert cfg.kafka.sasl_oauth_client_secret == SECRET
    assert SECRET not in repr(cfg) and SECRET not in repr(cfg.kafka)
    assert SECRET not in repr(client_settings(cfg.kafka, "b:9093"))


def test_every_client_gets_a_token_provider_and_no_username_or_password(tmp_path):
    (tmp_path / "token").write_text("tok-1\n")
    settings = client_settings(_oauth(sasl_oauth_token_file=str(tmp_path / "token")), "b:9093")
    provider = settings["sasl_oauth_token_provider"]
    assert isinstance(provider, AbstractTokenProvider)
    assert settings["sasl_mechanism"] == "OAUTHBEARER"
    assert "sasl_plain_username" not in settings and "sasl_plain_password" not in settings
    # kafka-python's own mechanism accepts it and sends the token (RFC 7628 initial response)
    mechanism = SaslMechanismOAuth(sasl_oauth_token_provider=provider)
    assert mechanism.auth_bytes() == b"n,,\x01auth=Bearer tok-1\x01\x01"


def test_a_token_file_is_read_again_on_every_authentication(tmp_path):
    path = tmp_path / "token"
    provider = FileTokenProvider(str(path))
    with pytest.raises(BrokerError, match="sasl_oauth_token_file"):
        provider.token()
    path.write_text("first")
    assert provider.token() == "first"
    path.write_text("rotated\n")
    assert provider.token() == "rotated"
    path.write_text("  ")
    with pytest.raises(BrokerError, match="is empty"):
        provider.token()


class _TokenEndpoint(http.server.BaseHTTPRequestHandler):
    """A fake OAuth 2.0 token endpoint: client credentials with HTTP Basic auth."""

    requests: ClassVar[list[dict[str, str]]] = []
    status = 200

    def do_POST(self) -> None:
        form = dict(
            urllib.parse.parse_qsl(self.rfile.read(int(self.headers["Content-Length"])).decode())
        )
        basic = base64.b64decode(self.headers["Authorization"].removeprefix("Basic ")).decode()
        _TokenEndpoint.requests.append({**form, "basic": basic})
        body = json.dumps(
            {
                "access_token": f"tok-{len(_TokenEndpoint.requests)}",
                "token_type": "bearer",
                "expires_in": 3600,
            }
        ).encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def token_endpoint() -> Iterator[str]:
    _TokenEndpoint.requests, _TokenEndpoint.status = [], 200
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _TokenEndpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/token"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_the_endpoint_is_asked_once_per_token_lifetime(token_endpoint):
    now = [1000.0]
    provider = ClientCredentialsTokenProvider(
        token_endpoint, "streamrec", SECRET, "kafka.read kafka.write", clock=lambda: now[0]
    )
    assert provider.token() == "tok-1"
    now[0] += 3600 - REFRESH_MARGIN_S - 1
    assert provider.token() == "tok-1"  # cached
    assert _TokenEndpoint.requests == [
        {
            "grant_type": "client_credentials",
            "scope": "kafka.read kafka.write",
            "basic": f"streamrec:{SECRET}",
        }
    ]
    now[0] += 1
    assert provider.token() == "tok-2"  # refreshed ahead of its expiry
    assert SECRET not in repr(provider)


def test_the_configured_endpoint_reaches_the_clients(token_endpoint):
    cfg = _oauth(
        sasl_oauth_token_url=token_endpoint,
        sasl_oauth_client_id="streamrec",
        sasl_oauth_client_secret=SECRET,
    )
    provider = client_settings(cfg, "b:9093")["sasl_oauth_token_provider"]
    assert (
        SaslMechanismOAuth(sasl_oauth_token_provider=provider).auth_bytes()
        == b"n,,\x01auth=Bearer tok-1\x01\x01"
    )


def test_an_endpoint_that_refuses_fails_naming_it_without_the_secret(token_endpoint):
    _TokenEndpoint.status = 401
    provider = ClientCredentialsTokenProvider(token_endpoint, "streamrec", SECRET)
    with pytest.raises(BrokerError, match=r"answered HTTP 401 for client 'streamrec'") as info:
        provider.token()
    assert "sasl_oauth_token_url" in str(info.value) and SECRET not in str(info.value)
