"""Every class of bad input named in the contract becomes an InvalidMessage naming its field."""

from __future__ import annotations

import base64
import hashlib

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.codec import (
    DLQ_KEY_BYTES,
    INTERNAL_KINDS,
    Codec,
    _key_count,
    bounded_dead_letter,
    encode,
    load_schemas,
)
from pipeline.config import ValidationConfig
from pipeline.errors import InvalidMessage
from pipeline.messages import Event, Record

NOW_MS = 1_700_000_000_000


def _event(**overrides):
    event = {"event_id": "e1", "user_id": "u1", "item_id": "i1", "type": "click", "ts": NOW_MS - 5}
    event.update(overrides)
    return event


def _record(value, key=b"u1"):
    return Record("streamrec.events", 2, 41, key, value, NOW_MS)


@pytest.fixture
def codec():
    return Codec(ValidationConfig(max_message_bytes=4096), worker="updater")


def _reject(codec, value, key=b"u1"):
    with pytest.raises(InvalidMessage) as info:
        codec.decode(_record(value, key), "event", NOW_MS)
    return info.value


def test_valid_event_decodes_to_typed_message(codec):
    decoded = codec.decode(
        _record(orjson.dumps(_event(value=4.5, extra="ignored"))), "event", NOW_MS
    )
    assert decoded.message == Event("e1", "u1", "i1", "click", NOW_MS - 5, 4.5)
    assert not decoded.key_mismatch


@pytest.mark.parametrize(
    ("value", "reason", "field"),
    [
        (b"{not json", "not_json", None),
        (b"[1, 2, 3]", "not_object", None),
        (b'"a string"', "not_object", None),
        (
            orjson.dumps({k: v for k, v in _event().items() if k != "item_id"}),
            "missing_field",
            "item_id",
        ),
        (orjson.dumps(_event(ts="yesterday")), "wrong_type", "ts"),
        (orjson.dumps(_event(user_id=17)), "wrong_type", "user_id"),
        (orjson.dumps(_event(type="like")), "invalid_value", "type"),
        (orjson.dumps(_event(ts=NOW_MS // 1000)), "ts_out_of_range", "ts"),
        (orjson.dumps(_event(ts=NOW_MS + 2 * 86_400_000)), "ts_out_of_range", "ts"),
        (b"\xff\xfe{}", "not_utf8", None),
        (b"", "empty_value", None),
        (None, "null_value", None),
        (b'{"event_id": "e1", "ts": NaN}', "not_json", None),
        (orjson.dumps(_event()) + b" trailing", "not_json", None),
        (orjson.dumps(_event())[:-5], "not_json", None),
        (b"[" * 2000 + b"]" * 2000, "not_json", None),
    ],
)
def test_bad_input_is_classified_with_field(codec, value, reason, field):
    error = _reject(codec, value)
    assert error.reason == reason
    assert error.field == field


def test_oversized_value_rejected_before_parse_and_truncated_in_dead_letter(codec):
    big = b'{"x": "' + b"a" * 5000 + b'"}'
    record = _record(big)
    error = _reject(codec, big)
    assert error.reason == "too_large"
    letter = codec.dead_letter(record, error, NOW_MS)
    assert not letter.value_truncated  # 5 KB fits the dead letter's own bound: kept whole
    assert letter.value == big.decode() and letter.value_length == len(big)
    assert (letter.topic, letter.partition, letter.offset, letter.key) == (
        "streamrec.events",
        2,
        41,
        "u1",
    )


def test_limit_is_inclusive(codec):
    padding = 4096 - len(orjson.dumps(_event(pad="")))
    exact = orjson.dumps(_event(pad="x" * padding))
    assert len(exact) == 4096
    codec.decode(_record(exact), "event", NOW_MS)
    with pytest.raises(InvalidMessage, match="too_large"):
        codec.decode(_record(orjson.dumps(_event(pad="x" * (padding + 1)))), "event", NOW_MS)


def test_dead_letter_of_binary_value_is_base64(codec):
    raw = b"\xff\x00\x01"
    error = _reject(codec, raw)
    letter = codec.dead_letter(_record(raw), error, NOW_MS)
    assert letter.value_encoding == "base64"
    assert base64.b64decode(letter.value) == raw
    assert letter.reason == "not_utf8" and letter.worker == "updater"


def test_dead_letter_validates_against_its_own_schema(codec):
    error = _reject(codec, b"{}")
    letter = codec.dead_letter(_record(b"{}"), error, NOW_MS)
    round_trip = codec.decode(
        Record("streamrec.dlq", 0, 0, None, orjson.dumps(letter.to_dict())), "dead_letter", NOW_MS
    )
    assert round_trip.message == letter


def test_key_mismatch_is_flagged_value_wins(codec):
    decoded = codec.decode(_record(orjson.dumps(_event()), key=b"someone-else"), "event", NOW_MS)
    assert decoded.key_mismatch
    assert decoded.message.user_id == "u1"


def test_unknown_item_id_is_valid(codec):
    decoded = codec.decode(
        _record(orjson.dumps(_event(item_id="never-seen-before"))), "event", NOW_MS
    )
    assert decoded.message.item_id == "never-seen-before"


def test_retire_needs_only_id_and_flag(codec):
    retire = orjson.dumps({"item_id": "i9", "available": False, "ts": NOW_MS})
    item = codec.decode(Record("streamrec.items", 0, 0, b"i9", retire), "item", NOW_MS).message
    assert not item.available
    with pytest.raises(InvalidMessage) as info:
        codec.decode(
            Record("streamrec.items", 0, 0, b"i9", orjson.dumps({"item_id": "i9", "ts": NOW_MS})),
            "item",
            NOW_MS,
        )
    assert info.value.field == "title"


def test_every_schema_file_compiles():
    import fastjsonschema

    schemas = load_schemas()
    assert set(schemas) == {
        "event",
        "item",
        "user_vector",
        "recommendation",
        "model_update",
        "dead_letter",
    }
    for schema in schemas.values():
        fastjsonschema.compile(schema)


_ids = st.text(min_size=1, max_size=20)
# The fields of a schema-valid Event, as @given keyword arguments.
_EVENT_FIELDS = {
    "event_id": _ids,
    "user_id": _ids,
    "item_id": _ids,
    "type_": st.sampled_from(["view", "click", "add_to_cart", "purchase", "rating"]),
    "ts": st.integers(631_152_000_000, NOW_MS + 86_400_000),
}


@settings(max_examples=200, deadline=None)
@given(**_EVENT_FIELDS, value=st.none() | st.floats(allow_nan=False, allow_infinity=False))
def test_schema_valid_events_never_rejected(event_id, user_id, item_id, type_, ts, value):
    codec = Codec(ValidationConfig(), worker="updater")
    event = Event(event_id, user_id, item_id, type_, ts, value)
    decoded = codec.decode(
        _record(orjson.dumps(event.to_dict()), key=user_id.encode()), "event", NOW_MS
    )
    assert decoded.message == event


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=300))
def test_arbitrary_bytes_never_raise_anything_but_invalid_message(raw):
    codec = Codec(ValidationConfig(), worker="updater")
    try:
        codec.decode(_record(raw), "event", NOW_MS)
    except InvalidMessage as exc:
        assert exc.reason


# -- ambiguous JSON that orjson alone accepts (issue 7) ------------------------------------------


def _raw_event(extra: str) -> bytes:
    return (
        f'{{"event_id":"e1","user_id":"u1","item_id":"i1","type":"click","ts":{NOW_MS - 5}{extra}}}'
    ).encode()


@pytest.mark.parametrize("extra,field", [(',"user_id":"u2"', "user_id"), (',"ts":5', "ts")])
def test_duplicate_keys_are_rejected_naming_the_key(codec, extra, field):
    error = _reject(codec, _raw_event(extra))
    assert (error.reason, error.field) == ("not_json", field)


def test_duplicate_keys_in_a_nested_object_are_rejected(codec):
    assert _reject(codec, _raw_event(',"context":{"a":1,"a":2}')).reason == "not_json"


@pytest.mark.parametrize(
    "number",
    ["9223372036854775808", "-9223372036854775809", "18446744073709551621", "1" + "0" * 40],
)
def test_integers_beyond_64_bits_are_rejected(codec, number):
    assert _reject(codec, _raw_event(f',"value":{number}')).reason == "invalid_value"


def test_largest_64_bit_integers_pass_the_strict_check(codec):
    raw = _raw_event(',"context":{"a":9223372036854775807,"b":-9223372036854775808}')
    assert codec.decode(_record(raw), "event", NOW_MS).message.context["a"] == 2**63 - 1


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_nan_and_infinity_are_rejected(codec, literal):
    assert _reject(codec, _raw_event(f',"value":{literal}')).reason == "not_json"


@pytest.mark.parametrize("depth", [2000, 1100])
def test_deep_nesting_is_rejected_without_recursion_error(depth):
    big = Codec(ValidationConfig(), worker="updater")
    for nested in ('{"a":' * depth + "1" + "}" * depth, "[" * depth + "]" * depth):
        error = _reject(big, _raw_event(f',"context":{{"x":{nested}}}'))
        assert error.reason == "not_json"


@pytest.mark.parametrize("depth", [200, 900])
def test_nesting_orjson_parses_is_ignored_in_unknown_fields_and_a_limit_in_context(depth):
    """Unknown fields are dropped on decode, so no later stage ever writes them back out."""
    big = Codec(ValidationConfig(), worker="updater")
    nested = '{"a":' * depth + "1" + "}" * depth
    decoded = big.decode(_record(_raw_event(f',"extra":{nested}')), "event", NOW_MS)
    assert decoded.message.context is None
    error = _reject(big, _raw_event(f',"context":{nested}'))
    assert (error.reason, error.field) == ("limit_exceeded", "context.a.a.a.a")


def _mutations():
    """Ways to break a schema-valid event; each must end in InvalidMessage, never elsewhere."""

    def drop(field):
        return lambda raw, doc: orjson.dumps({k: v for k, v in doc.items() if k != field})

    def set_(field, value):
        return lambda raw, doc: orjson.dumps({**doc, field: value})

    return st.sampled_from(
        [
            drop("event_id"),
            drop("user_id"),
            drop("item_id"),
            drop("type"),
            drop("ts"),
            set_("ts", "1700000000000"),
            set_("ts", 1.5),
            set_("ts", True),
            set_("ts", 5),
            set_("ts", NOW_MS + 10 * 86_400_000),
            set_("type", "like"),
            set_("event_id", ""),
            set_("user_id", 7),
            set_("value", "3"),
            set_("context", [1]),
            lambda raw, doc: raw[:-1],  # truncated
            lambda raw, doc: raw + b"x",  # trailing garbage
            lambda raw, doc: raw[:-1] + b',"ts":1}',  # duplicate key
            lambda raw, doc: raw[:-1] + b',"value":NaN}',
            lambda raw, doc: raw[:-1] + b',"value":99999999999999999999}',
            lambda raw, doc: b"\xff" + raw,  # not UTF-8
            lambda raw, doc: b"[" + raw + b"]",  # not an object
            lambda raw, doc: b"",
            lambda raw, doc: None,  # tombstone
            lambda raw, doc: raw + b" " * 5000,  # over the limit
        ]
    )


@settings(max_examples=300, deadline=None)
@given(**_EVENT_FIELDS, mutate=_mutations())
def test_mutated_events_always_reach_the_dlq_never_an_exception(
    event_id, user_id, item_id, type_, ts, mutate
):
    codec = Codec(ValidationConfig(max_message_bytes=4096), worker="updater")
    doc = Event(event_id, user_id, item_id, type_, ts).to_dict()
    raw = mutate(orjson.dumps(doc), doc)
    with pytest.raises(InvalidMessage) as info:
        codec.decode(_record(raw), "event", NOW_MS)
    letter = codec.dead_letter(_record(raw), info.value, NOW_MS)
    assert letter.reason == info.value.reason and letter.offset == 41


_json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.text(max_size=8)
    | st.floats(allow_nan=False, allow_infinity=False)
)
_json_values = st.recursive(
    _json_leaf,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=12,
)


def _within_free_form_limits(value, level=1):
    """The contract's limits on open objects (schemas' definitions/free_form), written plainly."""
    if isinstance(value, dict):
        return (
            level <= 4
            and len(value) <= 64
            and all(len(k) <= 128 for k in value)
            and all(_within_free_form_limits(v, level + 1) for v in value.values())
        )
    if isinstance(value, list):
        return (
            level <= 4
            and len(value) <= 64
            and all(_within_free_form_limits(v, level + 1) for v in value)
        )
    return not isinstance(value, str) or len(value) <= 1024


_deep_values = st.recursive(
    _json_leaf | st.text(min_size=1020, max_size=1030),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=16,
)


@settings(max_examples=300, deadline=None)
@given(
    context=st.dictionaries(
        st.text(max_size=6) | st.text(min_size=127, max_size=130), _deep_values, max_size=4
    )
    | st.dictionaries(st.text(max_size=4), st.integers(-9, 9), min_size=60, max_size=70),
    extra_key=st.text(min_size=1, max_size=6).filter(lambda k: k not in Event.__dataclass_fields__),
    indent=st.booleans(),
)
def test_events_with_any_context_pass_exactly_when_within_the_limits(context, extra_key, indent):
    """Keys with quotes, colons or escapes and pretty-printed JSON pass the duplicate-key scan;
    a context over a limit is dead-lettered as limit_exceeded, naming the field under it."""
    codec = Codec(ValidationConfig(), worker="updater")
    doc = {**_event(context=context), extra_key: context}
    raw = orjson.dumps(doc, option=orjson.OPT_INDENT_2 if indent else 0)
    if _within_free_form_limits(context):
        assert codec.decode(_record(raw), "event", NOW_MS).message.context == context
        return
    error = _reject(codec, raw)
    assert error.reason == "limit_exceeded"
    assert error.field is not None and error.field.startswith("context")


@pytest.mark.parametrize("kind,field", [("event", "context"), ("item", "attributes")])
def test_a_context_nested_300_deep_is_a_limit_not_a_crash(kind, field):
    """The fine-tune worker's crash loop: orjson cannot write 255 levels back out."""
    nested = b'{"a":' * 299 + b"{}" + b"}" * 299
    doc = _event() if kind == "event" else {"item_id": "i1", "ts": NOW_MS - 5, "title": "t"}
    raw = orjson.dumps(doc)[:-1] + b',"' + field.encode() + b'":' + nested + b"}"
    with pytest.raises(InvalidMessage) as info:
        Codec(ValidationConfig(), worker="updater").decode(_record(raw), kind, NOW_MS)
    assert info.value.reason == "limit_exceeded"
    assert info.value.field == field + ".a.a.a.a"


def _reference_key_count(value):
    if isinstance(value, dict):
        return len(value) + sum(_reference_key_count(v) for v in value.values())
    if isinstance(value, list):
        return sum(_reference_key_count(v) for v in value)
    return 0


@settings(max_examples=300, deadline=None)
@given(document=st.dictionaries(st.text(max_size=4), _json_values, max_size=5))
def test_key_count_matches_a_recursive_count_at_any_nesting(document):
    """The duplicate-key scan compares key tokens with this count: an over-count would let a
    repeated key through, so it must be exact for any mix of scalars, lists and objects."""
    parsed = orjson.loads(orjson.dumps(document))
    assert _key_count(parsed) == _reference_key_count(parsed)


def test_key_count_handles_orjsons_deepest_nesting_and_scalars():
    deep = orjson.loads(b'{"a":' * 1000 + b'[{"b":1,"c":[2]}]' + b"}" * 1000)
    assert _key_count(deep) == 1002
    assert _key_count(5) == 0 and _key_count([1, {"x": [{"y": None}]}]) == 2


# -- dead letters are bounded by construction ------------------------------------------------------

_SMALL_BOUND = 32_768


def _letter_size(letter, key):
    return len(encode(letter)) + len(key[:DLQ_KEY_BYTES] if key is not None else b"")


def _check_bounded(raw, key, max_bytes=_SMALL_BOUND):
    record = Record("streamrec.events", 0, 7, key, raw, NOW_MS)
    error = InvalidMessage("not_json", "value is not JSON: " + "x" * 5000, "f" * 5000)
    letter = bounded_dead_letter(record, error, NOW_MS, worker="updater", max_bytes=max_bytes)
    assert _letter_size(letter, key) <= max_bytes
    if raw is not None:
        assert letter.value_length == len(raw)
        assert letter.value_sha256 == hashlib.sha256(raw).hexdigest()
        kept = (
            base64.b64decode(letter.value)
            if letter.value_encoding == "base64"
            else letter.value.encode()
        )
        assert raw.startswith(kept)
        assert letter.value_truncated == (len(kept) < len(raw))
    if key is not None:
        assert letter.key_length == len(key)
        assert letter.key_truncated == (len(key) > DLQ_KEY_BYTES)
    # The letter is itself a valid dead_letter message.
    Codec(ValidationConfig(), "t").decode(
        Record("streamrec.dlq", 0, 0, None, encode(letter)), "dead_letter", NOW_MS
    )
    return letter


@pytest.mark.parametrize("fill", [b"\x01", b'"', b"\\", "\u00e9".encode(), b"\xff", b"a"])
def test_a_megabyte_of_anything_dead_letters_within_the_default_bound(fill):
    """The crash loop of the issue: 1 MB of control characters escaped to 6 MB of JSON."""
    raw = fill * (1_000_000 // len(fill))
    letter = _check_bounded(
        raw, b"k" * 2_000_000, max_bytes=ValidationConfig().dead_letter_max_bytes
    )
    assert letter.value_truncated and letter.key_truncated


def test_a_small_record_is_kept_whole():
    letter = _check_bounded(b'{"a": 1}', b"u1")
    assert letter.value == '{"a": 1}' and not letter.value_truncated and not letter.key_truncated


@settings(max_examples=300, deadline=None)
@given(
    raw=st.one_of(
        st.none(),
        st.binary(max_size=70_000),
        st.text(max_size=40_000).map(lambda t: t.encode("utf-8", "surrogatepass")),
    ),
    key=st.one_of(st.none(), st.binary(max_size=3_000)),
)
def test_every_dead_letter_fits_its_bound(raw, key):
    _check_bounded(raw, key)


def _user_vector_bytes(user_id: str = "u1") -> bytes:
    from pipeline.messages import UserVector

    vector = UserVector(
        user_id, "v1", (0.5, -0.25), ("i1", "i2"), NOW_MS, NOW_MS, ("click", "view")
    )
    return encode(vector)


def test_internal_records_skip_the_schema_pass_unless_trust_is_off():
    """A user vector streamrec wrote is built without the schema and the strict scan; with
    validation.trust_internal_topics off, a duplicate key is refused as it is on events."""
    raw = _user_vector_bytes()[:-1] + b',"model_version":"v2"}'
    trusted = Codec(ValidationConfig(), worker="scorer").decode(_record(raw), "user_vector", NOW_MS)
    assert trusted.message.model_version == "v2" and not trusted.key_mismatch
    strict = Codec(ValidationConfig(trust_internal_topics=False), worker="scorer")
    with pytest.raises(InvalidMessage) as info:
        strict.decode(_record(raw), "user_vector", NOW_MS)
    assert info.value.reason == "not_json" and "duplicate" in str(info.value)
    other = Codec(ValidationConfig(), worker="scorer").decode(
        _record(_user_vector_bytes("u2")), "user_vector", NOW_MS
    )
    assert other.key_mismatch  # keyed u1, about u2: still noticed


_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats()
    | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from(sorted(INTERNAL_KINDS)),
    fields=st.dictionaries(
        st.sampled_from(["user_id", "model_version", "vector", "history", "event_ts", "items"]),
        _json_values,
    ),
)
def test_trusted_decoding_of_a_foreign_record_raises_only_invalid_message(kind, fields):
    """Another service writing junk to an internal topic: decoding fails as InvalidMessage or
    yields a message (what the handler cannot use, the loop dead-letters), never anything else."""
    codec = Codec(ValidationConfig(), worker="scorer")
    try:
        codec.decode(_record(orjson.dumps(fields)), kind, NOW_MS)
    except InvalidMessage as exc:
        assert exc.reason == "schema"
