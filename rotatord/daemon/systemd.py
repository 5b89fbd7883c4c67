"""The daemon's side of systemd's protocols: sd_notify, the watchdog, socket activation.

Standard library only.  We do not use the ``sdnotify`` package: it encodes Latin-1 and silently
drops a ``STATUS=`` it cannot encode (``"✓ 3 secrets"``); systemd expects UTF-8.

Everything here is a no-op outside systemd (no ``$NOTIFY_SOCKET``, no ``$LISTEN_FDS``), so the
daemon calls it unconditionally.  How the daemon uses it:

- ``Notifier.ready()`` once rotations are resumed and the control socket is served, then
  ``status()`` on each change;
- ``watchdog()`` every ``watchdog_period()`` seconds *from the asyncio loop* (a wedged loop
  must miss the ping, so never from a thread);
- ``reloading()`` on SIGHUP, then ``ready()`` when the new configuration is live;
- ``stopping()`` on SIGTERM;
- the control socket is ``socket.socket(fileno=listen_fds()["control"])`` when present.

Nothing sent here may contain key material: ``STATUS=`` ends up in ``systemctl status`` and the
journal.  Callers pass counts and names, never values.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import threading
import time
from collections.abc import Mapping

__all__ = ["SD_LISTEN_FDS_START", "STATUS_MAX_CHARS", "Notifier", "listen_fds", "watchdog_period"]

_log = logging.getLogger(__name__)

#: The first file descriptor systemd passes (sd_listen_fds(3)).
SD_LISTEN_FDS_START = 3
#: ``STATUS=`` is shown on one line of ``systemctl status``; longer texts are cut with "…".
STATUS_MAX_CHARS = 200

_LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def _notify_address(value: str) -> bytes | None:
    """The ``sendto`` address for a ``$NOTIFY_SOCKET`` value, or None if unset or unsupported.

    ``/path`` is a file-system socket, ``@name`` an abstract one (leading NUL byte).  Other forms
    (``vsock:``, systemd >= 253) are not supported and disable notification.
    """
    if value.startswith("/"):
        return os.fsencode(value)
    if value.startswith("@") and len(value) > 1:
        return b"\0" + os.fsencode(value[1:])
    if value:
        _log.debug("NOTIFY_SOCKET=%r is not a path or @abstract name: notifications disabled", value)
    return None


def _one_line(text: str) -> str:
    """``text`` as one printable line of at most STATUS_MAX_CHARS characters.

    Line breaks and other control characters become spaces and runs of spaces collapse, because
    a newline would start a new ``KEY=`` assignment in the datagram.
    """
    line = " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())
    if len(line) > STATUS_MAX_CHARS:
        line = line[: STATUS_MAX_CHARS - 1] + "…"
    return line


class Notifier:
    """Send sd_notify(3) messages to ``$NOTIFY_SOCKET``.

    The address is read once, at construction, from ``environ`` (default: ``os.environ``).  With
    no usable address every method is a silent no-op and ``enabled`` is False.  Sending never
    raises: a failure is logged once at debug level and the method returns False, because a
    daemon must not fall over when its supervisor's socket goes away.  Thread-safe.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._address = _notify_address(env.get("NOTIFY_SOCKET", ""))
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._failure_logged = False

    @property
    def enabled(self) -> bool:
        """True when ``$NOTIFY_SOCKET`` named a usable socket."""
        return self._address is not None

    def send_raw(self, text: str) -> bool:
        """Send ``text`` (newline-separated ``KEY=value`` lines) as one UTF-8 datagram.

        Returns True if the datagram was sent, False if disabled or on failure (never raises).
        """
        if self._address is None:
            return False
        data = text.encode("utf-8")
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # Never block: a receiver that stops reading must not wedge the daemon's event loop
                # (a full datagram queue then drops this message instead of stalling every request).
                self._sock.sendto(data, socket.MSG_DONTWAIT, self._address)
            except OSError as exc:
                # Drop the socket so that the next call starts afresh (e.g. after EMFILE).
                self._close_locked()
                if not self._failure_logged:
                    self._failure_logged = True
                    _log.debug("sd_notify failed (%s); further failures are not logged", exc.strerror or exc)
                return False
        return True

    def send(self, **fields: str) -> bool:
        """Send ``KEY=value`` assignments in argument order, e.g. ``send(READY="1", STATUS="ok")``.

        Raises ValueError (programmer misuse) if a value contains a newline or a key is not an
        upper-case identifier; use :meth:`status` for free text.
        """
        for key, value in fields.items():
            if not (key.isidentifier() and key.isupper() and key.isascii()):
                raise ValueError(f"sd_notify key {key!r} must be an upper-case identifier")
            if "\n" in value:
                raise ValueError(f"sd_notify value for {key} must not contain a newline")
        return self.send_raw("\n".join(f"{key}={value}" for key, value in fields.items()))

    def ready(self, status: str | None = None) -> bool:
        """``READY=1`` (start-up or reload finished), with an optional ``STATUS=``."""
        if status is None:
            return self.send(READY="1")
        return self.send(READY="1", STATUS=_one_line(status))

    def status(self, text: str) -> bool:
        """``STATUS=`` as one line: newlines become spaces, cut to STATUS_MAX_CHARS characters."""
        return self.send(STATUS=_one_line(text))

    def reloading(self, status: str | None = None) -> bool:
        """``RELOADING=1`` with ``MONOTONIC_USEC`` (CLOCK_MONOTONIC, µs); send ``ready()`` when done.

        systemd >= 253 (``Type=notify-reload``) waits for exactly this pair and ignores a
        RELOADING=1 without a timestamp at least as recent as its SIGHUP.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        if status is None:
            return self.send(RELOADING="1", MONOTONIC_USEC=str(usec))
        return self.send(RELOADING="1", MONOTONIC_USEC=str(usec), STATUS=_one_line(status))

    def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1``: shutdown has begun (on SIGTERM)."""
        if status is None:
            return self.send(STOPPING="1")
        return self.send(STOPPING="1", STATUS=_one_line(status))

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: keep-alive ping, every :func:`watchdog_period` seconds."""
        return self.send(WATCHDOG="1")

    def extend_timeout(self, seconds: float) -> bool:
        """``EXTEND_TIMEOUT_USEC``: ask for ``seconds`` more before the start/stop timeout fires.

        For example while waiting for Vault before READY=1.  ``seconds`` must be positive.
        """
        if not seconds > 0:
            raise ValueError("extend_timeout needs a positive number of seconds")
        return self.send(EXTEND_TIMEOUT_USEC=str(int(seconds * 1_000_000)))

    def close(self) -> None:
        """Close the datagram socket; a later send opens a new one."""
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __repr__(self) -> str:
        return f"Notifier(enabled={self.enabled})"


def watchdog_period(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings: half of ``$WATCHDOG_USEC``.

    None when the watchdog is off: ``$WATCHDOG_USEC`` unset, not a positive integer, or
    ``$WATCHDOG_PID`` set to anything but our pid (the variables were inherited from a parent
    that systemd watches, not us).
    """
    env = os.environ if environ is None else environ
    pid = env.get("WATCHDOG_PID")
    if pid is not None and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    return int(usec) / 2_000_000


def listen_fds() -> dict[str, int]:
    """Sockets passed by socket activation, by ``FileDescriptorName=`` (sd_listen_fds(3)).

    Returns ``{}`` unless ``$LISTEN_PID`` is our pid and ``$LISTEN_FDS`` a positive count.  The
    fds start at 3; names come from ``$LISTEN_FDNAMES`` (``:``-separated), and are "unknown"
    when it is absent or its count does not match.  If a name repeats, the first fd keeps it.
    Each fd gets FD_CLOEXEC so that no child process inherits it.  The three ``LISTEN_*``
    variables are always removed from ``os.environ``, so children never mistake them for theirs.
    Call it once: the second call finds nothing.
    """
    env = {name: os.environ.pop(name, None) for name in _LISTEN_VARS}
    pid, count = env["LISTEN_PID"], env["LISTEN_FDS"]
    if pid is None or count is None:
        return {}
    if not pid.isdigit() or int(pid) != os.getpid():
        _log.debug("LISTEN_PID=%s is not our pid %d: ignoring passed sockets", pid, os.getpid())
        return {}
    if not count.isdigit() or int(count) == 0:
        return {}
    n = int(count)
    names = env["LISTEN_FDNAMES"].split(":") if env["LISTEN_FDNAMES"] is not None else []
    if len(names) != n:
        if names:
            _log.warning("LISTEN_FDNAMES has %d names for %d fds: treating all as 'unknown'", len(names), n)
        names = ["unknown"] * n
    fds: dict[str, int] = {}
    for offset, name in enumerate(names):
        fd = SD_LISTEN_FDS_START + offset
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
            fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
        except OSError as exc:
            _log.warning("passed fd %d (%s) is not usable: %s", fd, name, exc.strerror or exc)
            continue
        fds.setdefault(name, fd)
    return fds
