"""The append-only audit log: JSON lines, each carrying the SHA-256 of the line before it.

A record is one line of compact JSON with sorted keys::

    {"actor":"schedule","event":"rotation.staged","prev":"<64 hex>","secret":"support-bot-db","seq":7,
     "ts":"2025-01-01T03:00:00.000Z","version":4}

``seq`` counts from 1; ``prev`` is the hex SHA-256 of the previous line's bytes (without its
newline), ``"0" * 64`` for the first.  Editing or deleting a record breaks the chain at the next
line.  Editing the last record or cutting off the tail leaves a valid chain, so the newest
``(seq, digest)`` is also kept outside the file, in an :class:`AuditHead` (the state database);
:meth:`AuditLog.verify` compares the two.

Appends are serialised by a thread lock and, across processes, by ``flock`` on the file, which
is opened with ``O_APPEND``, created 0600 and fsynced after every record.  Every line passes
:func:`rotatord.logs.redact_text` before it is hashed, so no key material lands in the file.

The log is never rotated or truncated by rotatord: a new file would start a new chain that the
head does not describe.  After a truncation, appends continue from the head (its seq + 1, its
digest as ``prev``), so the gap stays visible in the file for good.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from .errors import AuditError, RotatordError
from .fsutil import fsync_dir
from .logs import json_safe, redact_text
from .timeutil import Clock, SystemClock, format_ts

__all__ = ["GENESIS", "AuditHead", "AuditLog", "AuditReport", "line_digest", "verify_file"]

log = logging.getLogger(__name__)

#: The ``prev`` of the first record.
GENESIS = "0" * 64
_RESERVED = frozenset({"seq", "ts", "event", "prev"})
_BLOCK = 8192


class AuditHead(Protocol):
    """Where the newest record's ``(seq, digest)`` is kept, outside the log file."""

    def load(self) -> tuple[int, str] | None: ...

    def save(self, seq: int, digest: str) -> None: ...


@dataclass(frozen=True)
class AuditReport:
    """The outcome of :meth:`AuditLog.verify`: each problem names its line number."""

    ok: bool
    records: int
    problems: list[str] = field(default_factory=list)


def line_digest(line: bytes) -> str:
    """The hex SHA-256 that the next record carries as ``prev`` (``line`` without its newline)."""
    return hashlib.sha256(line).hexdigest()


def _parse(line: bytes) -> dict[str, object] | None:
    """The record in ``line``, or None when it is not a JSON object with an int seq and str prev."""
    try:
        record = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict):
        return None
    seq = record.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1 or not isinstance(record.get("prev"), str):
        return None
    return record


def _reverse_lines(fd: int, size: int, block: int = _BLOCK) -> Iterator[bytes]:
    """Yield the lines of the first ``size`` bytes of ``fd``, last first, without newlines.

    Reads backwards in blocks, so finding the newest record costs one block, not the file.  The
    first item is whatever follows the last newline: empty unless the last write was torn.
    """
    pos = size
    pending = b""
    while pos > 0:
        step = min(block, pos)
        pos -= step
        pending = os.pread(fd, step, pos) + pending
        parts = pending.split(b"\n")
        pending = parts[0]
        yield from reversed(parts[1:])
    yield pending


def _read_tail(fd: int, size: int) -> tuple[tuple[int, str] | None, bool]:
    """The newest parsable record's ``(seq, digest)`` and whether the file lacks a final newline."""
    lines = _reverse_lines(fd, size)
    fragment = next(lines)
    # A torn fragment that still parses becomes a whole line with the next append, so it counts.
    for line in itertools.chain((fragment,), lines):
        record = _parse(line)
        if record is not None:
            seq = record["seq"]
            assert isinstance(seq, int)
            return (seq, line_digest(line)), bool(fragment)
    return None, bool(fragment)


class AuditLog:
    """An append-only, hash-chained audit log at ``path``; see the module docstring."""

    def __init__(self, path: Path, head: AuditHead | None = None, *, clock: Clock | None = None) -> None:
        self.path = Path(path)
        self.head = head
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._lock = threading.Lock()

    def append(self, event: str, **fields: object) -> dict[str, object]:
        """Append one record and return it as written (redacted).

        Raises ValueError for an empty event or a field named seq, ts, event or prev, and
        AuditError when the file cannot be opened, locked, written or synced.  Errors of
        ``head.save`` propagate as they are; the record is then already durable, which
        :meth:`verify` accepts (a log longer than its head).
        """
        if not isinstance(event, str) or not event:
            raise ValueError("an audit event is a non-empty string")
        clash = _RESERVED.intersection(fields)
        if clash:
            raise ValueError(f"audit fields may not be named {sorted(clash)}")
        with self._lock:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                raise AuditError(f"cannot open the audit log {self.path}: {exc.strerror or exc}") from exc
            try:
                return self._append_locked(fd, event, fields)
            finally:
                os.close(fd)  # also releases the flock

    def _append_locked(self, fd: int, event: str, fields: dict[str, object]) -> dict[str, object]:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            size = os.fstat(fd).st_size
            tail, torn = _read_tail(fd, size)
        except OSError as exc:
            raise AuditError(f"cannot read the audit log {self.path}: {exc.strerror or exc}") from exc
        seq, prev = self._next(tail)
        record = {key: json_safe(value) for key, value in fields.items()}
        record.update(seq=seq, ts=format_ts(self._clock.now()), event=redact_text(event), prev=prev)
        line = redact_text(json.dumps(record, sort_keys=True, separators=(",", ":")))
        raw = line.encode("ascii")
        # A torn last line (a crash mid-write) gets its own line end, so this record stays whole.
        data = (b"\n" if torn else b"") + raw + b"\n"
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
            if size == 0:
                fsync_dir(self.path.parent)  # the new file's directory entry must survive a crash too
        except OSError as exc:
            raise AuditError(f"cannot write the audit log {self.path}: {exc.strerror or exc}") from exc
        if self.head is not None:
            self.head.save(seq, line_digest(raw))
        written: dict[str, object] = json.loads(line)
        return written

    def _next(self, tail: tuple[int, str] | None) -> tuple[int, str]:
        """The seq and prev of the next record, from the file's tail and the head."""
        file_seq, file_digest = tail if tail is not None else (0, GENESIS)
        stored = self.head.load() if self.head is not None else None
        if stored is None or stored[0] < file_seq:
            # No head, or the file is ahead of it (a crash between an append and head.save).
            return file_seq + 1, file_digest
        head_seq, head_digest = stored
        if (head_seq, head_digest) != (file_seq, file_digest):
            # Chaining to the head keeps a truncated or edited tail visible in the file for good.
            log.warning(
                "audit log tail does not match its head; continuing the chain from the head",
                extra={"path": str(self.path), "file_seq": file_seq, "head_seq": head_seq},
            )
        return head_seq + 1, head_digest

    def verify(self) -> AuditReport:
        """Check the chain, and the head when there is one; report problems, never raise.

        Without a head an edited last record or a cut-off tail cannot be detected.  A log with
        more records than its head and a valid chain is fine (a crash before ``head.save``).
        """
        problems: list[str] = []
        stored: tuple[int, str] | None = None
        if self.head is not None:
            try:
                stored = self.head.load()
            except (RotatordError, OSError) as exc:
                problems.append(f"cannot read the audit head: {exc}")
        records = 0
        last_seq, last_digest, last_lineno = 0, GENESIS, 0
        at_head: tuple[int, str] | None = None  # (line number, digest) of the record at the head's seq
        try:
            with self.path.open("rb") as fh:
                fcntl.flock(fh.fileno(), fcntl.LOCK_SH)
                for lineno, raw in enumerate(fh, 1):
                    line = raw.removesuffix(b"\n")
                    if not raw.endswith(b"\n"):
                        problems.append(f"line {lineno}: torn record (no line end)")
                    record = _parse(line)
                    if record is None:
                        if raw.endswith(b"\n"):
                            problems.append(f"line {lineno}: not a JSON audit record")
                        continue
                    seq = record["seq"]
                    assert isinstance(seq, int)
                    if seq != last_seq + 1:
                        problems.append(
                            f"line {lineno}: seq {seq} where {last_seq + 1} was expected (records deleted or reordered)"
                        )
                    elif record["prev"] != last_digest:
                        where = f"line {last_lineno}" if last_lineno else "the start of the log"
                        problems.append(f"line {lineno}: chain broken: prev does not match {where} (edited)")
                    digest = line_digest(line)
                    if stored is not None and seq == stored[0] and at_head is None:
                        at_head = (lineno, digest)
                    records += 1
                    last_seq, last_digest, last_lineno = seq, digest, lineno
        except FileNotFoundError:
            if stored is not None:
                problems.append(f"{self.path} is missing but the head records seq {stored[0]}: the log was removed")
            return AuditReport(ok=not problems, records=0, problems=problems)
        except OSError as exc:
            problems.append(f"cannot read {self.path}: {exc.strerror or exc}")
            return AuditReport(ok=False, records=records, problems=problems)
        if stored is not None:
            head_seq, head_digest = stored
            if last_seq < head_seq:
                problems.append(
                    f"line {last_lineno}: the log ends at seq {last_seq} but the head records seq {head_seq}:"
                    " the tail was truncated"
                )
            elif at_head is None:
                problems.append(f"the record with seq {head_seq} named by the head is missing (truncated or deleted)")
            elif at_head[1] != head_digest:
                problems.append(f"line {at_head[0]}: record {head_seq} differs from the digest in the head (edited)")
        return AuditReport(ok=not problems, records=records, problems=problems)


def verify_file(path: Path, head: AuditHead | None) -> AuditReport:
    """Verify the audit log at ``path`` against ``head`` (None: the chain only)."""
    return AuditLog(path, head).verify()
