"""Wiring: from frozen settings to a working engine (used by the daemon and by ``rotate --offline``)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..audit import AuditLog
from ..backends.registry import open_backend
from ..config import Settings
from ..document import FernetRing
from ..engine.gate import AckGate
from ..engine.journal import Journal
from ..engine.lease import audit_head, connect_args, supports_lease
from ..engine.ledger import StoreLedger
from ..engine.policy import RetryPolicy
from ..engine.reencrypt import Reencryptor, serial_batch_rotator
from ..engine.runner import Engine
from ..fsutil import ensure_private_dir
from ..interfaces import Backend, DataStore, RotateBatch
from ..timeutil import utcnow

if TYPE_CHECKING:
    from ..notify.worker import OutboxWorker

__all__ = ["Runtime", "build_runtime"]


@dataclass
class Runtime:
    settings: Settings
    journal: Journal
    audit: AuditLog
    backends: dict[str, Backend]
    engine: Engine
    stores: dict[str, list[DataStore]]
    notifier: OutboxWorker | None = None

    def close(self) -> None:
        self.close_connections()
        self.journal.close()

    def close_connections(self) -> None:
        """Close backends and stores (a reload keeps the journal)."""
        for backend in self.backends.values():
            backend.close()
        for stores in self.stores.values():
            for store in stores:
                store.close()


def open_stores(settings: Settings) -> dict[str, list[DataStore]]:
    """The data stores of each fernet secret (none are opened when none are configured)."""
    if not any(s.stores for s in settings.secrets):
        return {}
    from ..stores.registry import open_store

    return {
        s.name: [open_store(s.name, i, cfg) for i, cfg in enumerate(s.stores)] for s in settings.secrets if s.stores
    }


def build_runtime(
    settings: Settings,
    *,
    journal: Journal | None = None,
    locks: dict[str, threading.RLock] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> Runtime:
    """Open the journal, the audit log and every backend a configured secret uses."""
    daemon = settings.daemon
    ensure_private_dir(daemon.state_dir)
    if journal is None:
        # Named per instance on PostgreSQL (pg_stat_activity), where several instances share it.
        named = connect_args(daemon.instance, "journal") if supports_lease(daemon.database_url) else None
        journal = Journal(daemon.database_url, connect_args=named)
        journal.create()
    audit = AuditLog(daemon.audit_path, audit_head(journal, daemon.instance))
    used = {s.backend for s in settings.secrets}
    backends = {name: open_backend(name, cfg) for name, cfg in settings.backends.items() if name in used}
    stores = open_stores(settings)
    reencryptor = Reencryptor(StoreLedger(journal), utcnow, default_batch_rotator, should_stop)
    retry = RetryPolicy(daemon.step_retry_initial, daemon.step_retry_max)
    locks = locks if locks is not None else {}  # the engine and the hook runner share them
    hooks = None
    if settings.hooks or any(s.hooks for s in settings.secrets):
        from ..hooks.runner import HookRunner

        hooks = HookRunner(
            settings.hooks, settings.secrets, backends, journal, audit, retry, locks=locks, should_stop=should_stop
        )
    engine = Engine(
        settings.secrets,
        backends,
        journal,
        audit,
        retry,
        stores=stores,
        locks=locks,
        reencryptor=reencryptor,
        hooks=hooks,
        security_consumers=settings.notify.security_consumers,
        drift_hold=daemon.drift_check_interval,
    )
    notifier = None
    if settings.consumers:
        # aiohttp is imported only when someone is to be told.
        from ..notify.worker import OutboxWorker

        consumers = settings.consumers

        def signing_secrets(consumer: str) -> list[str]:
            return engine.signing_secrets(consumers[consumer].signing_secret)

        notifier = OutboxWorker(journal, consumers, settings.notify, signing_secrets)
        engine.gate = AckGate(notifier, settings.consumers, journal, settings.notify.on_unacknowledged)
    return Runtime(settings, journal, audit, backends, engine, stores, notifier)


def default_batch_rotator(ring: FernetRing) -> RotateBatch:
    """Process-parallel re-encryption where available (it pays on large batches)."""
    try:
        from ..crypto.parallel import batch_rotator
    except ImportError:
        return serial_batch_rotator(ring)
    return batch_rotator(ring, None)
