"""Real servers for tests (OpenBao, moto, ...), started on 127.0.0.1 with free ports and stopped by PID.

Each server module is a pytest plugin (see tests/conftest.py) offering session-scoped fixtures.
"""

from __future__ import annotations

import os
import socket

import pytest

__all__ = ["free_port", "require"]


def require(available: bool, reason: str) -> None:
    """Skip a test whose server is not installed, naming the package; under CI=true, fail instead."""
    if available:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must have every service: {reason}")
    pytest.skip(reason)


def free_port(span: int = 1) -> int:
    """A port p on 127.0.0.1 such that p .. p+span-1 are all free right now."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + span > 65535:
            continue
        ok = True
        for extra in range(1, span):
            with socket.socket() as probe:
                try:
                    probe.bind(("127.0.0.1", port + extra))
                except OSError:
                    ok = False
                    break
        if ok:
            return port
    raise RuntimeError("no free port range found")
