"""Private files and directories under streamrec's data root, and crash-safe replacement.

What streamrec keeps on disk (worker state, feedback, models, member ids, caches) holds user
histories, so every file it writes is created 0600 and every directory it makes 0700, whatever
the process umask: the mode is set explicitly (fchmod / chmod), not left to `open` and `mkdir`,
whose modes the umask can only narrow. Directories that already existed are left alone unless
the caller owns them (`own=True`: a directory streamrec names itself, never a user's parent
such as $HOME). One error behaviour: every failure raises OSError for the caller to wrap, except
a directory fsync on a filesystem that cannot do one.
"""

from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path
from typing import IO

__all__ = ["FILE_MODE", "DIR_MODE", "private_dirs", "open_private", "atomic_write", "fsync_dir"]

FILE_MODE = 0o600
DIR_MODE = 0o700


def private_dirs(path: Path, *, own: bool = False) -> Path:
    """Make `path` and its missing parents, each one made here with mode 0700 (`mkdir(parents=
    True, mode=...)` would set it on the leaf only, and through the umask). With `own`, an
    existing `path` is set to 0700 too: a directory streamrec created before (older builds
    made them 0755). Returns `path`."""
    path = Path(path)
    missing = []
    probe = path
    while not probe.is_dir():
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=DIR_MODE)
        except FileExistsError:
            if not directory.is_dir():
                raise
            continue  # made meanwhile by a sibling process, which sets the mode itself
        os.chmod(directory, DIR_MODE)
    if own and path not in missing and (path.stat().st_mode & 0o777) != DIR_MODE:
        os.chmod(path, DIR_MODE)
    return path


def open_private(path: Path, mode: str = "wb") -> IO[bytes]:
    """`open(path, mode)` for "wb" or "ab", with the file set to 0600 (an existing file too:
    one written by an older build)."""
    flags = {
        "wb": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
        "ab": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
    }[mode]
    fd = os.open(path, flags | os.O_CLOEXEC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
        return os.fdopen(fd, mode)
    except BaseException:
        os.close(fd)
        raise


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable. A filesystem that cannot fsync a
    directory (EINVAL, ENOTSUP) is not an error: there is nothing more to do there."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | list[bytes], *, fsync: bool = True) -> None:
    """Write `data` (one buffer, or chunks in order) to `path` as a 0600 file, so that a crash
    leaves either the old file or the new one; `fsync` makes the new one durable first."""
    path = Path(path)
    # Unique per call: two threads (or processes) replacing one file never share a temp file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open_private(tmp, "wb") as out:
            out.writelines([data] if isinstance(data, (bytes, bytearray, memoryview)) else data)
            out.flush()
            if fsync:
                os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    if fsync:
        fsync_dir(path.parent)
