"""``rotate``, ``rollback``, ``status`` and ``history``.

Commands that change things go through the running daemon; ``rotate --offline`` is the one
exception, and it takes the daemon's own lock so the two can never act at once.
"""

from __future__ import annotations

import argparse
from datetime import datetime
from typing import Any

from ..config import Settings
from ..errors import DaemonNotRunning, StateError, UnknownSecret
from ..timeutil import utcnow
from .client import call_daemon
from .common import load, load_checked
from .output import emit_json, out, relative, table

__all__ = ["history", "rollback", "rotate", "status"]


def _require(settings: Settings, name: str | None) -> None:
    if name is not None and settings.secret(name) is None:
        raise UnknownSecret(name)


def rotate(args: argparse.Namespace) -> int:
    _path, settings = load_checked(args)
    _require(settings, args.name)
    actor = "cli:offline" if args.offline else "cli"
    if args.offline:
        from ..daemon.leader import Leadership
        from ..daemon.lock import StateLock
        from ..daemon.runtime import build_runtime
        from ..engine.report import secret_status

        with StateLock(settings.daemon.state_dir):
            # On a shared PostgreSQL state database the offline run must hold the leader lease too.
            lead = Leadership.for_settings(settings.daemon)
            try:
                lead.acquire_now("rotate --offline")
                lead.start()
                runtime = build_runtime(settings)
                if lead.multi:
                    runtime.journal.guard_writes(lead.check_write)
                try:
                    now = utcnow()
                    runtime.engine.rotate(
                        args.name, trigger=actor, emergency=args.emergency, reason=args.reason, now=now
                    )
                    result = secret_status(runtime.engine, args.name, utcnow())
                finally:
                    runtime.close()
            finally:
                lead.stop()
    else:
        request = {"op": "rotate", "name": args.name, "emergency": args.emergency}
        if args.reason:
            request["reason"] = args.reason
        result = call_daemon(settings.daemon.socket_path, request)
    if args.json:
        emit_json(result)
    else:
        _describe_rotation(result, utcnow(), offline=args.offline)
    return 0


def rollback(args: argparse.Namespace) -> int:
    _path, settings = load_checked(args)
    _require(settings, args.name)
    request = {"op": "rollback", "name": args.name}
    if args.reason:
        request["reason"] = args.reason
    result = call_daemon(settings.daemon.socket_path, request)
    if args.json:
        emit_json(result)
    else:
        out(f"{args.name}: rotation {result['version']} rolled back; the previous primary is in force again")
    return 0


def _describe_rotation(s: dict[str, Any], now: datetime, *, offline: bool) -> None:
    line = f"{s['name']}: rotation {s['version']} {s['state']}, phase {s['phase']}"
    if s.get("next_step"):
        line += f"; next step {s['next_step']} {relative(s.get('next_step_at'), now)}"
    if s.get("error"):
        line += f"\n  failing: {s['error']} (attempt {s['attempts']}; retried automatically)"
    if offline and s.get("next_step"):
        line += "\n  the daemon finishes the remaining steps when it starts"
    out(line)


def status(args: argparse.Namespace) -> int:
    _path, settings = load(args)
    _require(settings, args.name)
    request: dict[str, Any] = {"op": "status"}
    if args.name:
        request["name"] = args.name
    running = True
    try:
        rows = call_daemon(settings.daemon.socket_path, request)
    except DaemonNotRunning:
        from ..engine.report import secret_status

        running = False
        rows = _offline(settings, lambda rt, n: secret_status(rt.engine, n, utcnow()), args.name)
    webhooks = _webhook_summary(settings) if running and settings.consumers else None
    daemon: dict[str, Any] = {"running": running}
    if running:
        ping = call_daemon(settings.daemon.socket_path, {"op": "ping"})
        daemon.update(role=ping.get("role", "single"), instance=ping.get("instance"), leader=ping.get("leader"))
    if args.json:
        emit_json({"daemon": daemon, "secrets": rows, "webhooks": webhooks})
        return 0
    now = utcnow()
    headers = ["SECRET", "KIND", "VERSION", "PHASE", "STATE", "ROTATED", "NEXT ROTATION", "NEXT STEP"]
    body = [
        [
            r["name"],
            r["kind"],
            str(r["version"]),
            r["phase"],
            r["state"],
            relative(r["rotated_at"], now),
            relative(r["next_rotation_at"], now),
            f"{r['next_step']} {relative(r['next_step_at'], now)}" if r["next_step"] else "-",
        ]
        for r in rows
    ]
    out(table(headers, body))
    for r in rows:
        if r.get("error"):
            out(f"{r['name']}: failing: {r['error']} (attempt {r['attempts']})")
    if webhooks is not None:
        failing = [e["consumer"] for e in webhooks["endpoints"] if e["failing"] or e["disabled"]]
        line = f"webhooks: {webhooks['pending']} pending, {len(webhooks['dead'])} dead-lettered"
        out(line + (f"; failing: {', '.join(failing)}" if failing else ""))
    if not running:
        out("daemon: not running (read from the state database)")
    elif daemon["role"] == "leader":
        out(f"daemon: leader (instance {daemon['instance']})")
    elif daemon["role"] == "standby":
        leader = daemon["leader"]
        out(f"daemon: standby (instance {daemon['instance']}); " + (f"leader: {leader}" if leader else "no leader"))
    return 0


def _webhook_summary(settings: Settings) -> dict[str, Any]:
    result = call_daemon(settings.daemon.socket_path, {"op": "webhooks.list", "status": "dead"})
    return {"pending": result["pending"], "dead": result["deliveries"], "endpoints": result["endpoints"]}


def history(args: argparse.Namespace) -> int:
    _path, settings = load(args)
    _require(settings, args.name)
    try:
        rows = call_daemon(settings.daemon.socket_path, {"op": "history", "name": args.name})
    except DaemonNotRunning:
        from ..engine.report import history_report

        rows = _offline(settings, lambda rt, n: history_report(rt.engine, n), args.name)[0]
    if args.json:
        emit_json(rows)
        return 0
    now = utcnow()
    headers = ["VERSION", "PHASE", "STATUS", "STARTED", "FINISHED", "TRIGGER", "KEYS", "NOTE"]
    body = [
        [
            str(r["version"]),
            r["phase"],
            r["status"],
            r["started_at"] or "-",
            relative(r["finished_at"], now) if r["finished_at"] else "-",
            r["trigger"] + (" (emergency)" if r["emergency"] else ""),
            f"{r['previous_key'] or '-'} -> {r['new_key'] or '-'}",
            r["error"] or r["reason"] or "",
        ]
        for r in rows
    ]
    out(table(headers, body) if body else f"{args.name}: no rotations yet")
    return 0


def _offline(settings: Settings, fn: Any, name: str | None) -> list[Any]:
    if not settings.daemon.state_dir.exists():
        raise StateError(f"no state at {settings.daemon.state_dir}: run 'rotatord init', then 'rotatord run'")
    from ..daemon.runtime import build_runtime

    runtime = build_runtime(settings)
    try:
        names = [name] if name else [s.name for s in settings.secrets]
        return [fn(runtime, n) for n in names]
    finally:
        runtime.close()
