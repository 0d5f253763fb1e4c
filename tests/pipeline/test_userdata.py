"""The user's own JSON Lines files as a Dataset: the workers' validation line by line, invalid
lines counted by reason, gzip by magic bytes, duplicates dropped, time order, items only events
name kept without text, and a clear error when nothing is valid."""

from __future__ import annotations

import gzip

import orjson
import pytest

from pipeline.config import ValidationConfig
from pipeline.errors import DatasetError
from pipeline.userdata import FIRST_LINES, load_files, read_jsonl

NOW_MS = 1_700_000_000_000


def _item(i, ts=NOW_MS - 100_000, **extra):
    return {"item_id": f"i{i}", "title": f"Item {i}", "categories": ["c"], "ts": ts, **extra}


def _event(n, user, item, ts):
    return {"event_id": f"e{n}", "user_id": user, "item_id": item, "type": "click", "ts": ts}


def _write(path, rows, *, gz=False):
    data = b"".join((r if isinstance(r, bytes) else orjson.dumps(r)) + b"\n" for r in rows)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def _load(tmp_path, items, events, **kwargs):
    return load_files(
        _write(tmp_path / "items.jsonl", items, gz=kwargs.pop("gz_items", False)),
        _write(tmp_path / "events.jsonl", events, gz=kwargs.pop("gz_events", False)),
        ValidationConfig(),
        now_ms=NOW_MS,
        **kwargs,
    )


def test_valid_files_become_a_time_ordered_dataset(tmp_path):
    items = [_item(i) for i in range(3)]
    events = [
        _event(0, "u1", "i0", NOW_MS - 50),
        _event(1, "u1", "i1", NOW_MS - 90),
        _event(2, "u2", "i2", NOW_MS - 50),
        _event(3, "u2", "i0", NOW_MS - 70),
    ]
    dataset, report = _load(tmp_path, items, events)
    # sorted by ts, stable: e0 and e2 share a ts and keep their input order
    assert [e.event_id for e in dataset.events] == ["e1", "e3", "e0", "e2"]
    assert [i.item_id for i in dataset.items] == ["i0", "i1", "i2"]
    assert dataset.items[0].title == "Item 0" and dataset.items[0].categories == ("c",)
    assert (report.items.valid, report.events.valid) == (3, 4)
    assert not report.items.invalid and not report.events.invalid
    assert report.duplicate_events == 0 and report.items_without_entry == 0


def test_invalid_lines_are_counted_by_the_workers_reasons_with_their_line_numbers(tmp_path):
    ok = [_event(n, "u1", "i0", NOW_MS - 1000 + n) for n in range(3)]
    bad = [
        b"not json",
        b"[1, 2]",
        orjson.dumps({"event_id": "x", "user_id": "u"}),
        orjson.dumps({**_event(9, "u", "i0", NOW_MS), "type": "like"}),
        orjson.dumps(_event(10, "u", "i0", 1000)),  # 1970: before validation.min_ts_ms
        b"\xff\xfe",
    ]
    extra_not_json = [b"{" for _ in range(FIRST_LINES + 2)]
    # line 1: ok, then the bad ones (lines 2-7), a blank line (8, skipped), then ok, then more
    rows = [ok[0], *bad, b"   ", ok[1], ok[2], *extra_not_json]
    dataset, report = _load(tmp_path, [_item(0)], rows)
    assert len(dataset.events) == 3
    src = report.events
    assert src.valid == 3 and src.lines == 3 + len(bad) + len(extra_not_json)
    assert src.invalid == {
        "not_json": 1 + len(extra_not_json),
        "not_object": 1,
        "missing_field": 1,
        "invalid_value": 1,
        "ts_out_of_range": 1,
        "not_utf8": 1,
    }
    assert src.first_lines["not_json"] == [2, 11, 12, 13, 14]  # only the first few
    assert src.first_lines["ts_out_of_range"] == [6]
    summary = "\n".join(report.lines())
    assert "events.jsonl: 3 valid events of 16 lines; 13 invalid" in summary
    assert "not_json 8 (lines 2, 11, 12, 13, 14, ...)" in summary


def test_gzip_is_told_by_its_magic_bytes_whatever_the_name(tmp_path):
    events = [_event(n, "u1", f"i{n % 2}", NOW_MS - 100 + n) for n in range(4)]
    dataset, _ = _load(tmp_path, [_item(0), _item(1)], events, gz_items=True, gz_events=True)
    assert len(dataset.events) == 4 and len(dataset.items) == 2
    named = _write(tmp_path / "events.jsonl.gz", events, gz=True)
    assert [n for n, _ in read_jsonl(named)] == [1, 2, 3, 4]


def test_duplicate_event_ids_are_dropped_keeping_the_first(tmp_path):
    events = [
        _event(0, "u1", "i0", NOW_MS - 10),
        _event(1, "u1", "i0", NOW_MS - 20),
        {**_event(0, "u1", "i1", NOW_MS - 30)},
    ]
    dataset, report = _load(tmp_path, [_item(0), _item(1)], events)
    assert [(e.event_id, e.item_id) for e in dataset.events] == [("e1", "i0"), ("e0", "i0")]
    assert report.duplicate_events == 1
    assert "1 events dropped as duplicates" in "\n".join(report.lines())


def test_items_only_events_name_are_kept_without_text_and_retired_items_stay_retired(tmp_path):
    items = [
        _item(0, ts=NOW_MS - 5),
        _item(0, ts=NOW_MS - 9, title="Older title"),
        {"item_id": "i1", "available": False, "ts": NOW_MS - 1},
    ]
    events = [
        _event(0, "u1", "i0", NOW_MS - 3),
        _event(1, "u1", "i7", NOW_MS - 2),
        _event(2, "u2", "i7", NOW_MS - 1),
    ]
    dataset, report = _load(tmp_path, items, events)
    # upserts in ts order (the catalog applies them so: the newest title wins)
    assert [(i.item_id, i.title) for i in dataset.items[:3]] == [
        ("i0", "Older title"),
        ("i0", "Item 0"),
        ("i1", ""),
    ]
    assert dataset.items[2].available is False
    (extra,) = dataset.items[3:]
    assert extra.item_id == "i7" and extra.title == "" and extra.text() == ""
    assert extra.ts == NOW_MS - 2 and extra.available
    assert report.items_without_entry == 1


def test_nothing_valid_is_an_error_naming_the_file(tmp_path):
    with pytest.raises(DatasetError, match=r"events\.jsonl holds no valid event \(0 lines"):
        _load(tmp_path, [_item(0)], [])
    with pytest.raises(
        DatasetError,
        match=r"events\.jsonl holds no valid event \(2 lines read, "
        r"2 invalid: \{'not_json': 2\}",
    ):
        _load(tmp_path, [_item(0)], [b"nope", b"{"])
    with pytest.raises(DatasetError, match=r"items\.jsonl holds no valid item"):
        _load(tmp_path, [b"{}"], [_event(0, "u", "i0", NOW_MS - 1)])


def test_a_missing_file_is_an_error_naming_it(tmp_path):
    _write(tmp_path / "items.jsonl", [_item(0)])
    with pytest.raises(DatasetError, match=r"nowhere\.jsonl"):
        load_files(tmp_path / "items.jsonl", tmp_path / "nowhere.jsonl", ValidationConfig())
