"""``webhooks list`` and ``webhooks replay``: what was sent to whom, and sending it again."""

from __future__ import annotations

import argparse
from typing import Any

from .client import call_daemon
from .common import load
from .output import emit_json, out, table

__all__ = ["webhooks"]


def webhooks(args: argparse.Namespace) -> int:
    _path, settings = load(args)
    request: dict[str, Any] = {"op": f"webhooks.{args.webhooks_command}"}
    for field in ("consumer", "status", "webhook_id", "since"):
        value = getattr(args, field, None)
        if value is not None:
            request[field] = value
    result = call_daemon(settings.daemon.socket_path, request)
    if args.json:
        emit_json(result)
    elif args.webhooks_command == "replay":
        out(f"{result['replayed']} deliver{'y' if result['replayed'] == 1 else 'ies'} queued again (same webhook ids)")
    else:
        _print_list(result)
    return 0


def _print_list(result: dict[str, Any]) -> None:
    rows = [
        [
            str(d.get("webhook_id", "")),
            str(d.get("consumer", "")),
            str(d.get("event_type", "")),
            str(d.get("status", "")),
            str(d.get("attempts", "")),
            str(d.get("created_at") or ""),
            str(d.get("last_error") or ""),
        ]
        for d in result["deliveries"]
    ]
    out(
        table(["ID", "CONSUMER", "EVENT", "STATUS", "ATTEMPTS", "CREATED", "LAST ERROR"], rows)
        if rows
        else "no deliveries"
    )
    for e in result["endpoints"]:
        state = "disabled (410)" if e["disabled"] else "failing" if e["failing"] else "ok"
        out(f"consumer {e['consumer']}: {state}; last success {e['last_success_at'] or 'never'}")
