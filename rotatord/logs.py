"""Structured JSON logging with redaction as the last step before anything is written.

One JSON object per line on stdout (journald captures it)::

    {"ts":"2025-01-01T03:00:00.000Z","level":"info","logger":"rotatord.engine","msg":"staged",
     "secret":"support-bot-db","version":7}

Redaction is layered so that no key material reaches a log line, whatever the caller did:

1. every string going into the line (message, ``extra=`` values and keys, traceback) is
   redacted on its own, raw text, which catches values that JSON would escape;
2. the final serialised line is redacted again, so nothing added on the way escapes it.

Each pass first masks every value registered by :class:`rotatord.sensitive.Sensitive`, then
masks the shapes of material that was never wrapped: Fernet keys, rotatord API tokens and
Standard Webhooks ``whsec_`` secrets.  :func:`redact_text` is the same filter for other writers
(the audit log, CLI output); it is safe to run on JSON text and keeps it valid JSON.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TextIO

from . import sensitive
from .sensitive import MASK
from .timeutil import format_ts

__all__ = ["NOISY_LOGGERS", "JsonFormatter", "json_safe", "redact_text", "setup_logging"]

#: Third-party loggers that chatter at INFO about things an operator does not act on.
NOISY_LOGGERS = ("apscheduler", "urllib3", "botocore", "boto3", "hvac", "werkzeug")

# A secret may start right after an escape sequence in JSON or in a Python repr ("\nKEY", "\u001bKEY"):
# the escape's last character is a letter or digit, yet it is a boundary, not part of the secret.
_ESCAPE_BEFORE = r"(?<=\\[nrtbf])|(?<=\\x[0-9A-Fa-f]{2})|(?<=\\u[0-9A-Fa-f]{4})"
# A Fernet key is urlsafe base64 of 32 bytes: 43 characters and one "=".  The 43rd character
# carries only 4 data bits, so it is one of 16 letters; with the boundaries below (no base64
# character before, no base64 character or "=" after) ordinary words and longer base64 text
# such as Fernet tokens are left alone.
_FERNET_KEY = re.compile(
    rf"(?:(?<![A-Za-z0-9_\-])|{_ESCAPE_BEFORE})[A-Za-z0-9_\-]{{42}}[AEIMQUYcgkosw048]=(?![A-Za-z0-9_\-=])"
)
# rotatord API tokens (see rotatord/crypto/tokens.py): prefix, "_", 43 body + 6 checksum base62.
# An underscore may precede the prefix ("token_rtd_..."), unlike a \b-anchored pattern.
_API_TOKEN = re.compile(rf"(?:(?<![A-Za-z0-9])|{_ESCAPE_BEFORE})[a-z][a-z0-9]{{1,15}}_[A-Za-z0-9]{{49}}(?![A-Za-z0-9])")
# Standard Webhooks secrets: the prefix is distinctive enough to need no left boundary.
_WHSEC = re.compile(r"whsec_[A-Za-z0-9+/_\-]{8,}={0,2}")
_PATTERNS = (_FERNET_KEY, _API_TOKEN, _WHSEC)
_ESCAPE_LENGTH = {"u": 5, "x": 3}

# Attributes every LogRecord has; anything else on a record came from the caller's ``extra=``.
_STANDARD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}
_CORE_KEYS = ("ts", "level", "logger", "msg", "exc", "stack")


def _mask(match: re.Match[str]) -> str:
    text = match.string
    start = match.start()
    backslashes = 0
    while start - backslashes > 0 and text[start - backslashes - 1] == "\\":
        backslashes += 1
    if backslashes % 2:
        # The match begins inside an escape sequence ("\n", "\u001b"): keep the escape whole so
        # JSON stays valid, and mask the rest, which holds the secret.
        keep = _ESCAPE_LENGTH.get(match.group()[0], 1)
        return match.group()[:keep] + MASK
    return MASK


def redact_text(text: str) -> str:
    """Return ``text`` with registered Sensitive values and secret-shaped material masked.

    Safe on plain text and on JSON text (valid JSON stays valid).  A masked ``Sensitive``
    repr is left as it is.
    """
    text = sensitive.redact(text)
    for pattern in _PATTERNS:
        text = pattern.sub(_mask, text)
    return text


def json_safe(value: object) -> object:
    """``value`` as JSON-serialisable data with every string redacted.

    Mappings and sequences are converted recursively, aware datetimes become ISO 8601 UTC,
    non-finite floats and anything else become ``str(value)`` (a Sensitive gives its masked repr).
    """
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return {redact_text(str(k)): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [json_safe(v) for v in value]
    if isinstance(value, datetime) and value.tzinfo is not None:
        return format_ts(value)
    return redact_text(str(value))


class JsonFormatter(logging.Formatter):
    """Formats a record as one redacted JSON line: ts, level, logger, msg, extras, exc."""

    def format(self, record: logging.LogRecord) -> str:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            # A bad format string must not make logging.Handler.handleError print the raw
            # arguments (which may hold a secret) to stderr; log what we have, redacted.
            message = f"{record.msg} (log arguments did not match the format: {record.args!r})"
        payload: dict[str, object] = {
            "ts": format_ts(datetime.fromtimestamp(record.created, UTC)),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": message,
        }
        for key, value in record.__dict__.items():
            if key in _STANDARD_ATTRS or key.startswith("_"):
                continue
            # The core keys win; an extra that collides keeps its value under another name.
            payload[f"extra_{key}" if key in _CORE_KEYS else key] = value
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            payload["exc"] = record.exc_text
        if record.stack_info:
            payload["stack"] = self.formatStack(record.stack_info)
        line = json.dumps(json_safe(payload), ensure_ascii=False, separators=(",", ":"))
        return redact_text(line)


class _JsonStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    def handleError(self, record: logging.LogRecord) -> None:
        # The default prints the record's message and arguments unredacted; say only where.
        # When stderr fails too, nothing sensible is left to do.
        with contextlib.suppress(Exception):
            sys.stderr.write(f"rotatord.logs: could not write a log record from {record.name}:{record.lineno}\n")


def _parse_level(level: str) -> int:
    mapping = logging.getLevelNamesMapping()
    number = mapping.get(level.strip().upper()) if isinstance(level, str) else None
    if number is None:
        raise ValueError(f"unknown log level {level!r}: use debug, info, warning, error or critical")
    return number


def setup_logging(level: str = "info", stream: TextIO | None = None) -> None:
    """Send every log record to ``stream`` (default stdout) as redacted JSON lines.

    Replaces the root logger's handlers, so calling it again (on SIGHUP, with a new level) leaves
    exactly one handler.  Raises ValueError for an unknown level name.
    """
    number = _parse_level(level)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    handler = _JsonStreamHandler(sys.stdout if stream is None else stream)
    handler.setFormatter(JsonFormatter())
    # The handler filters too: records propagated from child loggers skip the root's own level.
    handler.setLevel(number)
    root.addHandler(handler)
    root.setLevel(number)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, number))
    logging.captureWarnings(True)
