"""Who may act: one leader among the instances sharing a PostgreSQL state database.

Design (issue 6, "Several instances"):

- **Roles.**  ``single``: SQLite (or any non-PostgreSQL) state, one instance, no lease - the
  per-state-directory flock is the guard, as before.  ``leader``: holds the lease row of
  :mod:`rotatord.engine.lease` and runs rotations.  ``standby``: serves the control socket
  (``status``, ``history``), refuses changes with :class:`~rotatord.errors.NotLeader` naming
  the leader, and polls the lease.
- **Lease.**  The leader renews every ``lease_renew`` (default ``lease_ttl / 3``); the database
  sets ``expires_at = clock_timestamp() + lease_ttl``.  A standby reads how long the lease has
  left (database clock) and tries to take it right after it expires, so a killed leader is
  replaced at most ``lease_ttl`` after its last renewal.
- **Fencing, twice.**  (1) Self-fencing on this process's monotonic clock: ``t0`` is read
  before a renewal is sent, so the database's expiry is at least ``t0 + lease_ttl`` in real
  time; on success the leader may act until ``t0 + lease_ttl - lease_ttl / 5``, strictly before
  anyone can take over.  :meth:`Leadership.may_act` is evaluated at every use (no timer thread
  needs to fire), so a stalled renewal thread cannot extend it.  The daemon then pauses its
  scheduler, steps stop at their next boundary, and the webhook worker stops.  (2) Every
  journal write transaction runs :data:`~rotatord.engine.lease.FENCE_SQL` first
  (:meth:`Leadership.check_write`): a deposed leader's write - a thread that was paused, or a
  step in flight when the lease lapsed - reads a newer epoch (or finds the local deadline
  passed) and is rolled back with :class:`~rotatord.errors.Fenced`.  A backend write already
  sent by such a step is idempotent (same request id, check-and-set); the next leader re-runs
  the step from its journal record and finds the effect in place.
- **Re-election.**  An instance that lost the lease becomes a standby and competes again only
  after the daemon reports its work drained (:meth:`Leadership.drained`), so a new epoch is
  never shared with work of the old one.  The takeover itself is the ordinary start-up path:
  resume every active rotation from the journal, arm the scheduler.
- Splitting one secret's re-encryption across instances is not done: the leader does it all.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

from ..config.model import DaemonSettings
from ..engine.lease import FENCE_SQL, LeaseStore, supports_lease
from ..errors import Fenced, NotLeader, StateError

__all__ = ["Leadership", "Role"]

log = logging.getLogger("rotatord.leader")
Role = Literal["single", "leader", "standby"]
#: The fraction of the lease the leader gives up acting before it could expire.
SAFETY_FRACTION = 0.2
#: How often a standby polls while the lease is held (it sleeps until the expiry when sooner).
STANDBY_POLL_MAX = 2.0


@dataclass(frozen=True)
class _Tenure:
    epoch: int
    deadline: float  # time.monotonic() after which this process must not act


class Leadership:
    """The role of this instance; thread-safe.  Without a lease store the role is ``single``."""

    def __init__(self, store: LeaseStore | None, instance: str, ttl: float, renew: float) -> None:
        self.store = store
        self.instance = instance
        self.ttl = ttl
        self.renew_every = renew
        self.margin = ttl * SAFETY_FRACTION
        self._tenure: _Tenure | None = None
        self._leader: str | None = None
        # The epoch of our last tenure, and the last one whose work the daemon reported drained:
        # we compete again only when they are equal.
        self._last_epoch: int | None = None
        self._drained_epoch: int | None = None
        self._lock = threading.Lock()  # tenure transitions: renewal thread vs. the write guard
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def for_settings(cls, daemon: DaemonSettings) -> Leadership:
        """A lease on a PostgreSQL state database, else ``single``.  Raises StateError."""
        ttl = daemon.lease_ttl.total_seconds()
        renew = daemon.lease_renew_every.total_seconds()
        if not supports_lease(daemon.database_url):
            return cls(None, daemon.instance, ttl, renew)
        store = LeaseStore(daemon.database_url, daemon.instance, daemon.lease_renew_every)
        store.create()
        return cls(store, daemon.instance, ttl, renew)

    # -- what the daemon asks ---------------------------------------------------------------

    @property
    def multi(self) -> bool:
        return self.store is not None

    def role(self) -> Role:
        if self.store is None:
            return "single"
        return "leader" if self.may_act() else "standby"

    def may_act(self) -> bool:
        """True while this process may run steps: single, or leader before its local deadline."""
        if self.store is None:
            return True
        tenure = self._tenure
        return tenure is not None and time.monotonic() < tenure.deadline

    @property
    def epoch(self) -> int | None:
        tenure = self._tenure
        return tenure.epoch if tenure is not None else None

    def leader_name(self) -> str | None:
        """The leader's instance name as last seen (this instance's own when it leads)."""
        if self.store is None or self.may_act():
            return self.instance
        leader = self._leader
        return None if leader == self.instance else leader  # our own lapsed tenure is nobody's

    def require_leader(self, what: str) -> None:
        """Raise NotLeader naming the leader unless this instance may act."""
        if self.may_act():
            return
        leader = self.leader_name()
        where = (
            f"the leader is instance {leader!r}: run the command there"
            if leader
            else "no instance holds the leader lease right now: retry in a few seconds"
        )
        raise NotLeader(f"{what} refused: this instance ({self.instance!r}) is a standby; {where}")

    def check_write(self, dbapi_connection: Any) -> None:
        """The journal's write guard (see the module docstring).  Raises Fenced."""
        tenure = self._tenure
        if tenure is None or time.monotonic() >= tenure.deadline:
            raise Fenced(f"instance {self.instance!r} does not hold the leader lease; the write was refused")
        cur = dbapi_connection.cursor()
        try:
            cur.execute(FENCE_SQL)
            row = cur.fetchone()
        finally:
            cur.close()
        if row is None or int(row[0]) != tenure.epoch:
            self._lose(tenure, "the lease was taken over")
            raise Fenced(
                f"instance {self.instance!r} lost the leader lease (epoch {tenure.epoch}); the write was refused"
            )

    def acquire_now(self, what: str) -> None:
        """Take the lease once, for a one-off run such as ``rotate --offline``.

        Raises NotLeader naming the holder when another instance leads, StateError when the
        database cannot be reached.  :meth:`start` keeps it renewed, :meth:`stop` releases it.
        """
        if self.store is None:
            return
        started = time.monotonic()
        lease = self.store.try_acquire(_seconds(self.ttl))
        if lease is None:
            holder = self.store.current().holder
            raise NotLeader(
                f"{what} refused: instance {holder!r} holds the leader lease; "
                "run the command without --offline on that instance"
            )
        self._take(lease.epoch, started)

    def drained(self) -> None:
        """The daemon has stopped all work of the last tenure: this instance may lead again."""
        self._drained_epoch = self._last_epoch

    # -- the lease thread --------------------------------------------------------------------

    def start(self) -> None:
        if self.store is not None and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="rotatord-lease", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop competing and, when leading, release the lease so a standby takes over at once."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.ttl)
        with self._lock:
            tenure, self._tenure = self._tenure, None
        if self.store is not None:
            if tenure is not None:
                try:
                    self.store.release(tenure.epoch)
                    log.info("leader lease released", extra={"epoch": tenure.epoch})
                except StateError as exc:
                    log.warning("could not release the leader lease; it expires", extra={"error": str(exc)})
            self.store.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                pause = self._lead_once() if self._tenure is not None else self._compete_once()
            except Exception:  # the thread must outlive any surprise; acting stays gated by the deadline
                log.exception("leader lease loop failed")
                pause = self.renew_every
            self._stop.wait(pause)

    def _lead_once(self) -> float:
        tenure = self._tenure
        assert tenure is not None and self.store is not None
        if time.monotonic() >= tenure.deadline:
            self._lose(tenure, "the lease could not be renewed in time")
            return 0.0
        started = time.monotonic()  # before the request: the database's expiry is later than this
        try:
            renewed = self.store.renew(tenure.epoch, _seconds(self.ttl))
        except StateError as exc:
            log.warning("leader lease renewal failed; retrying", extra={"error": str(exc), "epoch": tenure.epoch})
            return min(self.renew_every, max(0.1, (tenure.deadline - time.monotonic()) / 2))
        if not renewed:
            self._lose(tenure, "the lease expired or was taken over")
            return 0.0
        with self._lock:
            if self._tenure is tenure:  # not lost meanwhile (the write guard may have seen a takeover)
                self._tenure = _Tenure(tenure.epoch, started + self.ttl - self.margin)
        return self.renew_every

    def _compete_once(self) -> float:
        assert self.store is not None
        if self._last_epoch != self._drained_epoch:
            return 0.1
        started = time.monotonic()
        try:
            lease = self.store.try_acquire(_seconds(self.ttl))
            info = None if lease is not None else self.store.current()
        except StateError as exc:
            log.warning("cannot read the leader lease", extra={"error": str(exc)})
            return self.renew_every
        if lease is not None:
            self._take(lease.epoch, started)
            log.info("leader lease acquired: this instance leads", extra={"epoch": lease.epoch})
            return self.renew_every
        assert info is not None
        leader, self._leader = self._leader, info.holder if info.expires_in > 0 else None
        if self._leader != leader and self._leader is not None:
            log.info("standing by", extra={"leader": self._leader, "epoch": info.epoch})
        # Wake just after the expiry on the database clock, so a dead leader is replaced promptly.
        return max(0.05, min(STANDBY_POLL_MAX, self.renew_every, info.expires_in + 0.05))

    def _take(self, epoch: int, started: float) -> None:
        self._last_epoch = epoch
        with self._lock:
            self._tenure = _Tenure(epoch, started + self.ttl - self.margin)
        self._leader = self.instance

    def _lose(self, tenure: _Tenure, why: str) -> None:
        with self._lock:
            if self._tenure is not tenure:
                return
            self._tenure = None
            self._leader = None
        log.warning("leader lease lost: this instance stopped acting", extra={"epoch": tenure.epoch, "why": why})


def _seconds(value: float) -> timedelta:
    return timedelta(seconds=value)
