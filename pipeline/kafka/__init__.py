"""The Kafka adapter: the only package that imports kafka-python.

Builds producers, consumers and admin clients from `KafkaConfig` plus a bootstrap string, with the
latency/group knobs measured in DESIGN.md and one shared security block (`client_settings`).
Offers `ensure_topics`, `KafkaSource` (group consumer with rebalance hooks), `TableReader` (every
partition from the beginning, no group), `KafkaSink` (producer) and
`RouteCheck` (keyed records on a partition other than murmur2 gives them). Wraps
kafka-python errors into BrokerError; records leave as `pipeline.messages.Record`. No loops.

Broker restart, measured on Tansu 0.6.0 (memory) with kafka-python 3.0.12 (every topic, message
and committed offset is lost); the clients survive it without being recreated:
  1. Clients reconnect by themselves (backoff capped at 1 s here).
  2. Tansu ignores allow_auto_topic_creation=false: a group consumer's metadata request recreates
     its topics with the broker's default count (4 partitions, not settable); call
     `ensure_topics` at once anyway. With topics.partitions != 4 (the default is 2) a consumer
     that reached the new broker first would bring a topic back with 4 partitions, and users
     whose partition changes would start from empty state there. Creating the topics right after
     the restart wins that race in practice (chaos broker-loss with 2 partitions: 0 lost, 0 state
     mismatches), but nothing closes it; ensure_topics warns when a count differs.
  3. The idempotent producer's re-init fails fatally; `KafkaSink.flush` resends on a new producer.
  4. The group coordinator forgot the member: commit() returns False until the heartbeat notices
     and the next poll() rejoins (on_revoke/on_assign run again); no committed offsets remain.
  5. Every topic comes back with a new topic id, and a fetch beyond the new log end returns no
     records and no OFFSET_OUT_OF_RANGE, only a lower highwater. Sources rewind the partitions
     of a topic whose id changed, and any partition whose position is beyond its log end, to
     their beginning (`take_rewound()`). The id check also catches a client that reconnects
     only after the new log grew past its old position (the end check cannot).
  6. kafka-python leaks the socket of each refused connect (ResourceWarning when collected).

Tansu 0.6.0 (memory storage) lists every stored record batch of a partition inside each fetch
and stops listing when the fetch's max wait has passed, so once a partition holds more batches
than it can list within `fetch_max_wait_ms`, a consumer near its end gets empty fetches (with the
true highwater) and no error, forever: ~20,000 batches at 10 ms, ~2,000-5,000 at 1 ms; at 60,000
batches 50 ms still answers (0.12 s). Consumers raise their wait when that happens
(`FetchWait`, up to `kafka.fetch_max_wait_ceiling_ms`); the listing still costs the broker CPU
in proportion to the batches on every fetch, so producers on the embedded broker should batch.

Group membership after a crash, measured on Tansu 0.6.0 with kafka-python 3.0.12 (4 partitions):
  - A JoinGroup is held ~3 s with session_timeout_ms=6000 (~2 s with 2500-4000, ~1 s with 2000).
  - A process that joins while its SIGKILLed predecessor's session is still alive is handed a
    generation led by the dead member, waits in SyncGroup until that session expires, and joins
    again: 10-15 s instead of 3 s. Joining again under the dead member's id (`MemberSlot`) makes
    it one plain join (3 s), whenever it happens, and the other members keep their partitions.
  - Static membership (group_instance_id) costs a 3 s JoinGroup plus a 3 s SyncGroup on every
    join (6 s), and static members send no LeaveGroup on close, so it is not used.
  - The JoinGroup/SyncGroup exchange only advances inside poll(); `KafkaSource.start_join`
    polls in a thread while the worker still imports and loads its model.
  - kafka-python 3.0.12 throws away a join that finished between two polls and joins again
    (+3 s, and a new round for every member); `_keep_finished_joins` patches that.
"""

from __future__ import annotations

from pipeline.kafka.admin import describe_group, ensure_topics, replication_factor
from pipeline.kafka.client import KEEPS_FINISHED_JOINS, TP, client_settings
from pipeline.kafka.membership import MemberSlot
from pipeline.kafka.routing import RouteCheck
from pipeline.kafka.sink import KafkaSink
from pipeline.kafka.source import KafkaSource
from pipeline.kafka.table import TableReader

__all__ = [
    "client_settings",
    "ensure_topics",
    "replication_factor",
    "describe_group",
    "KafkaSource",
    "TableReader",
    "KafkaSink",
    "RouteCheck",
    "MemberSlot",
    "TP",
    "KEEPS_FINISHED_JOINS",
]
