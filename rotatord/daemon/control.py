"""The daemon's control socket: a Unix stream server speaking :mod:`.protocol`.

The socket's file mode and group are the authorisation (SO_PEERCRED uids are unreliable under
``PrivateUsers=``); the peer uid is still recorded as the actor in the audit log.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ..errors import ConfigError, ControlError, RotatordError
from .protocol import MAX_REQUEST, Request, error_reply, ok_reply, parse_request

__all__ = ["ControlServer", "Handler"]

log = logging.getLogger("rotatord.control")
Handler = Callable[[Request, str], Awaitable[Any]]
READ_TIMEOUT = 10.0


class ControlServer:
    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self._server: asyncio.AbstractServer | None = None
        self._path: Path | None = None

    async def start(self, *, path: Path, mode: int, group: str | None, inherited_fd: int | None) -> None:
        """Serve on a socket inherited from systemd, or bind ``path`` with ``mode`` and ``group``."""
        if inherited_fd is not None:
            sock = socket.socket(fileno=inherited_fd)
            self._server = await asyncio.start_unix_server(self._serve, sock=sock, limit=MAX_REQUEST + 1)
            return
        gid = None
        if group:
            try:
                gid = grp.getgrnam(group).gr_gid
            except KeyError:
                raise ConfigError(f"daemon.socket_group: group {group!r} does not exist") from None
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # we hold the state lock, so a socket file left here is stale
        old_umask = os.umask(0o177)  # never world-connectable, not even for an instant
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(path), limit=MAX_REQUEST + 1)
        finally:
            os.umask(old_umask)
        if gid is not None:
            os.chown(path, -1, gid)
        os.chmod(path, mode)
        self._path = path

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
        if self._path is not None:
            with contextlib.suppress(FileNotFoundError):
                self._path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        actor = _peer(writer)
        try:
            try:
                line = await asyncio.wait_for(reader.readuntil(b"\n"), READ_TIMEOUT)
            except asyncio.LimitOverrunError:
                raise ControlError(f"request larger than {MAX_REQUEST} bytes") from None
            except asyncio.IncompleteReadError as exc:
                if not exc.partial:
                    return
                line = exc.partial
            except TimeoutError:
                raise ControlError("no complete request line within 10 s") from None
            request = parse_request(line)
            reply = ok_reply(await self._handler(request, actor))
        except RotatordError as exc:
            reply = error_reply(exc)
        except Exception:
            log.exception("control request failed")
            reply = error_reply(ControlError("internal error; see the daemon's log"))
        try:
            writer.write(reply)
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


def _peer(writer: asyncio.StreamWriter) -> str:
    sock = writer.get_extra_info("socket")
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _gid = struct.unpack("3i", creds)
    except (OSError, AttributeError, struct.error):
        return "cli"
    return f"cli:uid={uid},pid={pid}"
