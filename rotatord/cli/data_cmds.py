"""``census`` and ``reencrypt``: what the data stores hold, and moving it to the primary key."""

from __future__ import annotations

import argparse
import sys
import threading
import time
from typing import Any

from ..errors import DaemonNotRunning, RotatordError, UnknownSecret
from ..timeutil import utcnow
from .client import call_daemon
from .common import load, load_checked
from .output import emit_json, out, table

__all__ = ["census", "reencrypt"]


def census(args: argparse.Namespace) -> int:
    _path, settings = load_checked(args)
    if settings.secret(args.name) is None:
        raise UnknownSecret(args.name)
    try:
        report = call_daemon(settings.daemon.socket_path, {"op": "census", "name": args.name})
    except DaemonNotRunning:
        # A census only reads, so it may run here while the daemon is down.
        from ..daemon.runtime import build_runtime
        from ..engine.report import census_report

        runtime = build_runtime(settings)
        try:
            report = census_report(runtime.engine, args.name, utcnow())
        finally:
            runtime.close()
    if args.json:
        emit_json(report)
        return 0
    keys = sorted({k for s in report["stores"] for k in s["by_key"]}, key=_key_order)
    rows = [
        [s["store"], *(str(s["by_key"].get(k, 0)) for k in keys), str(s["unreadable"]), str(s["total"])]
        for s in report["stores"]
    ]
    if not rows:
        out(f"{args.name}: no data stores configured")
        return 0
    out(table(["STORE", *keys, "UNREADABLE", "TOTAL"], rows))
    if report["quarantined"]:
        out(f"quarantined: {len(report['quarantined'])} item(s) no key can read (never rewritten):")
        for q in report["quarantined"][:20]:
            out(f"  {q['store']}  {q['locator']}  ({q['reason']})")
    return 0


def _key_order(key_id: str) -> tuple[int, str]:
    return (int(key_id[1:]), key_id) if key_id[1:].isdigit() else (1 << 30, key_id)


def reencrypt(args: argparse.Namespace) -> int:
    _path, settings = load(args)
    if settings.secret(args.name) is None:
        raise UnknownSecret(args.name)
    socket_path = settings.daemon.socket_path
    result: dict[str, Any] = {}
    failure: list[BaseException] = []

    def request() -> None:
        try:
            result.update(call_daemon(socket_path, {"op": "reencrypt", "name": args.name}, timeout=24 * 3600))
        except BaseException as exc:  # handed to the main thread
            failure.append(exc)

    worker = threading.Thread(target=request, daemon=True)
    worker.start()
    show = sys.stderr.isatty() and not args.json
    bar = _ProgressBar() if show else None
    while worker.is_alive():
        worker.join(0.5)
        if bar is not None and worker.is_alive():
            bar.update(_progress(socket_path, args.name))
    if bar is not None:
        bar.finish()
    if failure:
        exc = failure[0]
        raise exc if isinstance(exc, RotatordError) else RuntimeError("re-encryption request failed") from exc
    if args.json:
        emit_json(result)
    else:
        details = ", ".join(f"{k} {v}" for k, v in result.items() if k not in ("rotation", "phase", "error") and v)
        out(
            f"{args.name}: rotation {result.get('rotation')} phase {result.get('phase')}"
            + (f"; {details}" if details else "")
        )
        if result.get("error"):
            out(f"  still failing: {result['error']}")
    return 0


def _progress(socket_path: Any, name: str) -> list[dict[str, Any]]:
    try:
        rows = call_daemon(socket_path, {"op": "status", "name": name}, timeout=5)
    except RotatordError:
        return []
    return list(rows[0].get("progress") or []) if rows else []


class _ProgressBar:
    """done/total, rate and ETA per store, redrawn in place on a terminal."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.lines = 0

    def update(self, rows: list[dict[str, Any]]) -> None:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        text = []
        for row in rows:
            done, total = int(row["scanned"]), row.get("estimate")
            rate = done / elapsed
            if total:
                frac = min(done / total, 1.0)
                eta = (total - done) / rate if rate > 0 else float("inf")
                bar = "#" * int(frac * 30)
                text.append(f"{row['store'][:40]:40} [{bar:30}] {done}/{total} {rate:,.0f}/s ETA {eta:,.0f}s")
            else:
                text.append(f"{row['store'][:40]:40} {done} items {rate:,.0f}/s")
        sys.stderr.write("\x1b[F" * self.lines + "".join(f"\x1b[2K{t}\n" for t in text))
        sys.stderr.flush()
        self.lines = len(text)

    def finish(self) -> None:
        sys.stderr.flush()
