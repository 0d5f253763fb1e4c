"""Bad records of every class the codec must dead-letter, for `streamrec chaos` (bad-input).

`bad_records(rng, now_ms, validation)` returns one (class, key, value) drawn uniformly from
BAD_CLASSES. Each value must end in the DLQ exactly once; none may raise out of the codec.
A key that differs from `user_id` is valid by contract (the value wins), so it is not here.
"""

from __future__ import annotations

import random

import orjson

from pipeline.config import ValidationConfig

__all__ = ["BAD_CLASSES", "bad_records"]


def _event(rng: random.Random, now_ms: int, **override: object) -> dict[str, object]:
    event: dict[str, object] = {
        "event_id": f"bad-{rng.getrandbits(48):x}",
        "user_id": "u-bad",
        "item_id": "m1",
        "type": "click",
        "ts": now_ms,
    }
    event.update(override)
    return event


def _text(rng: random.Random, now_ms: int) -> str:
    return orjson.dumps(_event(rng, now_ms)).decode()


BAD_CLASSES = {
    "truncated_json": lambda r, n, v: _text(r, n)[: r.randrange(1, 40)].encode(),
    "trailing_garbage": lambda r, n, v: (_text(r, n) + " }garbage").encode(),
    "tombstone": lambda r, n, v: None,
    "empty": lambda r, n, v: b"",
    "not_utf8": lambda r, n, v: b"\xff\xfe" + _text(r, n).encode("utf-16-le"),
    "not_object": lambda r, n, v: b"[1, 2, 3]",
    "deep_nesting": lambda r, n, v: ('{"a":' * 2000 + "1" + "}" * 2000).encode(),
    "nan_literal": lambda r, n, v: _text(r, n)[:-1].encode() + b',"value":NaN}',
    "infinity_literal": lambda r, n, v: _text(r, n)[:-1].encode() + b',"value":-Infinity}',
    "duplicate_keys": lambda r, n, v: _text(r, n)[:-1].encode() + b',"user_id":"u-other"}',
    "int_beyond_2_63": lambda r, n, v: _text(r, n)[:-1].encode() + b',"value":9223372036854775808}',
    "missing_field": lambda r, n, v: orjson.dumps(
        {k: x for k, x in _event(r, n).items() if k != "item_id"}
    ),
    "wrong_type": lambda r, n, v: orjson.dumps(_event(r, n, ts=str(n))),
    "invalid_enum": lambda r, n, v: orjson.dumps(_event(r, n, type="like")),
    "ts_seconds": lambda r, n, v: orjson.dumps(_event(r, n, ts=n // 1000)),
    "ts_years_ahead": lambda r, n, v: orjson.dumps(_event(r, n, ts=n + 5 * 365 * 86_400_000)),
    "too_large": lambda r, n, v: orjson.dumps(_event(r, n, pad="x" * v.max_message_bytes))[
        : v.max_message_bytes + 1
    ],
}


def bad_records(
    rng: random.Random, now_ms: int, validation: ValidationConfig
) -> tuple[str, bytes, bytes | None]:
    kind = rng.choice(sorted(BAD_CLASSES))
    return kind, b"u-bad", BAD_CLASSES[kind](rng, now_ms, validation)
