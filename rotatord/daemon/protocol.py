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
#: op -> {field: (type, required)}
OPS: dict[str, dict[str, tuple[type, bool]]] = {
    "ping": {},
    "status": {"name": (str, False)},
    "history": {"name": (str, True)},
    "rotate": {"name": (str, True), "emergency": (bool, False), "reason": (str, False)},
    "rollback": {"name": (str, True), "reason": (str, False)},
    "reload": {},
    "census": {"name": (str, True)},
    "reencrypt": {"name": (str, True)},
}


@dataclass(frozen=True)
class Request:
    op: str
    name: str | None = None
    emergency: bool = False
    reason: str | None = None


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
        if field == "name" and not (isinstance(value, str) and NAME_RE.match(value)):
            raise ControlError(f"{op}: field 'name' is not a valid secret name")
        if field == "reason" and isinstance(value, str) and (len(value) > 500 or any(ord(c) < 32 for c in value)):
            raise ControlError(f"{op}: field 'reason' must be one line of at most 500 characters")
    return Request(
        op=op, name=data.get("name"), emergency=bool(data.get("emergency", False)), reason=data.get("reason")
    )


def ok_reply(result: Any) -> bytes:
    return json.dumps({"ok": True, "result": result}, separators=(",", ":")).encode() + b"\n"


def error_reply(exc: RotatordError) -> bytes:
    body = {"type": type(exc).__name__, "message": str(exc), "exit": exc.exit_code}
    return json.dumps({"ok": False, "error": body}, separators=(",", ":")).encode() + b"\n"
