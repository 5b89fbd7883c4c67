"""Every extension point of rotatord, as an abstract base class.

Implementations are chosen by an explicit registry keyed by the configuration's ``kind``
(``rotatord.backends.registry``, ``rotatord.stores.registry``, ``rotatord.crypto.generators``).
Each method's docstring states its contract and what it raises; an implementation translates its
SDK's exceptions into the :mod:`rotatord.errors` tree at its own edge.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import ClassVar

from .document import Document
from .sensitive import Sensitive

__all__ = [
    "Backend",
    "Census",
    "DataStore",
    "Event",
    "Generator",
    "Notifier",
    "ReencryptReport",
    "Versioned",
    "VersionInfo",
]


@dataclass(frozen=True)
class Versioned:
    """A document as read from a backend, with the backend's own version identifier."""

    document: Document
    version: str
    #: The ``request_id`` of the write that produced this version, where the backend keeps it.
    request_id: str | None = None


@dataclass(frozen=True)
class VersionInfo:
    version: str
    created_at: datetime | None
    current: bool
    request_id: str | None = None


class Backend(ABC):
    """Where secret documents live: the only home of key material.

    ``path`` is the secret's path inside the backend, as configured.  Versions are opaque
    strings chosen by the backend (``"7"`` for the file and KV v2 backends, a VersionId on AWS).
    """

    kind: ClassVar[str]

    @abstractmethod
    def read(self, path: str) -> Versioned | None:
        """The current document at ``path``, or ``None`` when nothing exists there.

        Raises BackendUnavailable (transient), PermissionDenied, DocumentInvalid (the stored
        bytes are not a valid rotatord document), NotManaged (something rotatord did not write).
        """

    @abstractmethod
    def write(self, path: str, document: Document, *, expected: str | None, request_id: str) -> str:
        """Publish ``document`` as the new current version and return its version identifier.

        Check-and-set: ``expected`` is the version the caller read (``None``: the path must not
        exist yet).  If another writer moved the path on, raise ConflictError and write nothing.
        ``request_id`` is the caller's idempotency key, recorded in its journal before the call:
        if the current version was already written with the same ``request_id`` (a retry after a
        crash), return that version instead of writing again.
        Raises ConflictError, BackendUnavailable, PermissionDenied.
        """

    @abstractmethod
    def history(self, path: str) -> list[VersionInfo]:
        """Versions still kept for ``path``, oldest first.  Empty when the path does not exist."""

    def check(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Verify at start-up that the backend is reachable and usable.  Raises like :meth:`read`."""

    def close(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Release connections.  Idempotent."""


@dataclass(frozen=True)
class Census:
    """How many stored items each key id signed; ``unreadable`` counts items no key recognises."""

    store: str
    by_key: Mapping[str, int]
    unreadable: int = 0
    taken_at: datetime | None = None

    def count(self, key_id: str) -> int:
        return self.by_key.get(key_id, 0)


@dataclass(frozen=True)
class ReencryptReport:
    store: str
    rewritten: int = 0
    skipped: int = 0
    conflicts: int = 0
    quarantined: int = 0
    census: Census | None = None


class DataStore(ABC):
    """Data a bot stored under a ``fernet`` secret's keys, re-encrypted on rotation."""

    kind: ClassVar[str]

    @property
    @abstractmethod
    def label(self) -> str:
        """A non-secret locator for messages and the state DB (e.g. ``sql:messages.body``)."""

    @abstractmethod
    def census(self, identify: Callable[[bytes], str | None]) -> Census:
        """Count items per signing key id; ``identify`` maps a token to its key id or None.

        Raises StoreError naming the store.
        """

    @abstractmethod
    def reencrypt(
        self,
        rotate: Callable[[bytes], bytes],
        identify: Callable[[bytes], str | None],
        primary_id: str,
        checkpoint: str | None,
        on_batch: Callable[[str | None, ReencryptReport], None],
    ) -> ReencryptReport:
        """Rewrite every item not under ``primary_id`` with ``rotate``, compare-and-swap per item.

        Resumes after ``checkpoint``; calls ``on_batch(new_checkpoint, totals)`` after each batch.
        Items ``identify`` cannot place are quarantined, never rewritten.  Raises StoreError.
        """

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections.  Idempotent."""


class Generator(ABC):
    """Makes new key material of one kind."""

    kind: ClassVar[str]

    @abstractmethod
    def generate(self) -> Sensitive:
        """Fresh material from a CSPRNG.  Never raises."""

    @abstractmethod
    def recognises(self, text: str) -> bool:
        """Whether ``text`` looks like material of this kind (for scanners and redaction tests)."""


@dataclass(frozen=True)
class Event:
    """One lifecycle notification.  It names where to read the secret; it never carries it."""

    type: str
    secret: str
    rotation_id: int
    version: int
    phase: str
    backend: str
    path: str
    backend_version: str | None
    occurred_at: datetime
    detail: Mapping[str, str] = field(default_factory=dict)


class Notifier(ABC):
    """Delivers events recorded in the outbox (the journal writes them with the phase change)."""

    @abstractmethod
    def deliver_pending(self, now: datetime) -> int:
        """Attempt every delivery that is due; return how many were attempted.  Never raises
        for a failing consumer: failures are recorded and retried on the schedule."""

    @abstractmethod
    def acknowledged(self, rotation_id: int, event_type: str) -> bool:
        """Whether every required consumer acknowledged ``event_type`` of that rotation."""
