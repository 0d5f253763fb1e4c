"""SASL/OAUTHBEARER token providers for kafka-python (`sasl_oauth_token_provider`).

`FileTokenProvider` reads a token file each time a connection authenticates (rotated files,
such as Kubernetes projected service-account tokens, are picked up without a restart).
`ClientCredentialsTokenProvider` asks an OAuth 2.0 token endpoint (client credentials grant,
RFC 6749 section 4.4, client authenticated with HTTP Basic) and reuses the token until shortly
before it expires. Neither ever shows the client secret or a token in repr() or an error.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

# kafka-python is already imported, its warnings silenced, by pipeline/kafka/client.py, which
# the package imports first and which imports this module.
from kafka.net.sasl.oauth import AbstractTokenProvider

from pipeline.config import KafkaConfig
from pipeline.errors import BrokerError

__all__ = [
    "FileTokenProvider",
    "ClientCredentialsTokenProvider",
    "token_provider",
    "REFRESH_MARGIN_S",
]

# A token is fetched again this long before it expires (or at half its life, if shorter), so a
# connection never authenticates with one that expires on the way.
REFRESH_MARGIN_S = 60.0
_HTTP_TIMEOUT_S = 10.0

Opener = Callable[[urllib.request.Request, float], Any]


def _urlopen(request: urllib.request.Request, timeout_s: float) -> Any:
    return urllib.request.urlopen(request, timeout=timeout_s)


class FileTokenProvider(AbstractTokenProvider):  # type: ignore[misc]  # kafka is untyped
    """The token is the content of `path` (surrounding whitespace removed), read on every call."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self._path = Path(path)

    def token(self) -> str:
        try:
            text = self._path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise BrokerError(
                f"cannot read the OAUTHBEARER token file {self._path} "
                f"(kafka.sasl_oauth_token_file): {exc.strerror}"
            ) from None
        if not text:
            raise BrokerError(
                f"the OAUTHBEARER token file {self._path} (kafka.sasl_oauth_token_file) is empty"
            )
        return text

    def __repr__(self) -> str:
        return f"FileTokenProvider({str(self._path)!r})"


class ClientCredentialsTokenProvider(AbstractTokenProvider):  # type: ignore[misc]
    """Tokens from `url` for `client_id`/`client_secret` (and `scope`, if any), cached until
    REFRESH_MARGIN_S before `expires_in` runs out (a token without `expires_in` is fetched
    again after 5 minutes). `clock` and `opener` are for tests. Thread-safe: kafka-python may
    authenticate several connections at once."""

    def __init__(
        self,
        url: str,
        client_id: str,
        client_secret: str,
        scope: str = "",
        *,
        clock: Callable[[], float] = time.monotonic,
        opener: Opener = _urlopen,
    ) -> None:
        super().__init__()
        self._url = url
        self._client_id = client_id
        # What every request sends is fixed by the settings: built once, not per fetch.
        form = {"grant_type": "client_credentials"}
        if scope:
            form["scope"] = scope
        self._form = urllib.parse.urlencode(form).encode()
        basic = base64.b64encode(
            f"{urllib.parse.quote(client_id, safe='')}:"
            f"{urllib.parse.quote(client_secret, safe='')}".encode()
        ).decode()
        self._authorization = f"Basic {basic}"
        self._clock = clock
        self._opener = opener
        self._lock = threading.Lock()
        self._token = ""
        self._refresh_at = float("-inf")

    def token(self) -> str:
        with self._lock:
            if self._clock() >= self._refresh_at:
                self._token, lifetime_s = self._fetch()
                self._refresh_at = self._clock() + max(
                    lifetime_s - REFRESH_MARGIN_S, lifetime_s / 2
                )
            return self._token

    def _fetch(self) -> tuple[str, float]:
        request = urllib.request.Request(
            self._url,
            data=self._form,
            method="POST",
            headers={
                "Authorization": self._authorization,
                "Accept": "application/json",
                "Content-Type": "application/x-www-form-urlencoded",
            },
        )
        where = f"the OAUTHBEARER token endpoint {self._url} (kafka.sasl_oauth_token_url)"
        try:
            with self._opener(request, _HTTP_TIMEOUT_S) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise BrokerError(
                f"{where} answered HTTP {exc.code} for client {self._client_id!r}"
            ) from None
        except (OSError, ValueError) as exc:
            raise BrokerError(f"{where} failed: {type(exc).__name__}: {exc}") from None
        token = body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise BrokerError(f"{where} answered without an access_token")
        expires_in = body.get("expires_in", 300)
        try:
            lifetime_s = float(expires_in)
        except (TypeError, ValueError):
            lifetime_s = 300.0
        return token, max(lifetime_s, 0.0)

    def __repr__(self) -> str:
        return f"ClientCredentialsTokenProvider({self._url!r}, client {self._client_id!r})"


def token_provider(cfg: KafkaConfig) -> AbstractTokenProvider:
    """The provider `cfg` configures (config checked that exactly one source is set)."""
    if cfg.sasl_oauth_token_file:
        return FileTokenProvider(cfg.sasl_oauth_token_file)
    return ClientCredentialsTokenProvider(
        cfg.sasl_oauth_token_url,
        cfg.sasl_oauth_client_id,
        cfg.sasl_oauth_client_secret,
        cfg.sasl_oauth_scope,
    )
