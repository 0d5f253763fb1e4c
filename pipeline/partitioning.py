"""Which partition a keyed record belongs on: murmur2 of the key, as the Java client's default
partitioner, kafka-python's DefaultPartitioner and librdkafka's `murmur2_random` compute it.

The message contract (docs/DESIGN.md) names this partitioner: a worker keeps a user's state in
the partition its events arrive on, so every producer must put one user's events on one
partition. Pure and dependency-free; `KeyRouting` memoises it for the consumers' check.
"""

from __future__ import annotations

import struct

__all__ = ["murmur2", "partition_for", "KeyRouting"]

_SEED = 0x9747B28C
_M = 0x5BD1E995
_MASK = 0xFFFFFFFF


def murmur2(key: bytes) -> int:
    """MurmurHash2 (32-bit, seed 0x9747b28c) of `key` as an unsigned int: Kafka's
    `Utils.murmur2`, the same value as kafka-python's `kafka.partitioner.default.murmur2`."""
    length = len(key)
    h = (_SEED ^ length) & _MASK
    whole = length & ~3
    for (k,) in struct.iter_unpack("<I", key[:whole]):
        k = (k * _M) & _MASK
        k ^= k >> 24
        k = (k * _M) & _MASK
        h = ((h * _M) & _MASK) ^ k
    tail = length & 3
    if tail:
        if tail >= 3:
            h ^= key[whole + 2] << 16
        if tail >= 2:
            h ^= key[whole + 1] << 8
        h ^= key[whole]
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h


def partition_for(key: bytes, partitions: int) -> int:
    """The partition murmur2 gives `key` among `partitions`: `(murmur2 & 0x7fffffff) % n`."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


class KeyRouting:
    """`partition_for` with a bounded memo of the positive hash per key: one user's events
    repeat their key, so most lookups are a dict hit instead of a hash in Python."""

    def __init__(self, capacity: int = 65_536) -> None:
        self._capacity = capacity
        self._hashes: dict[bytes, int] = {}

    def partition_for(self, key: bytes, partitions: int) -> int:
        h = self._hashes.get(key)
        if h is None:
            if len(self._hashes) >= self._capacity:
                self._hashes.clear()  # cheaper than LRU bookkeeping; refills from live keys
            h = self._hashes[key] = murmur2(key) & 0x7FFFFFFF
        return h % partitions
