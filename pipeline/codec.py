"""Bytes <-> typed messages at the edge, validated against the JSON Schema files in schemas/.

The schema files are the single source of truth: they are compiled once per Codec (fastjsonschema)
and every consumed value passes them before it becomes a typed message. Anything that fails
raises InvalidMessage with a reason class and the failing field; `dead_letter()` turns that into
the DLQ record. This module imports neither torch nor kafka-python.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
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

__all__ = [
    "KINDS",
    "schema_dir",
    "load_schemas",
    "Decoded",
    "Codec",
    "encode",
    "bounded_dead_letter",
    "DLQ_KEY_BYTES",
    "DLQ_TEXT_CHARS",
]

KINDS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "event": Event.from_dict,
    "item": Item.from_dict,
    "user_vector": UserVector.from_dict,
    "recommendation": Recommendation.from_dict,
    "model_update": ModelUpdate.from_dict,
    "dead_letter": DeadLetter.from_dict,
}

# What streamrec writes itself from records it has validated: with
# validation.trust_internal_topics these skip the schema and the strict scan (27 of 34 us per
# user vector, docs/PERFORMANCE.md). A foreign writer's malformed record still cannot crash a
# worker: it fails here, or the loop dead-letters it as a processing error.
INTERNAL_KINDS = frozenset({"user_vector", "recommendation"})

# A dead letter keeps at most this much of the record's key (the DLQ record is keyed by it too),
# and of its error text and field name, which can quote hostile input.
DLQ_KEY_BYTES = 1024
DLQ_TEXT_CHARS = 1024

_REQUIRED = re.compile(r"must contain \[(.*?)\] properties")


def schema_dir() -> Path:
    """The one place that knows where the schema files live (installed next to the code)."""
    from schemas import SCHEMA_DIR

    return SCHEMA_DIR


def load_schemas() -> dict[str, dict[str, Any]]:
    return {
        kind: orjson.loads((schema_dir() / f"{kind}.schema.json").read_bytes()) for kind in KINDS
    }


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
        raise _Ambiguous(
            "not_json",
            f"duplicate key {duplicate!r} (parsers disagree on which value wins)",
            duplicate,
        )
    return document


def _int64(text: str) -> int:
    value = int(text)
    if not -(1 << 63) <= value < (1 << 63):
        raise _Ambiguous(
            "invalid_value", f"integer {text[:40]} is outside the signed 64-bit range", None
        )
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
    if _LONG_DIGIT_RUN not in raw.translate(_DIGIT_CLASS) and len(
        _KEY_TOKEN.findall(raw)
    ) == _key_count(document):
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
    path = name[len("data") :].lstrip(".")
    return path or None


_RULE_REASONS = {
    "required": "missing_field",
    "type": "wrong_type",
    "enum": "invalid_value",
    "const": "invalid_value",
}
# Open objects (schemas' definitions/free_form): their size limits keep every record within what
# each later serialiser carries (orjson stops at 254 levels; the feedback store, WAL and
# registry write with it), so any failure inside one is a limit, not a type error.
_FREE_FORM = ("context", "attributes")


def _reason(rule: str | None, field: str | None) -> str:
    if (
        field is not None
        and field.split(".")[0].split("[")[0] in _FREE_FORM
        and (field not in _FREE_FORM or rule != "type")
    ):
        return "limit_exceeded"
    return _RULE_REASONS.get(rule or "", "schema")


class Codec:
    """Decodes and validates consumed records for one worker; builds its dead letters."""

    def __init__(self, validation: ValidationConfig, worker: str) -> None:
        self._validation = validation
        self._worker = worker
        self._validators: dict[str, Callable[[Any], Any]] | None = None

    def _validator(self, kind: str) -> Callable[[Any], Any]:
        if self._validators is None:
            self._validators = {
                kind: fastjsonschema.compile(schema) for kind, schema in load_schemas().items()
            }
        return self._validators[kind]

    def decode(self, record: Record, kind: str, now_ms: int) -> Decoded:
        """Validate `record` as a `kind` message. Raises InvalidMessage (never anything else)."""
        raw = record.value
        if raw is None:
            raise InvalidMessage("null_value", "value is null (tombstone)")
        if len(raw) == 0:
            raise InvalidMessage("empty_value", "value is empty")
        if len(raw) > self._validation.max_message_bytes:
            raise InvalidMessage(
                "too_large",
                f"value is {len(raw)} bytes, over the limit of "
                f"{self._validation.max_message_bytes} (validation.max_message_bytes)",
            )
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
            raise InvalidMessage(
                "not_object", f"value is JSON {type(document).__name__}, not an object"
            )
        if kind in INTERNAL_KINDS and self._validation.trust_internal_topics:
            return _decode_internal(record, kind, document)
        _check_strict(raw, document)
        try:
            self._validator(kind)(document)
        except fastjsonschema.JsonSchemaValueException as exc:
            field = _field_of(exc)
            reason = _reason(exc.rule, field)
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
                "(integer milliseconds since the epoch)",
                "ts",
            )

    @staticmethod
    def _key_mismatch(key: bytes | None, kind: str, document: dict[str, Any]) -> bool:
        id_field = {
            "event": "user_id",
            "user_vector": "user_id",
            "recommendation": "user_id",
            "item": "item_id",
        }.get(kind)
        if id_field is None or key is None:
            return False
        value_id: str = document[id_field]  # the schema made it a string
        return key != value_id.encode("utf-8")

    def dead_letter(self, record: Record, error: InvalidMessage, now_ms: int) -> DeadLetter:
        return bounded_dead_letter(
            record,
            error,
            now_ms,
            worker=self._worker,
            max_bytes=self._validation.dead_letter_max_bytes,
        )


def _decode_internal(record: Record, kind: str, document: dict[str, Any]) -> Decoded:
    """A user vector or recommendation as streamrec wrote it: built without the schema pass;
    only what building it needs is checked."""
    user_id = document.get("user_id")
    if not isinstance(user_id, str):
        raise InvalidMessage("schema", f"{kind} has no string user_id", "user_id")
    try:
        message = KINDS[kind](document)
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidMessage(
            "schema", f"{kind} is not as streamrec writes it: {type(exc).__name__}: {exc}"[:512]
        ) from None
    return Decoded(record, message, record.key is not None and record.key != user_id.encode())


def _clip(text: str | None, chars: int = DLQ_TEXT_CHARS) -> str | None:
    return text if text is None or len(text) <= chars else text[:chars] + "..."


def bounded_dead_letter(
    record: Record, error: InvalidMessage, now_ms: int, *, worker: str, max_bytes: int
) -> DeadLetter:
    """The dead letter of `record`, whose encoding (`encode(letter)`) plus its Kafka key is at
    most `max_bytes` whatever the input: the raw value is cut to the longest prefix that fits
    (`value_truncated`), the key to DLQ_KEY_BYTES (`key_truncated`), and the error text and
    field name are clipped. Escaping can make the JSON six times the raw bytes (a control
    character becomes \\u0001), so the cut is found on the encoded record. `value_length` and
    `value_sha256` describe the whole raw value, so the letter can be matched to its source."""
    raw, key = record.value, record.key
    key_kept = key[:DLQ_KEY_BYTES] if key is not None else None
    letter = DeadLetter(
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        key=key_kept.decode("utf-8", errors="backslashreplace") if key_kept is not None else None,
        value=None,
        value_encoding="utf-8",
        value_truncated=False,
        error=_clip(str(error)) or "",
        reason=error.reason,
        field=_clip(error.field, 256),
        worker=worker,
        ts=now_ms,
        key_truncated=key is not None and len(key) > DLQ_KEY_BYTES,
        key_length=len(key) if key is not None else None,
        value_length=len(raw) if raw is not None else None,
        value_sha256=hashlib.sha256(raw).hexdigest() if raw is not None else None,
    )
    if raw is None:
        return letter
    text, encoding = _as_text(raw)
    key_bytes = len(key_kept or b"")

    def fits(value: str) -> bool:
        kept = dataclasses.replace(
            letter, value=value, value_encoding=encoding, value_truncated=len(value) < len(text)
        )
        return len(encode(kept)) + key_bytes <= max_bytes

    if fits(text):
        return dataclasses.replace(letter, value=text, value_encoding=encoding)
    # The longest prefix whose encoding fits. Encoded size grows with the prefix, so bisect:
    # about 20 encodes of at most ~1 MiB, and only ever for an oversized dead letter.
    step = 4 if encoding == "base64" else 1  # a base64 prefix stays decodable
    low, high = 0, min(len(text), max_bytes) // step
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(text[: mid * step]) else (low, mid - 1)
    return dataclasses.replace(
        letter, value=text[: low * step], value_encoding=encoding, value_truncated=True
    )


def _as_text(raw: bytes) -> tuple[str, str]:
    try:
        return raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return base64.b64encode(raw).decode("ascii"), "base64"
