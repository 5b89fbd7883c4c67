"""``audit verify``: check the hash chain of the audit log against the head kept in the state DB."""

from __future__ import annotations

import argparse
import sys

from ..audit import verify_file
from ..engine.journal import Journal
from ..engine.lease import audit_head
from ..errors import StateError
from .common import load
from .output import emit_json, out

__all__ = ["audit"]


def audit(args: argparse.Namespace) -> int:
    _path, settings = load(args)
    if not settings.daemon.state_dir.exists():
        raise StateError(f"no state at {settings.daemon.state_dir}: nothing to verify yet")
    journal = Journal(settings.daemon.database_url)
    journal.create()
    report = verify_file(settings.daemon.audit_path, audit_head(journal, settings.daemon.instance))
    if args.json:
        emit_json({"ok": report.ok, "records": report.records, "problems": report.problems})
    elif report.ok:
        out(f"{settings.daemon.audit_path}: ok, {report.records} records, chain intact")
    else:
        for problem in report.problems:
            sys.stderr.write(f"rotatord: audit: {problem}\n")
        out(f"{settings.daemon.audit_path}: FAILED ({len(report.problems)} problems in {report.records} records)")
    return 0 if report.ok else 65
