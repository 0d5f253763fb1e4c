"""The user's own data as a Dataset: JSON Lines files, or records read from the topics.

Each line (or record) is one Item or Event message exactly as the topics carry it, and passes
`Codec.decode`, the workers' own validation, so a line the workers would dead-letter is refused
here for the same reason. Invalid lines are counted per reason with the first few line numbers
(`Report`); only a source with no valid message at all is an error. Files may be gzip (told by
their magic bytes, whatever the name).

What becomes of the valid messages (`to_dataset`):
- events with an `event_id` seen before are dropped (the first one in input order is kept, as
  the updater's dedup window does);
- events are sorted by `ts`, stable (input order among equal timestamps);
- items are sorted by `ts`, stable, and applied in that order (a later upsert of an item wins;
  a retire-only item `{item_id, available: false, ts}` has no title and only retires);
- an event on an item missing from the items source is kept, and the item is added to the
  catalog without text (no title, no categories): the model learns its id from the
  interactions, and it can be recommended; the report counts these items.
No torch, no Kafka here.
"""

from __future__ import annotations

import gzip
import io
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.codec import Codec
from pipeline.config import ValidationConfig
from pipeline.datasets import Dataset
from pipeline.errors import DatasetError, InvalidMessage
from pipeline.messages import Event, Item, Record

__all__ = [
    "Report",
    "SourceReport",
    "read_jsonl",
    "decode_records",
    "to_dataset",
    "load_files",
    "is_gzip",
    "FIRST_LINES",
]

GZIP_MAGIC = b"\x1f\x8b"
# Line numbers kept per invalid reason, to point at examples without holding millions.
FIRST_LINES = 5


@dataclass
class SourceReport:
    """What reading one source (a file, or a topic) gave: valid messages and invalid lines."""

    source: str
    kind: str  # "item" or "event"
    lines: int = 0
    valid: int = 0
    invalid: Counter[str] = field(default_factory=Counter)
    first_lines: dict[str, list[int]] = field(default_factory=dict)

    def reject(self, line_no: int, reason: str) -> None:
        self.invalid[reason] += 1
        seen = self.first_lines.setdefault(reason, [])
        if len(seen) < FIRST_LINES:
            seen.append(line_no)

    @property
    def invalid_total(self) -> int:
        return sum(self.invalid.values())

    def summary(self, unit: str = "line") -> str:
        text = f"{self.source}: {self.valid:,} valid {self.kind}s of {self.lines:,} {unit}s"
        if self.invalid:
            parts = [
                f"{reason} {count:,} ({unit}s {', '.join(map(str, self.first_lines[reason]))}"
                f"{', ...' if count > len(self.first_lines[reason]) else ''})"
                for reason, count in self.invalid.most_common()
            ]
            text += f"; {self.invalid_total:,} invalid: " + "; ".join(parts)
        return text


@dataclass
class Report:
    """Everything `to_dataset` decided, for the bootstrap's summary."""

    items: SourceReport
    events: SourceReport
    duplicate_events: int = 0
    items_without_entry: int = 0  # items events name that the items source lacks (added text-less)

    def lines(self, unit: str = "line") -> list[str]:
        out = [self.items.summary(unit), self.events.summary(unit)]
        if self.duplicate_events:
            out.append(f"{self.duplicate_events:,} events dropped as duplicates (same event_id)")
        if self.items_without_entry:
            out.append(
                f"{self.items_without_entry:,} items have events but no item message: "
                "kept without text (no title)"
            )
        return out


def is_gzip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == GZIP_MAGIC


def read_jsonl(path: Path | str) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line without its line break) of a JSON Lines file, gzip or not.
    Blank lines are skipped (a trailing newline is not a message). Raises DatasetError when
    the file cannot be opened or read."""
    path = Path(path)
    try:
        # Opened here so an open error names the file; closed by the `with raw` below.
        raw: io.BufferedIOBase = gzip.open(path, "rb") if is_gzip(path) else open(path, "rb")  # noqa: SIM115
    except OSError as exc:
        raise DatasetError(f"cannot open {path}: {exc}") from exc
    try:
        with raw:
            for line_no, line in enumerate(raw, start=1):
                line = line.rstrip(b"\r\n")
                if line.strip():
                    yield line_no, line
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from exc


def decode_records(
    numbered: Iterable[tuple[int, bytes]],
    kind: str,
    codec: Codec,
    report: SourceReport,
    now_ms: int,
    progress: Callable[[int], None] | None = None,
) -> list[Item | Event]:
    """The valid `kind` messages among `numbered` values, in input order; every invalid one is
    counted in `report` under the reason the workers would dead-letter it with."""
    out: list[Item | Event] = []
    for line_no, value in numbered:
        report.lines += 1
        try:
            decoded = codec.decode(Record("", 0, line_no, None, value), kind, now_ms)
        except InvalidMessage as exc:
            report.reject(line_no, exc.reason)
        else:
            report.valid += 1
            out.append(decoded.message)
        if progress is not None:
            progress(1)
    return out


def _nothing_valid(src: SourceReport, unit: str) -> DatasetError:
    return DatasetError(
        f"{src.source} holds no valid {src.kind} ({src.lines:,} {unit}s read, "
        f"{src.invalid_total:,} invalid"
        + (f": {dict(src.invalid)}" if src.invalid else "")
        + "); nothing to "
        "train on. Each line must be one JSON message in the topics' format "
        f"(schemas/{src.kind}.schema.json)"
    )


def to_dataset(
    name: str,
    items: list[Item],
    events: list[Event],
    report: Report,
    *,
    require_items: bool = True,
    unit: str = "line",
) -> Dataset:
    """A Dataset the training path takes: events deduplicated by event_id and sorted by ts
    (stable), items sorted by ts (stable) with a text-less entry for every item only events name.
    Raises DatasetError naming the source when it holds no valid event (or, with
    `require_items`, no valid item: most likely the wrong file)."""
    if not events:
        raise _nothing_valid(report.events, unit)
    if require_items and not items:
        raise _nothing_valid(report.items, unit)
    seen: set[str] = set()
    unique: list[Event] = []
    for event in events:
        if event.event_id in seen:
            report.duplicate_events += 1
            continue
        seen.add(event.event_id)
        unique.append(event)
    unique.sort(key=lambda e: e.ts)  # stable: input order among equal timestamps
    ordered_items = sorted(items, key=lambda i: i.ts)
    known = {item.item_id for item in ordered_items}
    missing: dict[str, int] = {}
    for event in unique:
        if event.item_id not in known and event.item_id not in missing:
            missing[event.item_id] = event.ts
    report.items_without_entry = len(missing)
    extra = [Item(item_id=item_id, ts=ts) for item_id, ts in missing.items()]
    return Dataset(name, tuple(unique), tuple(ordered_items) + tuple(extra))


def load_files(
    items_path: Path | str,
    events_path: Path | str,
    validation: ValidationConfig,
    *,
    now_ms: int | None = None,
    progress: Callable[[str, Path], Callable[[int], None] | None] | None = None,
) -> tuple[Dataset, Report]:
    """Read, validate and assemble an items file and an events file (see the module docstring).
    `progress(kind, path)` may return a per-line callback (a progress bar's update)."""
    codec = Codec(validation, worker="bootstrap")
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    messages: dict[str, list[Any]] = {}  # items under "item", events under "event"
    reports: dict[str, SourceReport] = {}
    for kind, path in (("item", Path(items_path)), ("event", Path(events_path))):
        reports[kind] = SourceReport(str(path), kind)
        tick = progress(kind, path) if progress is not None else None
        messages[kind] = decode_records(read_jsonl(path), kind, codec, reports[kind], now_ms, tick)
    report = Report(reports["item"], reports["event"])
    name = Path(events_path).name.split(".")[0] or "events"
    return to_dataset(name, messages["item"], messages["event"], report), report
