"""What one log line looks like: the plain text format, or one JSON object per line
(`logging.format = json`) for log collectors (Loki, Elasticsearch, Cloud Logging).

A JSON line holds `time` (UTC, ISO 8601 with milliseconds), `level`, `logger`, `worker` (the
process's command: updater, scorer, ...), `message`, every field passed with `extra=`, and
`exc_info` / `stack_info` when present. Formatting only: no handler, no I/O.
"""

from __future__ import annotations

import datetime
import json
import logging
from typing import Any

__all__ = ["TEXT_FORMAT", "LOG_FORMATS", "JsonFormatter", "formatter_for"]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_FORMATS = ("text", "json")

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


def _json_safe(value: Any) -> Any:
    """`value` if json can write it as it is, else its str() (a Path, an exception, bytes...)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in the message are escaped).

    The fixed fields win over an `extra=` field of the same name (logging itself already
    refuses `message` and the record's own attributes as extras).
    """

    def __init__(self, worker: str) -> None:
        super().__init__()
        self._worker = worker

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            key: _json_safe(value)
            for key, value in record.__dict__.items()
            if key not in _STANDARD_ATTRS and not key.startswith("_")
        }
        entry.update(
            time=datetime.datetime.fromtimestamp(record.created, datetime.UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            level=record.levelname,
            logger=record.name,
            worker=self._worker,
            message=record.getMessage(),
        )
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, separators=(",", ":"))


def formatter_for(log_format: str, worker: str) -> logging.Formatter:
    """The formatter of `logging.format` (one of LOG_FORMATS) for the process `worker`."""
    if log_format == "json":
        return JsonFormatter(worker)
    return logging.Formatter(TEXT_FORMAT)
