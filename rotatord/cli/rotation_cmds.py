"""``rotate``, ``rollback``, ``status`` and ``history``.

Commands that change things go through the running daemon; ``rotate --offline`` is the one
exception, and it takes the daemon's own lock so the two can never act at once.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from typing import Any

from ..config import Settings
from ..errors import DaemonNotRunning, StateError, UnknownSecret, UsageError
from ..timeutil import utcnow
from .client import call_daemon
from .common import load, load_checked
from .output import emit_json, out, relative, table

__all__ = ["adopt", "history", "rollback", "rotate", "status"]

#: ``rotate --emergency`` that could not finish yet (the daemon retries): EX_TEMPFAIL.
EX_UNFINISHED = 75


def _require(settings: Settings, name: str | None) -> None:
    if name is not None and settings.secret(name) is None:
        raise UnknownSecret(name)


def rotate(args: argparse.Namespace) -> int:
    _path, settings = load_checked(args)
    _require(settings, args.name)
    if args.emergency and not (args.reason or "").strip():
        raise UsageError(
            "--emergency needs --reason TEXT: say why the secret is compromised (it goes into the audit log)"
        )
    _check_reason(args.reason)
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
        if args.emergency:
            from .blast_view import follow

            live = sys.stderr.isatty() and not args.json
            result = follow(settings.daemon.socket_path, request, args.name, live=live)
        else:
            result = call_daemon(settings.daemon.socket_path, request)
    blast = result.get("blast_radius") if args.emergency else None
    if args.json:
        emit_json(result)
    else:
        _describe_rotation(result, utcnow(), offline=args.offline)
        if blast:
            from .blast_view import render

            out(render(blast, utcnow()))
    if blast and blast["state"] != "done":
        sys.stderr.write(
            f"rotatord: {args.name}: the emergency rotation is not finished ({blast['state']}); the daemon goes on"
            f" with it: follow it with 'rotatord status {args.name}'\n"
        )
        return EX_UNFINISHED
    return 0


def _check_reason(reason: str | None) -> None:
    """The control socket's rule, checked here too so ``--offline`` refuses the same input."""
    if reason is not None and (len(reason) > 500 or any(ord(c) < 32 for c in reason)):
        raise UsageError("--reason must be one line of at most 500 characters")


def rollback(args: argparse.Namespace) -> int:
    _path, settings = load_checked(args)
    _require(settings, args.name)
    _check_reason(args.reason)
    request = {"op": "rollback", "name": args.name}
    if args.reason:
        request["reason"] = args.reason
    result = call_daemon(settings.daemon.socket_path, request)
    if args.json:
        emit_json(result)
    else:
        out(f"{args.name}: rotation {result['version']} rolled back; the previous primary is in force again")
    return 0


def adopt(args: argparse.Namespace) -> int:
    """Accept the backend's current document of NAME (validated first) and clear its drift."""
    _path, settings = load_checked(args)
    _require(settings, args.name)
    if args.offline:
        from ..daemon.lock import StateLock
        from ..daemon.runtime import build_runtime

        with StateLock(settings.daemon.state_dir):
            runtime = build_runtime(settings)
            try:
                result = runtime.engine.adopt(args.name, actor="cli:offline", reason=args.reason, now=utcnow())
            finally:
                runtime.close()
    else:
        request = {"op": "adopt", "name": args.name}
        if args.reason:
            request["reason"] = args.reason
        result = call_daemon(settings.daemon.socket_path, request)
    if args.json:
        emit_json(result)
    elif result["drift_cleared"]:
        out(
            f"{args.name}: version {result['backend_version']} adopted; drift ({result['reason']}) cleared, "
            "rotations resume"
        )
    else:
        out(f"{args.name}: version {result['backend_version']} adopted (there was no open drift)")
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
            if r["state"] == "held":
                out(f"{r['name']}: {r['error']}")
            else:
                out(f"{r['name']}: failing: {r['error']} (attempt {r['attempts']})")
        if r.get("drift"):
            d = r["drift"]
            out(
                f"{r['name']}: DRIFT ({d['reason']}) since {d['detected_at']}: {d['message']}; rotations paused: "
                f"run 'rotatord adopt {r['name']}' or 'rotatord rotate {r['name']} --emergency'"
            )
        used = r.get("revoked_use") or {}
        if used.get("count"):
            out(
                f"{r['name']}: a revoked credential was presented {used['count']} time(s) "
                f"({used['fingerprints']} fingerprint(s)), last {relative(used['last_at'], now)} "
                f"from {used['last_source'] or 'an unnamed source'}: a forgotten consumer or a thief"
            )
    for r in rows:
        blast = r.get("blast_radius")
        # The emergency's report: always for the secret asked about, and while it runs for all.
        if blast and (args.name or blast["state"] not in ("done", "rolled back")):
            from .blast_view import render

            out(render(blast, now))
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
            _note(r),
        ]
        for r in rows
    ]
    out(table(headers, body) if body else f"{args.name}: no rotations yet")
    return 0


def _note(r: dict[str, Any]) -> str:
    if r.get("status") == "rolled_back":
        return "rolled back" + (f": {r['rollback_reason']}" if r.get("rollback_reason") else "")
    return str(r["error"] or r["reason"] or "")


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
