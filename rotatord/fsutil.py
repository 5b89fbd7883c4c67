"""File helpers for secret-bearing files: one atomic writer, one permission check."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path

__all__ = ["atomic_write", "check_private_file", "ensure_private_dir", "fsync_dir"]


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` so readers see the old or the new file, never a mix.

    Temp file in the same directory created at ``mode`` (0600 by default), write, fsync,
    rename over the target, fsync the directory.  Every secret-bearing write goes through here.
    """
    directory = path.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` and each missing parent with mode 0700 (mkdir -p would use 0777 & umask)."""
    missing = []
    current = path
    while not current.exists():
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            continue


def check_private_file(path: Path) -> str | None:
    """Return a problem description if ``path`` is missing, not a file, or readable by group/world."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return f"{path} does not exist"
    except PermissionError:
        return f"{path} cannot be read (permission denied)"
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file"
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        return f"{path} is accessible by group or others (mode {stat.S_IMODE(st.st_mode):04o}); chmod 600 it"
    return None
