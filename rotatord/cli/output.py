"""Human output: aligned tables and relative times.  ``--json`` output bypasses all of this."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from ..logs import redact_text
from ..timeutil import format_duration, parse_ts

__all__ = ["emit_json", "relative", "table"]


def emit_json(data: Any) -> None:
    print(redact_text(json.dumps(data, indent=2, sort_keys=True)))


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return redact_text("\n".join(lines))


def relative(ts: str | None, now: datetime) -> str:
    if ts is None:
        return "-"
    when = parse_ts(ts)
    assert when is not None
    delta = when - now
    if abs(delta) < timedelta(seconds=1):
        return "now"
    if delta > timedelta(0):
        return f"in {format_duration(delta)}"
    return f"{format_duration(-delta)} ago"


def out(text: str) -> None:
    sys.stdout.write(redact_text(text) + "\n")
