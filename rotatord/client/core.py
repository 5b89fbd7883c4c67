"""The reader seam and the cache every client view shares.

A bot reads its secret document through a :class:`DocumentReader` (file, Vault, AWS) and keeps
the parsed result for ``ttl`` seconds.  The cache is built for a process serving many threads
with a backend that is sometimes slow or down:

- At most one thread reads at a time.  Once something was read, callers never wait for a read
  in progress: while one thread re-reads an expired entry, the others keep using the old one.
- A failed re-read keeps serving what was read before (a bot must not stop decrypting because
  its vault blinked) and logs a warning; only the very first read raises.  Automatic re-reads
  after a failure are spaced by ``min_interval``, so a down backend is not hammered.
- :meth:`CachedDocument.refresh_after_miss` lets a view re-read once when a credential it
  cannot place may be newer than its copy (a key staged after the last read), at most once per
  ``min_interval``, so garbage input cannot turn into a stream of backend reads.
- An explicit refresh (a bot told by webhook that the secret changed) raises on failure, so the
  bot does not acknowledge a change it has not seen.

This module imports only the stdlib and rotatord's stdlib-only modules.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from ..document import Document
from ..errors import RotatordError

__all__ = ["CachedDocument", "DocumentReader", "Loaded", "MonotonicClock"]

log = logging.getLogger("rotatord.client")

T = TypeVar("T")
MonotonicClock = Callable[[], float]


class DocumentReader(Protocol):
    """Where a client view reads its secret document from."""

    def read(self) -> Document:
        """The current document, parsed and validated.

        Raises a :class:`~rotatord.errors.RotatordError` whose message names the backend and
        path, never key material: a ``BackendError`` subclass (``BackendUnavailable`` when a
        retry may succeed, ``PermissionDenied``, ``DocumentInvalid``, ...) or ``ConfigError``
        for an unusable credential.
        """
        ...


@dataclass(frozen=True)
class Loaded(Generic[T]):
    """One successful read: the value a view built from the document, and when it was read."""

    value: T
    version: int
    name: str
    read_at: float


class CachedDocument(Generic[T]):
    """A document read through ``reader`` and turned into ``T`` by ``build``, cached for ``ttl``.

    ``build`` runs once per read, under the read lock; it raises ``DocumentInvalid`` for a
    document of the wrong kind.  ``clock`` is a monotonic clock in seconds (a parameter so
    tests control time).  Thread-safe.
    """

    def __init__(
        self,
        reader: DocumentReader,
        build: Callable[[Document], T],
        *,
        ttl: float,
        clock: MonotonicClock,
        min_interval: float,
    ) -> None:
        for label, value in (("ttl", ttl), ("min_interval", min_interval)):
            if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value) or value < 0:
                raise ValueError(f"{label} must be a number of seconds >= 0")
        self.reader = reader
        self._build = build
        self.ttl = float(ttl)
        self.min_interval = float(min_interval)
        self._clock = clock
        self._lock = threading.Lock()
        self._loaded: Loaded[T] | None = None
        # No automatic re-read before this instant (set after a failed read).
        self._not_before = -math.inf
        self._reads_started = 0
        self._last_good_read = 0

    def get(self) -> Loaded[T]:
        """The cached value, re-read first when older than ``ttl``.

        Raises the reader's error only when nothing was ever read successfully.
        """
        loaded = self._loaded
        if loaded is None:
            with self._lock:
                if self._loaded is not None:  # another thread's first read finished meanwhile
                    return self._loaded
                return self._read_locked()
        now = self._clock()
        if now - loaded.read_at < self.ttl or now < self._not_before:
            return loaded
        # Someone else is already re-reading: the old value is good enough until they finish.
        if not self._lock.acquire(blocking=False):
            return loaded
        try:
            if self._loaded is not loaded:
                return self._loaded or loaded
            return self._read_or_keep(loaded)
        finally:
            self._lock.release()

    def refresh(self) -> Loaded[T]:
        """Read now and return the result, or raise the reader's error (the cache is kept).

        A read that started after this call and succeeded counts, so many threads refreshing
        at once cause few reads, each of which saw every write made before the call.
        """
        ticket = self._reads_started
        with self._lock:
            if self._last_good_read > ticket and self._loaded is not None:
                return self._loaded
            return self._read_locked()

    def refresh_after_miss(self, observed: Loaded[T]) -> Loaded[T] | None:
        """A newer value after ``observed`` failed the caller, or None if there is none to try.

        Reads only when ``observed`` is at least ``min_interval`` old and no failed read asked to
        wait; if another thread replaced ``observed`` meanwhile, returns that without reading.
        Never raises for a failed read: the caller reports its own miss.
        """
        now = self._clock()
        if self._loaded is observed and (now - observed.read_at < self.min_interval or now < self._not_before):
            return None  # the common case for garbage input: decided without taking the lock
        with self._lock:
            current = self._loaded
            if current is not None and current is not observed:
                return current
            now = self._clock()
            if now - observed.read_at < self.min_interval or now < self._not_before:
                return None
            result = self._read_or_keep(observed)
            return None if result is observed else result

    def _read_or_keep(self, stale: Loaded[T]) -> Loaded[T]:
        try:
            return self._read_locked()
        except Exception as exc:
            self._not_before = self._clock() + self.min_interval
            # rotatord errors carry locators only; other exceptions might carry anything.
            why = str(exc) if isinstance(exc, RotatordError) else type(exc).__name__
            log.warning(
                "cannot re-read secret %r (%s); still using version %d, read %.0fs ago",
                stale.name,
                why,
                stale.version,
                self._clock() - stale.read_at,
            )
            return stale

    def _read_locked(self) -> Loaded[T]:
        """Read, build and install a new value.  The caller holds ``self._lock``."""
        self._reads_started += 1
        seq = self._reads_started
        started = self._clock()
        document = self.reader.read()
        loaded = Loaded(self._build(document), document.version, document.name, started)
        self._loaded = loaded
        self._not_before = -math.inf
        self._last_good_read = seq
        return loaded


class CachedView(Generic[T]):
    """Behaviour shared by the public views (Keyring, TokenSet, SigningSecrets)."""

    _cache: CachedDocument[T]

    @property
    def version(self) -> int:
        """The version of the document currently in use (re-read first if it expired)."""
        return self._cache.get().version

    def refresh(self) -> int:
        """Re-read the document now and return its version.

        Call it when told the secret changed (a rotatord webhook) before acknowledging.
        Raises the reader's error if the read fails; the previous document stays in use.
        """
        return self._cache.refresh().version

    def __repr__(self) -> str:
        reader = type(self._cache.reader).__name__
        return f"{type(self).__name__}({reader}, ttl={self._cache.ttl})"
