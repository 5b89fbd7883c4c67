"""Every extension point of rotatord, as an abstract base class.

Implementations are chosen by an explicit registry keyed by the configuration's ``kind``
(``rotatord.backends.registry``, ``rotatord.stores.registry``, ``rotatord.crypto.generators``).
Each method's docstring states its contract and what it raises; an implementation translates its
SDK's exceptions into the :mod:`rotatord.errors` tree at its own edge.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
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
    "Identify",
    "Notifier",
    "Observed",
    "Progress",
    "ReencryptReport",
    "RotateBatch",
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


@dataclass(frozen=True)
class Observed:
    """A fingerprint of what a backend holds at one path, for drift detection.  No material.

    ``digest`` is :func:`rotatord.document.digest` of the current document (SHA-256 of its
    canonical JSON), ``None`` when ``unreadable`` says why it cannot be read: ``"deleted"`` or
    ``"destroyed"`` (the current version), ``"invalid"`` (fails the schema), ``"foreign"`` (not a
    rotatord document).  ``marked`` is whether rotatord's management marks are still on the path
    (Vault ``custom_metadata`` + ``cas_required``, the AWS tag; always True where there are none).
    ``labels`` maps the backend's version labels to versions (AWS staging labels except
    AWSPENDING, rotatord's own in-flight marker), None where versions carry no labels.
    ``deleted`` are versions the backend still lists but that were deleted or destroyed.
    ``owner`` is the document's (name, kind) when it is readable; ``problem`` the validation
    message when it is not (it names fields, never values).
    """

    version: str | None
    digest: str | None
    request_id: str | None = None
    unreadable: str | None = None
    marked: bool = True
    labels: Mapping[str, str] | None = None
    deleted: frozenset[str] = frozenset()
    owner: tuple[str, str] | None = None
    problem: str | None = None


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

    @abstractmethod
    def observe(self, path: str) -> Observed | None:
        """A fingerprint of ``path`` (see :class:`Observed`), None when nothing ever existed there.

        Unlike :meth:`read` it never raises for what is stored (an invalid, foreign, deleted or
        destroyed current version is reported in ``unreadable``): drift detection must see it.
        Raises BackendUnavailable, PermissionDenied, BackendError (the backend cannot be asked).
        """

    def mark_managed(self, path: str) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Put rotatord's management marks back on ``path`` (after an operator adopted it),
        without touching the document.  Raises like :meth:`write`."""

    def read_version(self, path: str, version: str) -> Versioned | None:
        """An older version of ``path`` by its identifier (as :meth:`history` lists it), or
        ``None`` when the backend no longer keeps it (pruned, deleted) or keeps no old versions.

        Read-only; used by ``rotatord scan`` to recognise retired keys.  Raises like :meth:`read`.
        """
        return None

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

    @property
    def total(self) -> int:
        return sum(self.by_key.values()) + self.unreadable


@dataclass(frozen=True)
class ReencryptReport:
    """Running totals of one store's re-encryption (cumulative across resumes)."""

    store: str
    scanned: int = 0
    rewritten: int = 0
    skipped: int = 0
    conflicts: int = 0
    quarantined: int = 0


#: Re-encrypt a batch of tokens under the primary key: one result per input, ``None`` where no key
#: of the ring can decrypt it (the item is then quarantined, never rewritten).  May use processes.
RotateBatch = Callable[[Sequence[bytes]], list[bytes | None]]
#: The id of the key that signed a token (from its HMAC, without decrypting), or None.
Identify = Callable[[bytes], str | None]


class Progress(ABC):
    """Where a store reports while it re-encrypts; the engine persists what it is told."""

    @abstractmethod
    def checkpoint(self, checkpoint: str, totals: ReencryptReport) -> None:
        """Called after each committed batch: resume after ``checkpoint`` if the process dies."""

    @abstractmethod
    def quarantine(self, locator: str, reason: str) -> None:
        """An item no key can read: recorded (store, locator, reason) and reported, never rewritten.
        ``locator`` names the item (primary key, file path, Redis key/field), never its content."""

    def should_stop(self) -> bool:
        """True when the daemon is stopping: finish the current batch, checkpoint, return."""
        return False


class DataStore(ABC):
    """Data a bot stored under a ``fernet`` secret's keys, re-encrypted on rotation."""

    kind: ClassVar[str]

    @property
    @abstractmethod
    def label(self) -> str:
        """A non-secret locator for messages and the state DB (e.g. ``sql:messages(body)``)."""

    @abstractmethod
    def check(self) -> None:
        """Verify the store is reachable and shaped as configured (table, columns, types, key
        type...).  Raises StoreError naming the store and what is wrong."""

    @abstractmethod
    def census(self, identify: Identify) -> Census:
        """Count items per signing key id (``identify``), and unreadable ones.  Never decrypts,
        never writes.  Memory stays flat whatever the store's size.  Raises StoreError."""

    @abstractmethod
    def reencrypt(
        self,
        rotate: RotateBatch,
        identify: Identify,
        primary_id: str,
        checkpoint: str | None,
        progress: Progress,
    ) -> ReencryptReport:
        """Move every item not under ``primary_id`` to it, in batches, compare-and-swap per item.

        - Items ``identify`` places under ``primary_id`` are skipped without decrypting.
        - Items ``identify`` cannot place, or ``rotate`` cannot decrypt, go to
          ``progress.quarantine`` and are left untouched.
        - A write happens only if the item still holds the value read (a bot may have changed
          it meanwhile: then it counts as a conflict and is picked up again, never overwritten).
        - Resumes after ``checkpoint`` (an opaque string this store produced earlier); calls
          ``progress.checkpoint`` after each batch; returns when the whole store was walked once
          or ``progress.should_stop()``.
        Raises StoreError naming the store.
        """

    def estimate(self) -> int | None:
        """A cheap estimate of the number of items (for progress bars), or None."""
        return None

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
