"""The control socket protocol: one JSON request line, one JSON response line.

Requests are size-bounded and validated field by field; anything malformed gets an error reply
and never reaches the engine.  Shared by the daemon's server and the CLI's client.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from ..errors import ControlError, RotatordError

__all__ = ["MAX_REQUEST", "OPS", "Request", "error_reply", "ok_reply", "parse_request"]

MAX_REQUEST = 64 * 1024
MAX_RESPONSE = 16 * 1024 * 1024
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
WEBHOOK_ID_RE = re.compile(r"^msg_[0-9a-f]{8,64}$")
TS_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?(Z|[+-]\d{2}:\d{2})$")
#: op -> {field: (type, required)}
OPS: dict[str, dict[str, tuple[type, bool]]] = {
    "ping": {},
    "status": {"name": (str, False)},
    "history": {"name": (str, True)},
    "rotate": {"name": (str, True), "emergency": (bool, False), "reason": (str, False)},
    "rollback": {"name": (str, True), "reason": (str, False)},
    "adopt": {"name": (str, True), "reason": (str, False)},
    "reload": {},
    "census": {"name": (str, True)},
    "webhooks.list": {"consumer": (str, False), "status": (str, False), "webhook_id": (str, False)},
    "webhooks.replay": {"consumer": (str, False), "webhook_id": (str, False), "since": (str, False)},
    "reencrypt": {"name": (str, True)},
    # A bot's report that a revoked credential was presented (see rotatord.daemon.reports).
    "report.revoked_use": {"report": (dict, True)},
}


@dataclass(frozen=True)
class Request:
    op: str
    name: str | None = None
    emergency: bool = False
    reason: str | None = None
    consumer: str | None = None
    status: str | None = None
    webhook_id: str | None = None
    since: str | None = None
    report: dict[str, Any] | None = None


def parse_request(line: bytes) -> Request:
    """Validate one request line; raise ControlError saying what is wrong."""
    if len(line) > MAX_REQUEST:
        raise ControlError(f"request larger than {MAX_REQUEST} bytes")
    try:
        data = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        raise ControlError("request is not valid JSON") from None
    if not isinstance(data, dict):
        raise ControlError("request must be a JSON object")
    op = data.get("op")
    if not isinstance(op, str) or op not in OPS:
        raise ControlError(f"unknown op (expected one of: {', '.join(sorted(OPS))})")
    spec = OPS[op]
    unknown = set(data) - set(spec) - {"op"}
    if unknown:
        raise ControlError(f"unknown field(s) for {op}: {', '.join(sorted(unknown))}")
    for field, (typ, required) in spec.items():
        if field not in data:
            if required:
                raise ControlError(f"{op}: field {field!r} is required")
            continue
        value = data[field]
        if not isinstance(value, typ):
            raise ControlError(f"{op}: field {field!r} must be {typ.__name__}")
        if field in ("name", "consumer") and not (isinstance(value, str) and NAME_RE.match(value)):
            raise ControlError(f"{op}: field 'name' is not a valid secret name")
        if field == "reason" and isinstance(value, str) and (len(value) > 500 or any(ord(c) < 32 for c in value)):
            raise ControlError(f"{op}: field 'reason' must be one line of at most 500 characters")
        if field == "webhook_id" and not (isinstance(value, str) and WEBHOOK_ID_RE.match(value)):
            raise ControlError(f"{op}: field 'webhook_id' is not a webhook id (msg_<hex>)")
        if field == "status" and value not in ("pending", "delivered", "dead", "skipped"):
            raise ControlError(f"{op}: field 'status' must be pending, delivered, dead or skipped")
        if field == "since" and not (isinstance(value, str) and TS_RE.match(value)):
            raise ControlError(f"{op}: field 'since' must be an ISO 8601 timestamp with a timezone")
    return Request(
        op=op,
        name=data.get("name"),
        emergency=bool(data.get("emergency", False)),
        reason=data.get("reason"),
        consumer=data.get("consumer"),
        status=data.get("status"),
        webhook_id=data.get("webhook_id"),
        since=data.get("since"),
        report=data.get("report"),
    )


def ok_reply(result: Any) -> bytes:
    return json.dumps({"ok": True, "result": result}, separators=(",", ":")).encode() + b"\n"


def error_reply(exc: RotatordError) -> bytes:
    body = {"type": type(exc).__name__, "message": str(exc), "exit": exc.exit_code}
    return json.dumps({"ok": False, "error": body}, separators=(",", ":")).encode() + b"\n"
