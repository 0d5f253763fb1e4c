"""`KafkaSink`: the producer behind every worker's loop; a flush that fails on a producer the
broker restart broke resends on a new one."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from pipeline.config import KafkaConfig
from pipeline.errors import BrokerError
from pipeline.kafka.client import (
    ClosingClient,
    KafkaProducer,
    client_settings,
    kafka_codec,
    kafka_errors,
    wrap_error,
)
from pipeline.kafka.passthrough import passthrough_settings

__all__ = ["KafkaSink", "producer_compression", "AUTO_CODECS"]

log = logging.getLogger(__name__)

# kafka.compression_type=auto takes the first of these kafka-python can write: lz4 (half the
# bytes at the same latency), then zstd (a third of the bytes, more producer CPU).
AUTO_CODECS = ("lz4", "zstd")


def _kafka_python_has(codec: str) -> bool:
    return bool({"lz4": kafka_codec.has_lz4, "zstd": kafka_codec.has_zstd}[codec]())


def producer_compression(
    setting: str, has_codec: Callable[[str], bool] = _kafka_python_has
) -> str | None:
    """kafka-python's `compression_type` for `kafka.compression_type`: None for none; for auto
    the first of AUTO_CODECS `has_codec` accepts, else None with a warning."""
    if setting == "none":
        return None
    if setting != "auto":
        return setting  # a named codec: config checked at load that its module imports
    for codec in AUTO_CODECS:
        if has_codec(codec):
            return codec
    log.warning(
        "kafka.compression_type=auto: kafka-python finds no codec for %s installed; "
        "producing uncompressed (pip install lz4, or set kafka.compression_type)",
        " or ".join(AUTO_CODECS),
    )
    return None


class KafkaSink(ClosingClient):
    """A producer: `send()` queues, `flush()` waits and raises if any delivery failed.

    acks, linger and the compression codec come from KafkaConfig; the producer is idempotent
    (Tansu supports it). Topics are never auto-created by producing: a missing topic fails the
    send after `max_block_ms`. Created lazily on first send.

    Broker reset (measured on Tansu): the idempotent producer's id is unknown to the new broker,
    kafka-python's re-init fails fatally ("InitProducerIdRequest: UnknownError") and aborts
    every pending batch. So when records fail, `flush()` replaces the producer and sends the
    failed records once more (at-least-once; their order relative to records already
    delivered may change) before it gives up and raises.
    """

    def __init__(
        self,
        cfg: KafkaConfig,
        bootstrap: str,
        *,
        client_id: str | None = None,
        idempotent: bool = True,
        max_block_ms: int | None = None,
        resend_on_failure: bool = True,
    ) -> None:
        self._cfg = cfg
        self._bootstrap = bootstrap
        self._client_id = client_id
        self._idempotent = idempotent
        self._max_block_ms = max_block_ms if max_block_ms is not None else cfg.request_timeout_ms
        self._resend = resend_on_failure
        self._producer: KafkaProducer | None = None
        self._failed: list[tuple[tuple[str, bytes | None, bytes], BaseException]] = []
        self._lock = threading.Lock()

    def _client(self) -> KafkaProducer:
        if self._producer is None:
            settings = client_settings(self._cfg, self._bootstrap)
            settings.update(
                client_id=self._client_id or self._cfg.client_id,
                acks=-1 if self._cfg.acks == "all" else int(self._cfg.acks),
                linger_ms=self._cfg.linger_ms,
                batch_size=self._cfg.producer_batch_bytes,
                enable_idempotence=self._idempotent and self._cfg.acks == "all",
                allow_auto_create_topics=False,
                max_block_ms=self._max_block_ms,
                compression_type=producer_compression(self._cfg.compression_type),
            )
            settings.update(passthrough_settings(self._cfg, "producer"))
            try:
                self._producer = KafkaProducer(**settings)
            except kafka_errors.KafkaError as exc:
                raise wrap_error(f"connecting a producer to {self._bootstrap}", exc) from exc
        return self._producer

    def send(self, topic: str, key: bytes | None, value: bytes) -> None:
        """Queue one record (partitioned by key). Delivery errors surface in `flush()`.

        Raises BrokerError when the record cannot even be queued (e.g. unknown topic).
        """
        try:
            future = self._client().send(topic, key=key, value=value)
        except kafka_errors.KafkaError as exc:
            raise wrap_error(f"producing to {topic!r}", exc) from exc
        future.add_errback(self._on_failed, (topic, key, value))

    def _on_failed(self, record: tuple[str, bytes | None, bytes], exc: BaseException) -> None:
        with self._lock:  # runs on kafka-python's IO thread
            self._failed.append((record, exc))

    def _take_failed(self) -> list[tuple[tuple[str, bytes | None, bytes], BaseException]]:
        with self._lock:
            failed, self._failed = self._failed, []
        return failed

    def flush(self, timeout_s: float) -> None:
        """Wait until every queued record is acknowledged.

        Raises BrokerError when the wait times out or records since the last flush failed
        (after one resend on a fresh producer, see the class docstring).
        """
        if self._producer is None:
            return
        deadline = time.monotonic() + timeout_s
        self._flush_until(deadline)
        failed = self._take_failed()
        if failed and self._resend:
            log.warning(
                "%d record(s) failed (%s: %s); resending them on a new producer",
                len(failed),
                type(failed[0][1]).__name__,
                failed[0][1],
            )
            self.recreate()
            for (topic, key, value), _ in failed:
                self.send(topic, key, value)
            self._flush_until(deadline)
            failed = self._take_failed()
        if failed:
            error = failed[0][1]
            raise BrokerError(
                f"{len(failed)} record(s) not delivered to {self._bootstrap}; "
                f"first error: {type(error).__name__}: {error}"
            )

    def _flush_until(self, deadline: float) -> None:
        assert self._producer is not None
        timeout_s = max(0.0, deadline - time.monotonic())
        try:
            self._producer.flush(timeout=timeout_s)
        except kafka_errors.KafkaError as exc:
            raise wrap_error(f"flushing the producer to {self._bootstrap}", exc) from exc

    def recreate(self) -> None:
        """Drop the producer (records not yet delivered are lost); the next send builds one."""
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                producer.close(timeout=1.0)
            except Exception as exc:  # a producer in a fatal state may fail to close cleanly
                log.warning("closing a failed producer: %s", exc)

    def close(self, timeout_s: float = 10.0) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            producer.close(timeout=timeout_s)

    def __repr__(self) -> str:
        return f"KafkaSink({self._bootstrap})"
