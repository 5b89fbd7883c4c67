"""``rotatord scan PATH...``: which rotatord credentials leaked into these files, and are they live?

The first question after a leak.  Files and directories are walked without following symbolic
links (a path named on the command line is followed, as ``grep -r`` does); FIFOs, sockets and
devices are skipped, and so are files over ``--max-size``, with a note.  Findings name the file,
the line, the kind, a fingerprint (the first hex digits of the material's SHA-256), the token's
public prefix, the secret and key/credential id, and its state; never the material.

Exit codes, like grep: 0 nothing found; 1 findings; 2 nothing found but the scan was incomplete
(a file could not be read or was too large, or a secret's backend could not be read); 64 a path
does not exist or a flag is wrong (then nothing is scanned); 78 the configuration is invalid.
It reads the backends directly and needs no daemon; it changes nothing anywhere.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..interfaces import Backend
from ..scan.finder import Candidate, find_candidates
from ..scan.index import Known, KnownIndex, build_index
from ..timeutil import utcnow
from .common import load_checked
from .output import emit_json, out

__all__ = ["scan"]

EXIT_FOUND = 1
EXIT_INCOMPLETE = 2
_STATE_TEXT = {
    "valid": "VALID (current / primary): rotate it now",
    "accepted": "STILL ACCEPTED (previous / decrypt-only): rotate or retire it",
    "expired": "expired",
    "revoked": "revoked (a bot still presenting it is a forgotten consumer or a thief)",
    "retired": "retired (no longer in the ring)",
    "unknown": "unknown (checksum ok; no managed secret knows it)",
}


@dataclass
class _Report:
    findings: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    files: int = 0
    incomplete: bool = False


def _finding(path: Path, cand: Candidate, known: Known | None) -> dict[str, Any]:
    return {
        "path": str(path),
        "line": cand.line,
        "kind": cand.kind,
        "prefix": cand.prefix,
        "fingerprint": cand.fingerprint,
        "secret": known.secret if known else None,
        "credential": known.credential if known else None,
        "backend_version": known.backend_version if known else None,
        "state": known.state if known else "unknown",
    }


def _read(path: Path, max_bytes: int, report: _Report, *, follow: bool) -> bytes | None:
    """The bytes of a regular file, or None (with a note) for anything else."""
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)  # O_NONBLOCK: opening a FIFO must not hang the scan
    except OSError as exc:
        if not follow and path.is_symlink():
            report.skipped.append({"path": str(path), "reason": "symbolic link (not followed)"})
            return None
        report.skipped.append({"path": str(path), "reason": f"unreadable: {exc.strerror or exc}"})
        report.incomplete = True
        return None
    with open(fd, "rb", closefd=True) as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode):
            report.skipped.append({"path": str(path), "reason": "not a regular file"})
            return None
        if info.st_size > max_bytes:
            mib = info.st_size / 2**20
            report.skipped.append({"path": str(path), "reason": f"larger than --max-size ({mib:.0f} MiB)"})
            report.incomplete = True
            return None
        try:
            return fh.read(max_bytes + 1)[:max_bytes]
        except OSError as exc:
            report.skipped.append({"path": str(path), "reason": f"unreadable: {exc.strerror or exc}"})
            report.incomplete = True
            return None


def _walk(root: Path, report: _Report) -> Iterator[tuple[Path, bool]]:
    """(file, follow) pairs: the root itself is followed, nothing found under it is."""
    if not root.is_dir():
        yield root, True
        return

    def unreadable(exc: OSError) -> None:
        report.skipped.append({"path": str(exc.filename), "reason": f"unreadable: {exc.strerror or exc}"})
        report.incomplete = True

    for directory, dirs, files in os.walk(root, onerror=unreadable, followlinks=False):
        dirs.sort()
        for name in sorted(files) + sorted(d for d in dirs if os.path.islink(os.path.join(directory, d))):
            yield Path(directory) / name, False


def _scan_paths(paths: list[Path], index: KnownIndex, max_bytes: int) -> _Report:
    report = _Report()
    for root in paths:
        for path, follow in _walk(root, report):
            data = _read(path, max_bytes, report, follow=follow)
            if data is None:
                continue
            report.files += 1
            for cand in find_candidates(data):
                known = index.lookup(cand.material)
                # A key-shaped string nobody manages is indistinguishable from random base64.
                if known is None and cand.kind != "api_token":
                    continue
                report.findings.append(_finding(path, cand, known))
    return report


def _print(report: _Report, problems: list[str]) -> None:
    for f in report.findings:
        name = f"{f['prefix']}_…" if f["prefix"] else ("whsec_…" if f["kind"] == "webhook_secret" else "key")
        owner = f"{f['secret']} {f['credential']}" if f["secret"] else "-"
        out(
            f"{f['path']}:{f['line']}: {f['kind']} {name} fingerprint {f['fingerprint']}  "
            f"{owner}  {_STATE_TEXT[f['state']]}"
        )
    for s in report.skipped:
        sys.stderr.write(f"rotatord scan: note: {s['path']}: skipped: {s['reason']}\n")
    for p in problems:
        sys.stderr.write(f"rotatord scan: warning: {p}\n")
    live = sum(1 for f in report.findings if f["state"] in ("valid", "accepted"))
    summary = f"{len(report.findings)} finding(s), {live} still live, in {report.files} file(s) scanned"
    sys.stderr.write(f"rotatord scan: {summary}\n")


def scan(args: argparse.Namespace) -> int:
    paths = [Path(p) for p in args.paths]
    # Every path must exist before anything is read, so a typo scans nothing and says so.
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise UsageError(f"scan: {missing[0]}: no such file or directory (nothing was scanned)")
    if args.max_size <= 0:
        raise UsageError("scan: --max-size must be a positive number of MiB")
    _config, settings = load_checked(args)
    from ..backends.registry import open_backend

    opened: dict[str, Backend] = {}

    def backend_for(name: str) -> Backend:
        if name not in opened:
            opened[name] = open_backend(name, settings.backends[name])
        return opened[name]

    try:
        index = build_index(settings.secrets, backend_for, utcnow())
    finally:
        for backend in opened.values():
            with contextlib.suppress(Exception):
                backend.close()
    report = _scan_paths(paths, index, int(args.max_size * 2**20))
    if index.problems:
        report.incomplete = True
    if args.json:
        emit_json(
            {
                "findings": report.findings,
                "files_scanned": report.files,
                "skipped": report.skipped,
                "problems": index.problems,
                "secrets_checked": index.secrets_indexed,
            }
        )
    else:
        _print(report, index.problems)
    if report.findings:
        return EXIT_FOUND
    return EXIT_INCOMPLETE if report.incomplete else 0
