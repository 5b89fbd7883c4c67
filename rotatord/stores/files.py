"""Files under a directory matching a glob, each holding one Fernet token.

The tree is walked in sorted order, one directory listing at a time, so a checkpoint is the
relative path of the last file done and memory does not grow with the number of files.  The
pattern follows :mod:`glob` conventions: ``*``, ``?`` and ``[...]`` inside one path segment,
``**`` for any number of directories, and names starting with a dot match only patterns that
say so.  Symbolic links to files are followed (the token is rewritten where it lives, the link
stays); links to directories are not descended into, and other non-regular files are ignored.

A file may end with a newline: the token is the content without it, and the rewritten file
keeps it.  A rewrite is atomic (a temporary file in the same directory with the original's mode
and owner, fsync, rename, fsync of the directory) and is a compare-and-swap: just before the
rename the file must still have the inode, size, mtime and content read at the start of the
batch, else it counts as a conflict.  A bot writing in the microseconds between that comparison
and the rename can still lose its write; files have no atomic compare-and-swap, and a bot that
writes by rename (as it should) is always detected before that window.

A directory that does not exist is an error; a pattern matching no file is a valid, empty store.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import re
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..config.model import FilesStoreSettings
from ..errors import StoreError
from ..fsutil import fsync_dir
from ..interfaces import Census, DataStore, Identify, Progress, ReencryptReport, RotateBatch
from .batch import Batch, Pacer, count_census, decode_checkpoint, run_reencrypt

__all__ = ["FilesStore", "GlobPattern"]

#: Larger files are not tokens; they are reported as unreadable instead of being read whole.
MAX_TOKEN_FILE = 1 << 20
TEMP_PREFIX = ".rotatord-"
#: A matching file: its path relative to the directory, as segments, and its full path.
_Found = tuple[tuple[str, ...], Path]


class GlobPattern:
    """A glob over relative paths, matched segment by segment so that a walk can prune.

    :meth:`step` advances a set of positions in the pattern over one path segment; a directory
    is worth descending into when the set stays non-empty, a file matches when the set reaches
    the end of the pattern.
    """

    def __init__(self, pattern: str) -> None:
        parts = pattern.split("/")
        if pattern.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise ValueError("pattern must be relative, without empty, '.' or '..' segments")
        self._parts = tuple(parts)
        self._regex = tuple(None if p == "**" else re.compile(fnmatch.translate(p)) for p in parts)
        self.start = self._closure({0})

    def _closure(self, states: set[int]) -> frozenset[int]:
        todo = list(states)
        seen = set(states)
        while todo:
            state = todo.pop()
            if state < len(self._parts) and self._parts[state] == "**" and state + 1 not in seen:
                seen.add(state + 1)
                todo.append(state + 1)
        return frozenset(seen)

    def step(self, states: frozenset[int], name: str) -> frozenset[int]:
        hidden = name.startswith(".")
        nxt: set[int] = set()
        for state in states:
            if state == len(self._parts):
                continue
            regex = self._regex[state]
            if regex is None:
                if not hidden:
                    nxt.add(state)
            elif (not hidden or self._parts[state].startswith(".")) and regex.match(name):
                nxt.add(state + 1)
        return self._closure(nxt)

    def accepts(self, states: frozenset[int]) -> bool:
        return len(self._parts) in states

    def can_continue(self, states: frozenset[int]) -> bool:
        return any(state < len(self._parts) for state in states)

    def matches(self, relative: str) -> bool:
        states = self.start
        for name in relative.split("/"):
            states = self.step(states, name)
        return self.accepts(states)


@dataclass(frozen=True)
class _Item:
    """One file as read: where it lives, what it held, and how it was stat'ed."""

    relative: tuple[str, ...]
    target: Path  # the link's target for a symbolic link, else the file itself
    token: bytes  # the content without its trailing newline
    newline: bytes
    st: os.stat_result

    @property
    def content(self) -> bytes:
        return self.token + self.newline


def _read_regular(path: Path) -> tuple[bytes | None, os.stat_result]:
    """Up to ``MAX_TOKEN_FILE + 1`` bytes of ``path`` and its stat; ``None`` content if it is not
    a regular file.  O_NONBLOCK: a FIFO swapped in after the walk must not hang the daemon."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None, st
        with os.fdopen(os.dup(fd), "rb") as fh:
            return fh.read(MAX_TOKEN_FILE + 1), st
    finally:
        os.close(fd)


def _split_newline(content: bytes) -> tuple[bytes, bytes]:
    for ending in (b"\r\n", b"\n"):
        if content.endswith(ending):
            return content[: -len(ending)], ending
    return content, b""


class FilesStore(DataStore):
    """Token files under ``settings.directory``.  ``clock``/``sleep`` drive the optional rate limit."""

    kind = "files"

    def __init__(
        self,
        label_prefix: str,
        settings: FilesStoreSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._settings = settings
        self._root = settings.directory
        self._label = f"{label_prefix}:files:{settings.directory}/{settings.pattern}"
        self._clock = clock
        self._sleep = sleep

    @property
    def label(self) -> str:
        return self._label

    def __repr__(self) -> str:
        return f"FilesStore({self._label!r})"

    def _glob(self) -> GlobPattern:
        try:
            return GlobPattern(self._settings.pattern)
        except ValueError as exc:
            raise StoreError(f"{self._label}: {exc}") from None

    def check(self) -> None:
        self._glob()
        if not self._root.is_dir():
            what = "is not a directory" if self._root.exists() else "does not exist"
            raise StoreError(f"{self._label}: directory {self._root} {what}")
        if not os.access(self._root, os.R_OK | os.X_OK):
            raise StoreError(f"{self._label}: directory {self._root} cannot be read")

    # -- walking ----------------------------------------------------------------------------

    def _walk(self, after: tuple[str, ...] | None) -> Iterator[_Found]:
        """Matching regular files (or links to them) in sorted order, strictly after ``after``."""
        glob = self._glob()

        def visit(directory: Path, prefix: tuple[str, ...], states: frozenset[int]) -> Iterator[_Found]:
            try:
                with os.scandir(directory) as listing:
                    entries = sorted(listing, key=lambda e: e.name)
            except FileNotFoundError:
                return  # removed meanwhile
            except OSError as exc:
                raise StoreError(f"{self._label}: cannot list {directory} ({exc.strerror})") from None
            for entry in entries:
                if entry.name.startswith(TEMP_PREFIX):
                    continue
                relative = (*prefix, entry.name)
                resuming_inside = after is not None and relative == after[: len(relative)] and relative != after
                if after is not None and relative <= after and not resuming_inside:
                    continue
                nxt = glob.step(states, entry.name)
                if not nxt:
                    continue
                try:
                    if entry.is_dir(follow_symlinks=False):
                        if glob.can_continue(nxt):
                            yield from visit(Path(entry.path), relative, nxt)
                    elif not resuming_inside and glob.accepts(nxt) and entry.is_file(follow_symlinks=True):
                        yield relative, Path(entry.path)
                except OSError:
                    continue  # vanished or a dangling link: not an item

        if not self._root.is_dir():
            raise StoreError(f"{self._label}: directory {self._root} does not exist")
        yield from visit(self._root, (), glob.start)

    def _read(self, relative: tuple[str, ...], path: Path) -> _Item | None:
        try:
            target = Path(os.path.realpath(path)) if path.is_symlink() else path
            content, st = _read_regular(target)
        except FileNotFoundError:
            return None  # deleted meanwhile: nothing to re-encrypt
        except OSError as exc:
            # Not quarantined: an unreadable file may hold data only the old key can decrypt.
            raise StoreError(f"{self._label}: cannot read {path} ({exc.strerror})") from None
        if content is None:
            return None
        if len(content) > MAX_TOKEN_FILE:
            return _Item(relative, target, b"", b"", st)  # identifies as nothing: quarantined
        token, newline = _split_newline(content)
        return _Item(relative, target, token, newline, st)

    def _batches(self, after: tuple[str, ...] | None) -> Iterator[Batch[_Item]]:
        size = self._settings.batch_size
        items: list[_Item] = []
        for relative, path in self._walk(after):
            item = self._read(relative, path)
            if item is not None:
                items.append(item)
            if len(items) >= size:
                yield self._batch(items)
                items = []
        if items:
            yield self._batch(items)

    @staticmethod
    def _batch(items: list[_Item]) -> Batch[_Item]:
        return Batch(items, [item.token for item in items], "/".join(items[-1].relative))

    # -- writing ----------------------------------------------------------------------------

    def _replace(self, item: _Item, content: bytes) -> bool:
        """Atomically put ``content`` in place of ``item`` if it is unchanged; False on conflict."""
        directory = item.target.parent
        try:
            fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".tmp", dir=directory)
        except OSError as exc:
            raise StoreError(f"{self._label}: cannot write in {directory} ({exc.strerror})") from None
        try:
            try:
                os.fchmod(fd, stat.S_IMODE(item.st.st_mode))
                mine = os.fstat(fd)
                if (mine.st_uid, mine.st_gid) != (item.st.st_uid, item.st.st_gid):
                    os.fchown(fd, item.st.st_uid, item.st.st_gid)
            except PermissionError:
                # A file the bot can no longer read would be data lost: refuse instead.
                raise StoreError(
                    f"{self._label}: cannot keep the owner of {item.target} (run with CAP_CHOWN or as its owner)"
                ) from None
            with os.fdopen(fd, "wb") as fh:
                fh.write(content)
                fh.flush()
                os.fsync(fh.fileno())
            if not self._unchanged(item):
                os.unlink(tmp)
                return False
            os.replace(tmp, item.target)
            return True
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    @staticmethod
    def _unchanged(item: _Item) -> bool:
        try:
            content, st = _read_regular(item.target)
        except FileNotFoundError:
            return False
        if content is None:
            return False
        before = item.st
        same = (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns) == (
            before.st_ino,
            before.st_dev,
            before.st_size,
            before.st_mtime_ns,
        )
        return same and content == item.content

    def _write(self, items: list[_Item], news: list[bytes]) -> int:
        written = 0
        directories: set[Path] = set()
        try:
            for item, new in zip(items, news, strict=True):
                if self._replace(item, new + item.newline):
                    written += 1
                    directories.add(item.target.parent)
        except OSError as exc:
            raise StoreError(f"{self._label}: cannot write ({exc.strerror})") from None
        finally:
            for directory in directories:
                fsync_dir(directory)
        return written

    def _locate(self, item: _Item) -> str:
        return str(self._root.joinpath(*item.relative))

    # -- DataStore --------------------------------------------------------------------------

    def _pacer(self) -> Pacer | None:
        rate = self._settings.rate_limit
        return Pacer(rate, self._clock, self._sleep) if rate else None

    def census(self, identify: Identify) -> Census:
        self.check()
        return count_census(self._label, (b.tokens for b in self._batches(None)), identify, self._pacer())

    def reencrypt(
        self,
        rotate: RotateBatch,
        identify: Identify,
        primary_id: str,
        checkpoint: str | None,
        progress: Progress,
    ) -> ReencryptReport:
        cursor, totals = decode_checkpoint(self._label, checkpoint)
        if cursor is not None and not isinstance(cursor, str):
            raise StoreError(f"{self._label}: the checkpoint is not one this store wrote")
        self.check()
        after = tuple(cursor.split("/")) if cursor else None
        return run_reencrypt(
            label=self._label,
            batches=self._batches(after),
            write=self._write,
            locate=self._locate,
            rotate=rotate,
            identify=identify,
            primary_id=primary_id,
            progress=progress,
            totals=totals,
            pacer=self._pacer(),
        )
