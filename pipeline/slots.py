"""Per-process slots: a file in a directory that one live process holds, and its successor
inherits. Each is held with an exclusive flock for the life of the process; the kernel drops the
lock when the process dies, however it dies, so a live process's slot is never taken and a
restarted process takes the first free slot: usually its dead predecessor's, with what that one
wrote in it."""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

from pipeline.files import FILE_MODE, private_dirs

__all__ = ["acquire_slot", "MAX_SLOTS"]

log = logging.getLogger(__name__)

MAX_SLOTS = 256


def acquire_slot(directory: Path, prefix: str = "slot-") -> tuple[Path, int] | None:
    """The first free slot file `<prefix><k>` in `directory` (made private if missing) and its
    open, locked descriptor; None, with a warning, when none can be had."""
    try:
        private_dirs(directory, own=True)
        for k in range(MAX_SLOTS):
            path = directory / f"{prefix}{k}"
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            try:
                os.fchmod(fd, FILE_MODE)  # the umask may have widened it; older builds: 0644
            except OSError:
                os.close(fd)
                raise
            return path, fd
    except OSError as exc:
        log.warning("no free slot under %s: %s", directory, exc)
    return None
