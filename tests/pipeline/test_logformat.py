"""Log line formats: a JSON line carries the fixed fields and every extra, on one line."""

from __future__ import annotations

import json
import logging

from hypothesis import given
from hypothesis import strategies as st

from pipeline.logformat import JsonFormatter, formatter_for


def _record(
    message: str, *args: object, level: int = logging.WARNING, **extra: object
) -> logging.LogRecord:
    record = logging.getLogger("pipeline.loop").makeRecord(
        "pipeline.loop", level, "loop.py", 1, message, args, None, extra=extra or None
    )
    record.created = 1_764_930_000.25  # 2025-12-05T10:20:00.250Z
    return record


def test_a_json_line_has_time_level_logger_worker_message_and_the_extras():
    line = JsonFormatter("updater").format(
        _record(
            "dead letter %s[%d]@%d",
            "events",
            1,
            42,
            topic="events",
            partition=1,
            offset=42,
            reason="not_json",
        )
    )
    entry = json.loads(line)
    assert entry == {
        "time": "2025-12-05T10:20:00.250Z",
        "level": "WARNING",
        "logger": "pipeline.loop",
        "worker": "updater",
        "message": "dead letter events[1]@42",
        "topic": "events",
        "partition": 1,
        "offset": 42,
        "reason": "not_json",
    }


def test_the_fixed_fields_win_over_an_extra_of_the_same_name_and_odd_values_become_text():
    entry = json.loads(
        JsonFormatter("scorer").format(
            _record(
                "m", worker="someone-else", path=__import__("pathlib").Path("/x"), counts={"a": 1}
            )
        )
    )
    assert entry["worker"] == "scorer"
    assert entry["path"] == "/x" and entry["counts"] == {"a": 1}


def test_an_exception_is_kept_in_the_same_line():
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        record = logging.getLogger("x").makeRecord(
            "x", logging.ERROR, "f.py", 1, "failed", (), __import__("sys").exc_info()
        )
    line = JsonFormatter("finetune").format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert "ValueError: boom" in entry["exc_info"] and entry["level"] == "ERROR"


@given(
    st.text(),
    st.dictionaries(
        st.from_regex(r"[a-z][a-z_]{0,10}", fullmatch=True),
        st.one_of(st.text(), st.integers(), st.none(), st.floats(allow_nan=False)),
        max_size=5,
    ),
)
def test_any_message_and_extras_give_exactly_one_parseable_line(message, extras):
    extras = {
        k: v
        for k, v in extras.items()
        if k not in logging.LogRecord("", 0, "", 0, "", (), None).__dict__
        and k not in {"message", "asctime"}
    }
    line = JsonFormatter("updater").format(_record("%s", message, **extras))
    assert "\n" not in line and "\r" not in line
    entry = json.loads(line)
    assert entry["message"] == message
    for key, value in extras.items():
        if key not in {"time", "level", "logger", "worker"}:
            assert entry[key] == value


def test_text_is_the_plain_format():
    assert (
        formatter_for("text", "updater")
        .format(_record("hello"))
        .endswith("WARNING pipeline.loop: hello")
    )
