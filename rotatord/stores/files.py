"""Files under a directory matching a glob, each holding one Fernet token.

The tree is walked in sorted order, one directory listing at a time, so a checkpoint is the
relative path of the last file done and memory does not grow with the number of files.  The
pattern follows :mod:`glob` conventions: ``*``, ``?`` and ``[...]`` inside one path segment,
``**`` for any number of directories, and names starting with a dot match only patterns that
say so.  Symbolic links to files are followed (the token is rewritten where it lives, the link
stays); links to directories are not descended into, and other non-regular files are ignored.

A file may end with a newline: the token is the content without it, and the rewritten file
keeps it.  A rewrite is a temporary file in the same directory with the original's mode and owner,
fsync'ed, then atomically exchanged with the target (Linux ``renameat2(RENAME_EXCHANGE)``), then
an fsync of the directory.  The exchange makes it a compare-and-swap without a window: what comes
out under the temporary name is exactly what was at the target, so it is compared, after the
fact, with what was read at the start of the batch (inode, size, mtime and content).  If it is
the original, it is deleted.  If not, a bot wrote it since our read: it is exchanged back, and if
a bot wrote again meanwhile, that newer file is exchanged back in turn, until what comes out is
the file we had put in place; the rewrite counts as a conflict and a later pass picks the file
up.  A target deleted meanwhile stays deleted.  This holds for bots that write by rename (as
they should) or create the file anew; a bot writing in place into a file it opened before the
exchange can still lose that write.

A ``SIGKILL`` between the exchange and the deletion of what came out leaves a ``.rotatord-*.tmp``
file next to the target: the original (harmless, the target holds its re-encryption) or, only
during a conflict, a bot's newer write, to be put back by hand.  Nothing recovers it
automatically (which target it belonged to, and whether the bot wrote again since, cannot be
known for sure afterwards); the walk skips these files, and a pass that meets one older than
:data:`LEFTOVER_AGE` logs a warning naming it.

Where the exchange is not available (no ``renameat2`` in libc, an old kernel, a filesystem
without ``RENAME_EXCHANGE``) the store logs one warning and falls back to comparing just before a
plain rename: a bot writing in the microseconds between that comparison and the rename can then
lose its write.

A directory that does not exist is an error; a pattern matching no file is a valid, empty store.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fnmatch
import logging
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
#: Rounds of putting a bot's newer write back before giving up: the file changes too fast.
MAX_RESTORE_ROUNDS = 100
#: Seconds since a temporary file got its name (ctime) after which it is a leftover: a rewrite
#: in progress holds one for milliseconds.
LEFTOVER_AGE = 60.0
#: Leftovers named in the warning (the count covers all of them).
LEFTOVERS_NAMED = 3
#: A matching file: its path relative to the directory, as segments, and its full path.
_Found = tuple[tuple[str, ...], Path]

_log = logging.getLogger(__name__)

_AT_FDCWD = -100  # relative paths resolve against the working directory, as with os.replace
_RENAME_EXCHANGE = 2
#: What ``renameat2`` answers where exchanging is not available, as opposed to failing for one file.
_EXCHANGE_UNAVAILABLE = frozenset({errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP})


def _load_renameat2() -> Callable[..., int] | None:
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    function.restype = ctypes.c_int
    return function


#: ``None`` where libc has no ``renameat2`` (not Linux, glibc before 2.28): rewrites fall back.
_renameat2 = _load_renameat2()


def _exchange(first: Path, second: Path) -> None:
    """Atomically swap the files the two names point to.  Both must exist (ENOENT otherwise);
    ENOSYS or EINVAL where the system or the filesystem cannot do it."""
    if _renameat2 is None:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS), str(first))
    if _renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(first), None, str(second))


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


def _read_regular(path: Path, *, follow: bool = True) -> tuple[bytes | None, os.stat_result]:
    """Up to ``MAX_TOKEN_FILE + 1`` bytes of ``path`` and its stat; ``None`` content if it is not
    a regular file.  O_NONBLOCK: a FIFO swapped in after the walk must not hang the daemon."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None, st
        with os.fdopen(os.dup(fd), "rb") as fh:
            return fh.read(MAX_TOKEN_FILE + 1), st
    finally:
        os.close(fd)


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    """What tells a file apart from a later write to the same path (with its content)."""
    return st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns


def _hold(path: Path) -> int:
    """A descriptor on whatever ``path`` names, a link itself included.  Held open, it keeps the
    inode number from being reused, so comparing inodes later is sound; O_PATH opens a FIFO or a
    device without side effects."""
    return os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)


def _same_file(first: int, second: int) -> bool:
    a, b = os.fstat(first), os.fstat(second)
    return (a.st_ino, a.st_dev) == (b.st_ino, b.st_dev)


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
        #: Devices whose filesystem cannot exchange names: rewrites there compare, then rename.
        self._no_exchange: set[int] = set()
        self._warned_no_exchange = False
        #: Leftover temporary files met by the last walk (see LEFTOVER_AGE): how many, the first few.
        self._leftovers = 0
        self._leftovers_named: list[str] = []

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
        self._leftovers, self._leftovers_named = 0, []

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
                    self._note_leftover(entry)
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

    def _note_leftover(self, entry: os.DirEntry[str]) -> None:
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            return  # gone: it was a rewrite in progress
        if stat.S_ISREG(st.st_mode) and time.time() - st.st_ctime > LEFTOVER_AGE:
            self._leftovers += 1
            if len(self._leftovers_named) < LEFTOVERS_NAMED:
                self._leftovers_named.append(entry.path)

    def _warn_leftovers(self) -> None:
        if not self._leftovers:
            return
        named = ", ".join(self._leftovers_named)
        more = self._leftovers - len(self._leftovers_named)
        _log.warning(
            "%s: %d temporary file(s) left by an interrupted rewrite (rotatord killed mid-rewrite, or a "
            "file changing too fast to put back): %s%s. Each holds what came out of a file next to it: "
            "usually that file's previous content (delete it), but possibly a bot's newer write that "
            "was being put back: compare, and move it back over its file if so",
            self._label,
            self._leftovers,
            named,
            f" and {more} more" if more > 0 else "",
        )

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
        """Put ``content`` in place of ``item`` if it is unchanged; False on conflict."""
        directory = item.target.parent
        try:
            fd, name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".tmp", dir=directory)
        except OSError as exc:
            raise StoreError(f"{self._label}: cannot write in {directory} ({exc.strerror})") from None
        tmp = Path(name)
        ours_at_tmp = True  # while it is, removing the temporary file on an error loses nothing
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
            with os.fdopen(fd, "wb", closefd=False) as fh:
                fh.write(content)
                fh.flush()
                os.fsync(fh.fileno())
            if item.st.st_dev not in self._no_exchange:
                try:
                    _exchange(tmp, item.target)
                except FileNotFoundError:
                    tmp.unlink(missing_ok=True)
                    return False  # deleted meanwhile: it stays deleted
                except OSError as exc:
                    if exc.errno not in _EXCHANGE_UNAVAILABLE:
                        raise
                    self._cannot_exchange(item)
                else:
                    ours_at_tmp = False
                    return self._settle(item, tmp, fd)
            if not self._unchanged(item):
                tmp.unlink()
                return False
            os.replace(tmp, item.target)
            return True
        except BaseException:
            if ours_at_tmp:
                tmp.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)  # only now: it kept our file's inode number from being reused

    def _settle(self, item: _Item, tmp: Path, ours: int) -> bool:
        """After the first exchange ``tmp`` holds what was at the target.  If that is the file read
        at the start of the batch, delete it: done.  Else a bot wrote it since: exchange it back,
        and again whenever what comes out is not what we had just put in place (a still newer
        write), so the target ends holding the newest write; a conflict."""
        held: list[int] = []
        try:
            came_out = _hold(tmp)
            held.append(came_out)
            if self._is_original(item, tmp, came_out):
                os.unlink(tmp)
                return True
            placed = ours
            for _ in range(MAX_RESTORE_ROUNDS):
                try:
                    _exchange(tmp, item.target)
                except FileNotFoundError:
                    os.unlink(tmp)  # deleted after our last exchange: the deletion is the newest word
                    return False
                newcomer = _hold(tmp)
                held.append(newcomer)
                if _same_file(newcomer, placed):
                    os.unlink(tmp)  # nothing written since the last exchange: the target holds the newest
                    return False
                placed, came_out = came_out, newcomer
            raise StoreError(
                f"{self._label}: {item.target} is changing too fast to re-encrypt; a write newer than"
                f" the one it holds was left in {tmp}"
            )
        except OSError as exc:
            raise StoreError(
                f"{self._label}: cannot finish rewriting {item.target} ({exc.strerror}); what came out of it"
                f" is left in {tmp}"
            ) from None
        finally:
            for fd in held:
                os.close(fd)

    @staticmethod
    def _is_original(item: _Item, path: Path, held: int) -> bool:
        st = os.fstat(held)
        if not stat.S_ISREG(st.st_mode) or _identity(st) != _identity(item.st):
            return False
        content, read = _read_regular(path, follow=False)
        return content == item.content and (read.st_ino, read.st_dev) == (st.st_ino, st.st_dev)

    def _cannot_exchange(self, item: _Item) -> None:
        self._no_exchange.add(item.st.st_dev)
        if not self._warned_no_exchange:
            self._warned_no_exchange = True
            _log.warning(
                "%s: files cannot be exchanged atomically in %s; rewrites there compare then rename,"
                " leaving a small window in which a bot's write can be lost",
                self._label,
                item.target.parent,
            )

    @staticmethod
    def _unchanged(item: _Item) -> bool:
        """The fallback's comparison, just before a plain rename."""
        try:
            content, st = _read_regular(item.target)
        except FileNotFoundError:
            return False
        return content is not None and _identity(st) == _identity(item.st) and content == item.content

    def _write(self, items: list[_Item], news: list[bytes]) -> int:
        written = 0
        directories: set[Path] = set()
        try:
            for item, new in zip(items, news, strict=True):
                replaced = self._replace(item, new + item.newline)
                directories.add(item.target.parent)  # a conflict's exchanges touched it too
                if replaced:
                    written += 1
        except OSError as exc:
            raise StoreError(f"{self._label}: cannot write ({exc.strerror})") from None
        finally:
            for directory in directories:
                with contextlib.suppress(FileNotFoundError):  # removed meanwhile: nothing to make durable
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
        report = run_reencrypt(
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
        self._warn_leftovers()
        return report
