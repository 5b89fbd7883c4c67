"""The blast-radius report of an emergency rotation, for people: a block of text, redrawn live.

``rotate --emergency`` sends the request in a thread and, on a terminal, redraws the report
from ``status NAME`` every half second on stderr while the daemon works; the final report goes
to stdout.  ``--json`` prints the daemon's structure as it is (see engine/blast.py).
"""

from __future__ import annotations

import sys
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

from ..errors import RotatordError
from ..timeutil import utcnow
from .client import call_daemon
from .output import relative, table

__all__ = ["follow", "render"]

#: An emergency can move millions of rows: the CLI waits as long as the daemon works.
FOLLOW_TIMEOUT = 24 * 3600.0
REDRAW_SECONDS = 0.5


def _count(n: int | None, estimated: bool = False) -> str:
    if n is None:
        return "?"
    return f"~{n}" if estimated else str(n)


def render(b: dict[str, Any], now: datetime) -> str:
    """The report as lines of text (no key material: the structure holds ids and counts only)."""
    fernet = b["kind"] == "fernet"
    what = "key" if fernet else "token"
    doing = f" (now: {b['next_step']})" if b["next_step"] else ""
    lines = [
        f"EMERGENCY rotation {b['version']} of {b['secret']}: {b['state']}, phase {b['phase']}{doing}",
        f"  reason: {b['reason']!r}; declared {relative(b['opened_at'], now)} by {b['trigger']}",
        f"  compromised {what}: {b['compromised_key'] or 'none (the secret did not exist yet)'};"
        f" new {what}: {b['new_key'] or 'not yet generated'}",
    ]
    if b["stores"]:
        rows = [
            [
                s["store"],
                _count(s["exposed"]),
                _count(s["remaining"], s["estimated"]),
                str(s["rewritten"]),
                _count(s["unreadable"]),
                str(s["quarantined"]),
            ]
            for s in b["stores"]
        ]
        headers = ["STORE", "EXPOSED", f"STILL UNDER {b['compromised_key'] or '?'}", "REWRITTEN", "UNREADABLE",
                   "QUARANTINED"]  # fmt: skip
        lines.extend("  " + line for line in table(headers, rows).splitlines())
    if b["consumers"]:
        rows = [
            [
                c["consumer"],
                "yes" if c["acknowledged"] else "NO",
                c["delivery"] + (f", {c['attempts']} attempt(s)" if c["attempts"] else ""),
                c["last_error"] or "",
            ]
            for c in b["consumers"]
        ]
        lines.extend(
            "  " + line for line in table(["CONSUMER", "ACKNOWLEDGED", "DELIVERY", "LAST ERROR"], rows).splitlines()
        )
    lines.extend(_verdict(b, what))
    return "\n".join(lines)


def _verdict(b: dict[str, Any], what: str) -> list[str]:
    old = b["compromised_key"]
    out = []
    if b["retired_at"]:
        why = "the census found nothing that needs it" if b["stores"] else "no data stores are configured"
        out.append(f"  {old} retired at {b['retired_at']}: {why}")
    elif b["revoked_at"]:
        out.append(f"  old {what} {old} revoked at {b['revoked_at']}: it no longer verifies")
    elif b["state"] == "rolled back":
        out.append(f"  rolled back: {old} is the primary again, although it was reported compromised")
    elif old:
        left = b["remaining"]
        items = f"; {_count(left)} item(s) still under it" if b["kind"] == "fernet" and b["stores"] else ""
        if b["stores"] and left is None and b["phase"] == "promoted":
            items = "; counting the items still under it (a read-only census)"
        out.append(f"  {old} is still valid (decrypt-only until the census is clean){items}")
    if b["error"]:
        out.append(f"  failing: {b['error']} (retried automatically)")
    if b["unacknowledged"]:
        out.append(
            f"  not acknowledged: {', '.join(b['unacknowledged'])} (these bots may still hold the compromised "
            f"{what}: check them; 'rotatord webhooks list --consumer NAME' shows the deliveries)"
        )
    return out


def follow(socket_path: Path, request: dict[str, Any], name: str, *, live: bool) -> dict[str, Any]:
    """Send ``request`` (an emergency ``rotate``) and return the daemon's reply.

    With ``live``, the blast-radius report is redrawn on stderr while the daemon works.  Raises
    the daemon's error as the same class.
    """
    result: dict[str, Any] = {}
    failure: list[BaseException] = []

    def send() -> None:
        try:
            result.update(call_daemon(socket_path, request, timeout=FOLLOW_TIMEOUT))
        except BaseException as exc:  # handed to the main thread
            failure.append(exc)

    worker = threading.Thread(target=send, daemon=True)
    worker.start()
    drawn = 0
    while worker.is_alive():
        worker.join(REDRAW_SECONDS)
        if live and worker.is_alive():
            drawn = _redraw(socket_path, name, drawn)
    if failure:
        exc = failure[0]
        raise exc if isinstance(exc, RotatordError) else RuntimeError("the rotate request failed") from exc
    return result


def _redraw(socket_path: Path, name: str, drawn: int) -> int:
    try:
        rows = call_daemon(socket_path, {"op": "status", "name": name}, timeout=5)
    except RotatordError:
        return drawn  # the daemon is busy or restarting: keep the last picture
    report = rows[0].get("blast_radius") if rows else None
    if not report:
        return drawn
    text = render(report, utcnow()).splitlines()
    text += [""] * (drawn - len(text))  # a shorter picture clears the lines the last one used
    sys.stderr.write("\x1b[F" * drawn + "".join(f"\x1b[2K{line}\n" for line in text))
    sys.stderr.flush()
    return len(text)
