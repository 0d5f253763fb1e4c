"""The group member id a process used, kept on disk so its successor rejoins as it (see the
package docstring: a join under a dead member's id is one plain join)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from pipeline.slots import acquire_slot

__all__ = ["MemberSlot"]

log = logging.getLogger(__name__)


class MemberSlot:
    """The group member id one process used, kept on disk so that its successor rejoins as it.

    A SIGKILLed member stays in the group until its session expires; a new process that joins
    meanwhile waits for that (see the module docstring). Its successor instead takes over the
    dead member's id. Slots are files `slot-<k>` in a directory per group, each held with an
    exclusive flock for the life of the process: the kernel drops the lock when the process
    dies, however it dies, so a live process's slot is never taken, and a restarted process
    takes the first free slot, a dead predecessor's. Two live processes never share a member
    id. A stale id costs nothing on Tansu (an unknown id joins as a new member) and one extra
    round trip on Kafka (UNKNOWN_MEMBER_ID, then a fresh join).
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd
        self._written: str | None = None

    @classmethod
    def acquire(cls, directory: Path) -> MemberSlot | None:
        """The first free slot in `directory` (created if missing); None if none can be had
        (then the process joins as a new member)."""
        slot = acquire_slot(directory)
        return cls(*slot) if slot is not None else None

    def read(self, group_id: str) -> str | None:
        """The member id the slot's previous holder had in `group_id`, if any."""
        if self._fd is None:
            return None
        try:
            text = os.pread(self._fd, 4096, 0).decode("utf-8")
        except (OSError, UnicodeDecodeError):
            return None
        group, _, member_id = text.partition("\n")
        member_id = member_id.strip()
        return member_id if group == group_id and member_id else None

    def write(self, group_id: str, member_id: str) -> None:
        """Remember `member_id` (a torn write reads back as no id: a fresh join)."""
        if self._fd is None or not member_id or member_id == self._written:
            return
        data = f"{group_id}\n{member_id}\n".encode()
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, data, 0)
            self._written = member_id
        except OSError as exc:
            log.warning("cannot write member slot %s: %s", self.path, exc)

    def clear(self) -> None:
        """Forget the id (the member left the group cleanly; nobody should rejoin as it)."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
            self._written = None
        except OSError as exc:
            log.warning("cannot clear member slot %s: %s", self.path, exc)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # drops the lock
