"""Crash-loop quarantine: a record that kills its worker twice is dead-lettered on the next start.

The loop's per-record isolation (loop.py) catches every exception a record can cause; this is
for what an exception handler never sees: a segfault in a native library, the kernel's OOM
killer, a stack overflow. Kafka Streams' deserialization/production exception handlers are the
model; here the handler runs one start later, because the process that met the record is gone.

Before a micro-batch is applied the loop records which offsets it holds; after the batch is
checkpointed it clears them, and so does a loop that exits through its own shutdown path (a
stop signal, or an infrastructure error: those are not the record's fault). A process that dies
in between leaves them behind, and its successor (which inherits its slot file,
pipeline/slots.py) reads them at start:
- a death in a batch of several records makes those partitions apply one record per batch up to
  the batch's last offset, so a later death names the record;
- a death by a fatal signal (segfault, abort: Python's faulthandler writes the traceback next to
  the slot file, `arm_fatal_signals`) counts once for each record of its batch, so a record is
  quarantined at its second such death, the issue's rule;
- a death that left no trace (SIGKILL: the OOM killer, an operator, `streamrec chaos`) counts
  only when the record was applied alone: a record is quarantined once two such deaths held it
  alone. Counting every unexplained kill would quarantine healthy records whenever a worker is
  killed twice in a row (the chaos suite's fault points do exactly that), and a SIGKILL at any
  moment must lose nothing.
A quarantined record is dead-lettered (reason `quarantined`) instead of applied.

`after_crash` and `GuardState` are pure; `CrashGuard` is the file around them.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson

from pipeline.files import open_private
from pipeline.slots import acquire_slot

__all__ = ["GuardState", "after_crash", "CrashGuard"]

log = logging.getLogger(__name__)

TP = tuple[str, int]


def _key(tp: TP) -> str:
    return f"{tp[0]}|{tp[1]}"


@dataclass
class GuardState:
    """What one worker instance knows about its crashes, keyed by "topic|partition"."""

    batch: dict[str, list[int]] = field(default_factory=dict)  # in flight: [first, last]
    singles_until: dict[str, int] = field(default_factory=dict)  # apply alone up to this offset
    batch_deaths: dict[str, list[int]] = field(default_factory=dict)  # [first, last] died once
    deaths: dict[str, dict[str, int]] = field(default_factory=dict)  # offset -> lone deaths
    quarantine: dict[str, list[int]] = field(default_factory=dict)
    crashes: int = 0  # starts that found a batch in flight, ever

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GuardState:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def quarantined(self, tp: TP, offset: int) -> bool:
        return offset in self.quarantine.get(_key(tp), ())

    def singles(self, assigned: set[TP]) -> bool:
        """Whether the next batch must hold one record (a suspect partition is assigned)."""
        return any(_key(tp) in self.singles_until for tp in assigned)

    def passed(self, next_offsets: dict[TP, int]) -> bool:
        """Forget what lies below each partition's next offset; whether anything was dropped."""
        changed = False
        for tp, next_offset in next_offsets.items():
            key = _key(tp)
            if key in self.singles_until and self.singles_until[key] < next_offset:
                del self.singles_until[key]
                self.batch_deaths.pop(key, None)
                changed = True
            if key in self.deaths:
                kept = {o: n for o, n in self.deaths[key].items() if int(o) >= next_offset}
                changed |= len(kept) != len(self.deaths[key])
                self.deaths[key] = kept
                if not kept:
                    del self.deaths[key]
            if key in self.quarantine:
                kept_q = [o for o in self.quarantine[key] if o >= next_offset]
                changed |= len(kept_q) != len(self.quarantine[key])
                self.quarantine[key] = kept_q
                if not kept_q:
                    del self.quarantine[key]
        return changed

    def forget(self, tp: TP) -> None:
        """The partition's log was replaced: its offsets name other records now."""
        key = _key(tp)
        for table in (self.singles_until, self.batch_deaths, self.deaths, self.quarantine):
            table.pop(key, None)


def after_crash(
    state: GuardState, *, fatal: bool = True
) -> tuple[GuardState, list[tuple[str, int]]]:
    """The state a successor starts from, given what a dead process left (`fatal`: it died of
    a fatal signal, not an unexplained kill); and the records newly quarantined
    ("topic|partition", offset). A state with no batch in flight is returned as is."""
    if not state.batch:
        return state, []
    new = GuardState.from_dict(orjson.loads(orjson.dumps(dataclasses.asdict(state))))
    new.batch = {}
    new.crashes += 1
    ranges = list(state.batch.items())
    if sum(last - first + 1 for _, (first, last) in ranges) > 1:
        for key, (first, last) in ranges:
            if fatal:
                new.batch_deaths[key] = [first, last]
            new.singles_until[key] = max(last, new.singles_until.get(key, last))
        return new, []
    key, (offset, _) = ranges[0]
    held = new.batch_deaths.get(key)
    deaths = (
        1
        + new.deaths.get(key, {}).get(str(offset), 0)
        + (1 if fatal and held is not None and held[0] <= offset <= held[1] else 0)
    )
    new.singles_until[key] = max(offset, new.singles_until.get(key, offset))
    if deaths < 2:
        new.deaths.setdefault(key, {})[str(offset)] = deaths
        return new, []
    new.deaths.get(key, {}).pop(str(offset), None)
    new.quarantine.setdefault(key, []).append(offset)
    return new, [(key, offset)]


def _read_fatal(path: Path | None) -> str:
    """The traceback faulthandler left in `path` ("" when none)."""
    try:
        return path.read_text(errors="replace").strip()[:4000] if path is not None else ""
    except OSError:
        return ""


class CrashGuard:
    """The GuardState of one worker instance, kept in its slot file under `directory`.

    Two small writes per micro-batch (`begin`, `end`), each one pwrite of at most a few hundred
    bytes into the page cache: a process crash cannot lose them, only the machine's.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.state = GuardState()
        self.newly_quarantined: list[tuple[str, int]] = []
        self._fd: int | None = None
        self._size = 0
        self.fatal_path: Path | None = None
        self._fatal_file: IO[bytes] | None = None

    def open(self) -> CrashGuard:
        slot = acquire_slot(self.directory, prefix="guard-")
        if slot is None:
            log.warning(
                "no crash-guard slot under %s: crash-loop quarantine is off", self.directory
            )
            return self
        path, self._fd = slot
        self.fatal_path = path.with_suffix(".fatal")
        raw = os.pread(self._fd, 1 << 20, 0).strip()
        self._size = len(raw)
        try:
            left = GuardState.from_dict(orjson.loads(raw)) if raw else GuardState()
        except (orjson.JSONDecodeError, TypeError) as exc:
            log.warning("crash-guard file %s unreadable (%s); starting afresh", path, exc)
            left = GuardState()
        fatal = _read_fatal(self.fatal_path)
        self.state, self.newly_quarantined = after_crash(left, fatal=bool(fatal))
        if left.batch:
            cause = (
                f"of a fatal signal:\n{fatal}"
                if fatal
                else "without a trace (SIGKILL: out of memory, or killed)"
            )
            log.error(
                "the previous process died while applying %s, %s; %s",
                left.batch,
                cause,
                f"quarantining {self.newly_quarantined}"
                if self.newly_quarantined
                else "applying those partitions one record at a time",
            )
            self._write()
        return self

    def arm_fatal_signals(self) -> None:
        """Have Python's faulthandler write the traceback of a fatal signal (SIGSEGV, SIGABRT,
        SIGBUS, SIGFPE, SIGILL) next to the slot file, where the successor reads it as the
        cause. Process-wide: the worker runtime calls it, never a library or a test."""
        if self._fd is None or self.fatal_path is None:
            return
        try:
            self._fatal_file = open_private(self.fatal_path, "wb")  # emptied: this run's only
            faulthandler.enable(file=self._fatal_file, all_threads=True)
        except OSError as exc:
            log.warning("cannot arm the fatal-signal record under %s: %s", self.directory, exc)

    def begin(self, batch: dict[TP, tuple[int, int]]) -> None:
        """A micro-batch holding offsets [first, last] of each partition is about to be applied."""
        self.state.batch = {_key(tp): [first, last] for tp, (first, last) in batch.items()}
        self._write()

    def end(self, next_offsets: dict[TP, int]) -> None:
        """The micro-batch is checkpointed: `next_offsets` are the partitions' next offsets."""
        self.state.passed(next_offsets)
        self.state.batch = {}
        self._write()

    def forget(self, tp: TP) -> None:
        self.state.forget(tp)
        self._write()

    def _write(self) -> None:
        if self._fd is None:
            return
        data = orjson.dumps(dataclasses.asdict(self.state))
        try:  # one write, padded over the previous content: no truncate between two syscalls
            os.pwrite(self._fd, data.ljust(self._size), 0)
            self._size = max(self._size, len(data))
        except OSError as exc:
            log.warning("cannot write the crash-guard file under %s: %s", self.directory, exc)

    def close(self, *, clean: bool = True) -> None:
        """Release the slot. `clean`: this process is leaving through its own shutdown path,
        so nothing in flight killed it (a stop signal, or an infrastructure error)."""
        if clean and self.state.batch:
            self.state.batch = {}
            self._write()
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # drops the lock; the state stays for the next holder
        if self._fatal_file is not None:
            faulthandler.disable()
            self._fatal_file.close()
            self._fatal_file = None
