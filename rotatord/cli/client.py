"""The CLI side of the control socket."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from .. import errors
from ..daemon.protocol import MAX_RESPONSE

__all__ = ["call_daemon"]

_ERRORS: dict[str, type[errors.RotatordError]] = {
    name: cls
    for name in errors.__all__
    if isinstance(cls := getattr(errors, name), type) and issubclass(cls, errors.RotatordError)
}


def call_daemon(path: Path, request: dict[str, Any], timeout: float = 120.0) -> Any:
    """Send one request; return the result or raise the daemon's error as the same class."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise errors.DaemonNotRunning(
                f"no rotatord daemon is running (nothing answers on {path}); start it with "
                "'rotatord run' or 'systemctl start rotatord', or use 'rotate --offline'"
            ) from None
        except PermissionError:
            raise errors.DaemonNotRunning(
                f"permission denied on {path}: join the socket's group to control the daemon"
            ) from None
        sock.sendall(json.dumps(request).encode() + b"\n")
        chunks = []
        size = 0
        while chunk := sock.recv(65536):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_RESPONSE:
                raise errors.ControlError("response from the daemon is too large")
    except TimeoutError:
        raise errors.ControlError(f"the daemon did not answer within {timeout:.0f} s") from None
    finally:
        sock.close()
    try:
        reply = json.loads(b"".join(chunks))
    except ValueError:
        raise errors.ControlError("the daemon's reply is not valid JSON") from None
    if reply.get("ok"):
        return reply.get("result")
    err = reply.get("error") or {}
    cls = _ERRORS.get(str(err.get("type")), errors.RotatordError)
    exc = cls.__new__(cls)
    Exception.__init__(exc, str(err.get("message", "unknown error")))
    if isinstance(exc, errors.ConfigError):
        exc.problems = [str(err.get("message"))]
    raise exc
