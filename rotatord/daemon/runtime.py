"""Wiring: from frozen settings to a working engine (used by the daemon and by ``rotate --offline``)."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from ..audit import AuditLog
from ..backends.registry import open_backend
from ..config import Settings
from ..engine.journal import Journal
from ..engine.policy import RetryPolicy
from ..engine.runner import Engine
from ..fsutil import ensure_private_dir
from ..interfaces import Backend

__all__ = ["Runtime", "build_runtime"]


@dataclass
class Runtime:
    settings: Settings
    journal: Journal
    audit: AuditLog
    backends: dict[str, Backend]
    engine: Engine

    def close(self) -> None:
        for backend in self.backends.values():
            backend.close()
        self.journal.close()


def build_runtime(
    settings: Settings, *, journal: Journal | None = None, locks: dict[str, threading.RLock] | None = None
) -> Runtime:
    """Open the journal, the audit log and every backend a configured secret uses."""
    daemon = settings.daemon
    ensure_private_dir(daemon.state_dir)
    if journal is None:
        journal = Journal(daemon.database_url)
        journal.create()
    audit = AuditLog(daemon.audit_path, journal)
    used = {s.backend for s in settings.secrets}
    backends = {name: open_backend(name, cfg) for name, cfg in settings.backends.items() if name in used}
    engine = Engine(
        settings.secrets,
        backends,
        journal,
        audit,
        RetryPolicy(daemon.step_retry_initial, daemon.step_retry_max),
        locks=locks,
    )
    return Runtime(settings, journal, audit, backends, engine)
