"""The one error tree of rotatord.

Subclasses follow what the operator does next, not where the error was raised::

    RotatordError                      exit 1 unless a subclass says otherwise
    ├── ConfigError                    fix the configuration              (exit 78, EX_CONFIG)
    ├── UsageError                     fix the command line or request     (exit 64, EX_USAGE)
    │   └── UnknownSecret              the name is not a managed secret
    ├── DaemonNotRunning               start the daemon, or use --offline  (exit 69, EX_UNAVAILABLE)
    ├── LockHeld                       another instance owns this state    (exit 75, EX_TEMPFAIL)
    ├── ListenError                    free the address or configure another (exit 69, EX_UNAVAILABLE)
    ├── NotLeader                      a standby: ask the leader it names  (exit 75)
    ├── BackendError                   check the secret backend
    │   ├── BackendUnavailable         transient: rotatord retries it      (exit 75)
    │   ├── PermissionDenied           grant the documented policy         (exit 77, EX_NOPERM)
    │   ├── ConflictError              a concurrent writer won; re-read and retry
    │   ├── DocumentInvalid            a document fails the schema; it is never overwritten (exit 65)
    │   └── NotManaged                 the path holds data rotatord did not write
    ├── StoreError                     check the data store
    ├── RotationError                  a rotation cannot proceed; the previous primary still works
    │   ├── RotationInProgress         wait for the running rotation
    │   ├── RollbackImpossible         no previous primary left in the ring
    │   ├── RetirementBlocked          data still needs the retiring key
    │   ├── ReencryptionIncomplete     items are still under old keys after the passes; retried
    │   ├── DriftDetected              someone else changed the secret: adopt it or rotate --emergency
    │   └── StepInterrupted            the daemon is stopping; the step resumes from its checkpoint
    ├── StateError                     the state database is unusable or inconsistent
    │   └── Fenced                     this instance lost the leader lease; its write was refused
    ├── AuditError                     the audit log failed verification    (exit 65)
    ├── ControlError                   the control socket protocol was violated
    └── DecryptError                   a token could not be decrypted (never says which check failed)

Programmer misuse raises ``TypeError`` / ``ValueError`` instead.  No message of any of these
errors may contain key material; callers pass locators (names, paths, versions), never values.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "AuditError",
    "BackendError",
    "BackendUnavailable",
    "ConfigError",
    "ConflictError",
    "ControlError",
    "DaemonNotRunning",
    "DecryptError",
    "DocumentInvalid",
    "DriftDetected",
    "ListenError",
    "Fenced",
    "LockHeld",
    "NotLeader",
    "NotManaged",
    "PermissionDenied",
    "ReencryptionIncomplete",
    "RetirementBlocked",
    "RollbackImpossible",
    "RotationError",
    "RotationInProgress",
    "RotatordError",
    "StateError",
    "StepInterrupted",
    "StoreError",
    "UnknownSecret",
    "UsageError",
]


class RotatordError(Exception):
    """Base of every error rotatord raises on purpose."""

    exit_code: ClassVar[int] = 1
    #: True when retrying the same operation later may succeed.
    transient: ClassVar[bool] = False


class ConfigError(RotatordError):
    """The configuration is invalid.  ``problems`` lists one line per problem, each naming its field."""

    exit_code = 78

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


class UsageError(RotatordError):
    exit_code = 64


class UnknownSecret(UsageError):
    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"unknown secret {name!r}: not in the configuration")


class DaemonNotRunning(RotatordError):
    exit_code = 69


class LockHeld(RotatordError):
    exit_code = 75
    transient = True


class ListenError(RotatordError):
    """A configured listening address cannot be bound (in use, not local, not permitted)."""

    exit_code = 69


class NotLeader(RotatordError):
    """This instance is a standby; the message names the leader to ask instead."""

    exit_code = 75
    transient = True


class BackendError(RotatordError):
    exit_code = 69


class BackendUnavailable(BackendError):
    exit_code = 75
    transient = True


class PermissionDenied(BackendError):
    exit_code = 77


class ConflictError(BackendError):
    transient = True


class DocumentInvalid(BackendError):
    exit_code = 65


class NotManaged(BackendError):
    exit_code = 65


class StoreError(RotatordError):
    exit_code = 69


class RotationError(RotatordError):
    pass


class RotationInProgress(RotationError):
    exit_code = 75
    transient = True


class RollbackImpossible(RotationError):
    pass


class RetirementBlocked(RotationError):
    transient = True


class ReencryptionIncomplete(RotationError):
    transient = True


class DriftDetected(RotationError):
    """The backend holds something rotatord did not write; its rotations are paused."""


class StepInterrupted(RotationError):
    transient = True


class StateError(RotatordError):
    exit_code = 70


class Fenced(StateError):
    """A write by an instance that no longer holds the leader lease; it was rolled back."""

    transient = True


class AuditError(RotatordError):
    exit_code = 65


class ControlError(RotatordError):
    exit_code = 64


class DecryptError(RotatordError):
    """Raised for every decryption failure alike, so the message is no oracle."""

    def __init__(self) -> None:
        super().__init__("cannot decrypt")
