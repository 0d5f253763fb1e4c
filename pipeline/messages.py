"""Typed messages: the in-memory form of every value on a streamrec topic.

`from_dict` expects a dict that already passed its JSON Schema (see codec.py); `to_dict`
produces what the schema accepts. Unknown extra fields are dropped on decode (producers may be
newer than workers). No I/O here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = [
    "EVENT_TYPES",
    "EVENT_TYPE_INDEX",
    "TRENDING_ONLY",
    "Event",
    "Item",
    "UserVector",
    "RecommendedItem",
    "Recommendation",
    "ModelUpdate",
    "DeadLetter",
    "Record",
]

EVENT_TYPES = ("view", "click", "add_to_cart", "purchase", "rating")
# The model's event-type codes (an embedding row each), stored packed in user state: never reorder.
EVENT_TYPE_INDEX: Mapping[str, int] = MappingProxyType({t: i for i, t in enumerate(EVENT_TYPES)})

# The model_version of a UserVector and Recommendation made before any model was published: the
# vector is empty ([0.0]) and the scorer ranks trending items (registry versions are v + digits).
TRENDING_ONLY = "trending"


@dataclass(frozen=True, slots=True)
class Record:
    """A raw consumed Kafka record, before decoding."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int = 0


@dataclass(frozen=True, slots=True)
class Event:
    event_id: str
    user_id: str
    item_id: str
    type: str
    ts: int
    value: float | None = None
    rec_id: str | None = None
    context: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Event:
        return cls(
            d["event_id"],
            d["user_id"],
            d["item_id"],
            d["type"],
            d["ts"],
            d.get("value"),
            d.get("rec_id"),
            d.get("context"),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "event_id": self.event_id,
            "user_id": self.user_id,
            "item_id": self.item_id,
            "type": self.type,
            "ts": self.ts,
        }
        if self.value is not None:
            out["value"] = self.value
        if self.rec_id is not None:
            out["rec_id"] = self.rec_id
        if self.context is not None:
            out["context"] = self.context
        return out


@dataclass(frozen=True, slots=True)
class Item:
    item_id: str
    ts: int
    title: str = ""
    description: str | None = None
    categories: tuple[str, ...] = ()
    attributes: dict[str, Any] | None = None
    available: bool = True

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Item:
        return cls(
            d["item_id"],
            d["ts"],
            d.get("title", ""),
            d.get("description"),
            tuple(d.get("categories") or ()),
            d.get("attributes"),
            d.get("available", True),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"item_id": self.item_id, "ts": self.ts, "available": self.available}
        if self.title:
            out["title"] = self.title
        if self.description is not None:
            out["description"] = self.description
        if self.categories:
            out["categories"] = list(self.categories)
        if self.attributes is not None:
            out["attributes"] = self.attributes
        return out

    def text(self) -> str:
        """What the text encoder reads: title, categories and description."""
        parts = [self.title]
        if self.categories:
            parts.append("Categories: " + ", ".join(self.categories))
        if self.description:
            parts.append(self.description)
        return ". ".join(p for p in parts if p)


@dataclass(frozen=True, slots=True)
class UserVector:
    user_id: str
    model_version: str
    vector: tuple[float, ...]
    history: tuple[str, ...]
    event_ts: int
    updated_at: int
    history_types: tuple[str, ...] = ()
    trigger_event_id: str | None = None
    trigger: str | None = None
    trigger_produced_at: int | None = None
    new_items: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UserVector:
        return cls(
            d["user_id"],
            d["model_version"],
            tuple(d["vector"]),
            tuple(d["history"]),
            d["event_ts"],
            d["updated_at"],
            tuple(d.get("history_types") or ()),
            d.get("trigger_event_id"),
            d.get("trigger"),
            d.get("trigger_produced_at"),
            tuple(d.get("new_items") or ()),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "user_id": self.user_id,
            "model_version": self.model_version,
            "vector": list(self.vector),
            "history": list(self.history),
            "history_types": list(self.history_types),
            "event_ts": self.event_ts,
            "updated_at": self.updated_at,
            "trigger_event_id": self.trigger_event_id,
            "trigger": self.trigger,
            "trigger_produced_at": self.trigger_produced_at,
            "new_items": list(self.new_items),
        }


@dataclass(frozen=True, slots=True)
class RecommendedItem:
    item_id: str
    score: float
    rank: int
    explore: bool
    reason: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "item_id": self.item_id,
            "score": self.score,
            "rank": self.rank,
            "explore": self.explore,
            "reason": self.reason,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RecommendedItem:
        return cls(d["item_id"], d["score"], d["rank"], d["explore"], d["reason"])


@dataclass(frozen=True, slots=True)
class Recommendation:
    rec_id: str
    user_id: str
    model_version: str
    generated_at: int
    trigger_event_id: str | None
    items: tuple[RecommendedItem, ...]
    trigger: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recommendation:
        return cls(
            d["rec_id"],
            d["user_id"],
            d["model_version"],
            d["generated_at"],
            d["trigger_event_id"],
            tuple(RecommendedItem.from_dict(i) for i in d["items"]),
            d.get("trigger"),
        )

    def to_dict(self) -> dict[str, Any]:
        out = {
            "rec_id": self.rec_id,
            "user_id": self.user_id,
            "model_version": self.model_version,
            "generated_at": self.generated_at,
            "trigger_event_id": self.trigger_event_id,
            "items": [i.to_dict() for i in self.items],
        }
        if self.trigger is not None:
            out["trigger"] = self.trigger
        return out


@dataclass(frozen=True, slots=True)
class ModelUpdate:
    version: str
    uri: str
    created_at: int
    parent_version: str | None
    metrics: dict[str, float | None] = field(default_factory=dict)
    trained_on_events: int = 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelUpdate:
        return cls(
            d["version"],
            d["uri"],
            d["created_at"],
            d["parent_version"],
            dict(d["metrics"]),
            d["trained_on_events"],
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "uri": self.uri,
            "created_at": self.created_at,
            "parent_version": self.parent_version,
            "metrics": self.metrics,
            "trained_on_events": self.trained_on_events,
        }


@dataclass(frozen=True, slots=True)
class DeadLetter:
    topic: str
    partition: int
    offset: int
    key: str | None
    value: str | None
    value_encoding: str
    value_truncated: bool
    error: str
    reason: str
    field: str | None
    worker: str
    ts: int
    key_truncated: bool = False
    key_length: int | None = None  # of the whole raw key / value, before any cut
    value_length: int | None = None
    value_sha256: str | None = None  # hex SHA-256 of the whole raw value

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DeadLetter:
        return cls(
            d["topic"],
            d["partition"],
            d["offset"],
            d["key"],
            d["value"],
            d["value_encoding"],
            d["value_truncated"],
            d["error"],
            d["reason"],
            d.get("field"),
            d["worker"],
            d["ts"],
            d.get("key_truncated", False),
            d.get("key_length"),
            d.get("value_length"),
            d.get("value_sha256"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "key": self.key,
            "value": self.value,
            "value_encoding": self.value_encoding,
            "value_truncated": self.value_truncated,
            "error": self.error,
            "reason": self.reason,
            "field": self.field,
            "worker": self.worker,
            "ts": self.ts,
            "key_truncated": self.key_truncated,
            "key_length": self.key_length,
            "value_length": self.value_length,
            "value_sha256": self.value_sha256,
        }
