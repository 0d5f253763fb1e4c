"""Bytes <-> typed messages at the edge, validated against the JSON Schema files in schemas/.

The schema files are the single source of truth: they are compiled once per Codec (fastjsonschema)
and every consumed value passes them before it becomes a typed message. Anything that fails
raises InvalidMessage with a reason class and the failing field; `dead_letter()` turns that into
the DLQ record. This module imports neither torch nor kafka-python.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fastjsonschema
import orjson

from pipeline.config import ValidationConfig
from pipeline.errors import InvalidMessage
from pipeline.messages import (
    DeadLetter,
    Event,
    Item,
    ModelUpdate,
    Recommendation,
    Record,
    UserVector,
)

__all__ = ["KINDS", "schema_dir", "load_schemas", "Decoded", "Codec", "encode", "DLQ_KEEP_BYTES"]

KINDS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "event": Event.from_dict,
    "item": Item.from_dict,
    "user_vector": UserVector.from_dict,
    "recommendation": Recommendation.from_dict,
    "model_update": ModelUpdate.from_dict,
    "dead_letter": DeadLetter.from_dict,
}

# An oversized value keeps only this much of itself in its dead letter.
DLQ_KEEP_BYTES = 1024

_REQUIRED = re.compile(r"must contain \[(.*?)\] properties")


def schema_dir() -> Path:
    """The one place that knows where the schema files live (installed next to the code)."""
    from schemas import SCHEMA_DIR

    return SCHEMA_DIR


def load_schemas() -> dict[str, dict[str, Any]]:
    return {kind: orjson.loads((schema_dir() / f"{kind}.schema.json").read_bytes()) for kind in KINDS}


@dataclass(frozen=True, slots=True)
class Decoded:
    """A consumed record that passed validation, with its typed message."""

    record: Record
    message: Any
    key_mismatch: bool = False


def encode(message: Any) -> bytes:
    return orjson.dumps(message.to_dict())


class _Ambiguous(ValueError):
    """JSON that orjson accepts but that means different things to different parsers."""

    def __init__(self, reason: str, message: str, field: str | None) -> None:
        super().__init__(message)
        self.reason, self.field = reason, field


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document = dict(pairs)
    if len(document) != len(pairs):
        seen: set[str] = set()
        duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise _Ambiguous("not_json", f"duplicate key {duplicate!r} (parsers disagree on which "
                         "value wins)", duplicate)
    return document


def _int64(text: str) -> int:
    value = int(text)
    if not -(1 << 63) <= value < (1 << 63):
        raise _Ambiguous("invalid_value", f"integer {text[:40]} is outside the signed 64-bit "
                         "range", None)
    return value


# orjson keeps the last of duplicate keys silently and turns integers beyond 2^64 into floats;
# this slower parser rejects both. It runs only when a cheap scan cannot rule them out.
_STRICT = json.JSONDecoder(object_pairs_hook=_unique_pairs, parse_int=_int64)
# Every key is a string followed by optional whitespace and ':'; inside a string a '"' is escaped,
# so this can only over-count (and send the value to the strict parser).
_KEY_TOKEN = re.compile(rb'"[ \t\n\r]*:')
# A run of 19 digits is the only way to write an integer outside int64. Found by mapping every
# byte to digit/other and searching for the run in C: ~10x faster than the regex r"\d{19}",
# which tried 19 digits at every digit of a user vector's floats (25 us per message).
_DIGIT_CLASS = bytes(0x31 if 0x30 <= b <= 0x39 else 0x30 for b in range(256))
_LONG_DIGIT_RUN = b"1" * 19


def _key_count(document: Any) -> int:
    """Keys in every object of `document` (iterative: orjson accepts 1,024 levels of nesting).

    Only containers are pushed, and a list is searched for containers with `map(type)` in C:
    a user vector's 64 floats, 50 history ids and 50 history types cost a few set() calls
    instead of 164 Python steps. orjson builds exact dicts and lists, so `type(...) is` is the
    whole test; a scalar document has no keys.
    """
    if type(document) is not dict and type(document) is not list:
        return 0
    count, stack = 0, [document]
    while stack:
        value = stack.pop()
        if type(value) is dict:
            count += len(value)
            children: Any = value.values()
        else:
            children = value
        kinds = set(map(type, children))
        if dict in kinds or list in kinds:
            stack.extend(c for c in children if type(c) is dict or type(c) is list)
    return count


def _check_strict(raw: bytes, document: dict[str, Any]) -> None:
    """Raises InvalidMessage for duplicate keys or integers outside the signed 64-bit range."""
    if (_LONG_DIGIT_RUN not in raw.translate(_DIGIT_CLASS)
            and len(_KEY_TOKEN.findall(raw)) == _key_count(document)):
        return  # as many key tokens as parsed keys: no key repeats; no number can overflow
    try:
        _STRICT.decode(raw.decode("utf-8"))
    except _Ambiguous as exc:
        raise InvalidMessage(exc.reason, f"value is ambiguous JSON: {exc}", exc.field) from None
    except RecursionError:
        raise InvalidMessage("not_json", "value nests too deeply") from None
    except ValueError as exc:
        raise InvalidMessage("not_json", f"value is not JSON: {exc}") from None


def _field_of(exc: fastjsonschema.JsonSchemaValueException) -> str | None:
    if exc.rule == "required":
        match = _REQUIRED.search(exc.message)
        if match:
            return match.group(1).split(",")[0].strip(" '\"")
    name = exc.name or ""
    path = name[len("data"):].lstrip(".")
    return path or None


_RULE_REASONS = {"required": "missing_field", "type": "wrong_type", "enum": "invalid_value",
                 "const": "invalid_value"}


class Codec:
    """Decodes and validates consumed records for one worker; builds its dead letters."""

    def __init__(self, validation: ValidationConfig, worker: str) -> None:
        self._validation = validation
        self._worker = worker
        self._validators: dict[str, Callable[[Any], Any]] | None = None

    def _validator(self, kind: str) -> Callable[[Any], Any]:
        if self._validators is None:
            self._validators = {kind: fastjsonschema.compile(schema)
                                for kind, schema in load_schemas().items()}
        return self._validators[kind]

    def decode(self, record: Record, kind: str, now_ms: int) -> Decoded:
        """Validate `record` as a `kind` message. Raises InvalidMessage (never anything else)."""
        raw = record.value
        if raw is None:
            raise InvalidMessage("null_value", "value is null (tombstone)")
        if len(raw) == 0:
            raise InvalidMessage("empty_value", "value is empty")
        if len(raw) > self._validation.max_message_bytes:
            raise InvalidMessage("too_large", f"value is {len(raw)} bytes, over the limit of "
                                 f"{self._validation.max_message_bytes} (validation.max_message_bytes)")
        try:
            document = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as utf_exc:
                raise InvalidMessage("not_utf8", f"value is not UTF-8: {utf_exc}") from None
            raise InvalidMessage("not_json", f"value is not JSON: {exc}") from None
        except RecursionError:
            raise InvalidMessage("not_json", "value nests too deeply") from None
        if not isinstance(document, dict):
            raise InvalidMessage("not_object", f"value is JSON {type(document).__name__}, not an object")
        _check_strict(raw, document)
        try:
            self._validator(kind)(document)
        except fastjsonschema.JsonSchemaValueException as exc:
            field = _field_of(exc)
            reason = _RULE_REASONS.get(exc.rule or "", "schema")
            raise InvalidMessage(reason, f"{kind} {exc.message}", field) from None
        if kind in ("event", "item"):
            self._check_ts(document["ts"], now_ms)
        message = KINDS[kind](document)
        return Decoded(record, message, self._key_mismatch(record.key, kind, document))

    def _check_ts(self, ts: int, now_ms: int) -> None:
        newest = now_ms + self._validation.max_future_ms
        if not self._validation.min_ts_ms <= ts <= newest:
            raise InvalidMessage(
                "ts_out_of_range",
                f"timestamp out of range: ts={ts} is not between validation.min_ts_ms="
                f"{self._validation.min_ts_ms} and now + validation.max_future_ms={newest} "
                "(integer milliseconds since the epoch)", "ts")

    @staticmethod
    def _key_mismatch(key: bytes | None, kind: str, document: dict[str, Any]) -> bool:
        id_field = {"event": "user_id", "user_vector": "user_id", "recommendation": "user_id",
                    "item": "item_id"}.get(kind)
        if id_field is None or key is None:
            return False
        return key != document[id_field].encode("utf-8")

    def dead_letter(self, record: Record, error: InvalidMessage, now_ms: int) -> DeadLetter:
        raw = record.value
        truncated = raw is not None and len(raw) > self._validation.max_message_bytes
        kept = raw[:DLQ_KEEP_BYTES] if truncated and raw is not None else raw
        value, encoding = _as_text(kept)
        key = None
        if record.key is not None:
            key = record.key.decode("utf-8", errors="backslashreplace")
        return DeadLetter(topic=record.topic, partition=record.partition, offset=record.offset,
                          key=key, value=value, value_encoding=encoding, value_truncated=truncated,
                          error=str(error), reason=error.reason, field=error.field,
                          worker=self._worker, ts=now_ms)


def _as_text(raw: bytes | None) -> tuple[str | None, str]:
    if raw is None:
        return None, "utf-8"
    try:
        return raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return base64.b64encode(raw).decode("ascii"), "base64"
