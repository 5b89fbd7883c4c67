"""The ``file`` backend: secret documents in a local directory, encrypted at rest.

Layout, one directory per secret path (each path segment is a directory, mode 0700)::

    <directory>/bots/support-bot/db-key/
        v00000001.enc  v00000002.enc ...   immutable version files, 0600
        current                            the current version number, replaced atomically
        .lock                              fcntl.flock: shared for reads, exclusive for writes

The ``current`` pointer is authoritative, as in certbot's live/archive layout: a version file
the pointer has not moved to (a crash between the two writes) is an orphan, invisible to readers
and overwritten by the next write.  Each version file is ``b"RTD1" + nonce(12) + AES-256-GCM
ciphertext``; the associated data binds it to its path and version, so a file copied elsewhere
does not decrypt.  The 32-byte master key lives in a 0600 file or a systemd credential and is
only ever held in memory.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..config.model import FileBackendSettings
from ..config.references import read_credential
from ..document import Document, digest, parse_document, to_dict
from ..errors import (
    BackendUnavailable,
    ConfigError,
    ConflictError,
    DocumentInvalid,
    NotManaged,
    PermissionDenied,
)
from ..fsutil import atomic_write, fsync_dir
from ..interfaces import Backend, Observed, Versioned, VersionInfo
from ..timeutil import Clock, SystemClock, format_ts, parse_ts

__all__ = ["FileBackend", "init_master_key", "path_problem"]

log = logging.getLogger(__name__)

MAGIC = b"RTD1"
NONCE_SIZE = 12
KEY_SIZE = 32
_TAG_SIZE = 16
_POINTER = "current"
_LOCK = ".lock"
_VERSION_RE = re.compile(r"^v(\d{8,})\.enc$")
_SEGMENT_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$")


def _version_file(version: int) -> str:
    return f"v{version:08d}.enc"


def _stamp(file: Path) -> tuple[int, ...] | None:
    """What changes whenever ``file`` is written, replaced or touched (None: it is missing)."""
    try:
        st = file.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _aad(path: str, version: int) -> bytes:
    return f"rotatord/file/v1\0{path}\0{version}".encode()


def path_problem(path: str) -> str | None:
    """Why ``path`` cannot be a secret path of this backend, or None.

    Segments may not start with a dot (no ``..``, no clash with ``.lock`` or temp files) nor
    take the name of a file the layout puts in a secret's directory.
    """
    if not path:
        return "is empty"
    for segment in path.split("/"):
        if not _SEGMENT_RE.match(segment):
            return f"segment {segment!r} is not allowed (letters, digits, '_', '-', '.'; no leading '.')"
        if segment == _POINTER or _VERSION_RE.match(segment):
            return f"segment {segment!r} is reserved by the file backend's layout"
    return None


def _key_field(name: str, settings: FileBackendSettings) -> str:
    which = "master_key_file" if settings.master_key_file is not None else "master_key_credential"
    return f"backends.{name}.{which}"


def _make_private_dirs(target: Path) -> None:
    """Create every missing directory up to ``target`` at 0700 (``mkdir -p`` would use the umask)."""
    missing: list[Path] = []
    probe = target
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):  # a concurrent writer created it first
            directory.mkdir(mode=0o700)
            os.chmod(directory, 0o700)
            # The new entry must survive a crash as surely as the files written into it.
            fsync_dir(directory.parent)
    if not target.is_dir():
        raise NotADirectoryError(20, "not a directory", str(target))


def init_master_key(settings: FileBackendSettings) -> bool:
    """Create the store directory and, if missing, a fresh master key file; True if created.

    Never overwrites an existing key, even if two ``rotatord init`` run at once: the check and
    the write happen under an exclusive flock of the key file's directory.  With
    ``master_key_credential`` the key is provisioned by systemd, so only the directory is made.
    """
    with _os_errors(f"cannot initialise {settings.directory}"):
        _make_private_dirs(settings.directory)
    key_file = settings.master_key_file
    if key_file is None:
        return False
    with _os_errors(f"cannot create master key file {key_file}"):
        _make_private_dirs(key_file.parent)
        fd = os.open(key_file.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if key_file.exists():
                return False
            atomic_write(key_file, base64.b64encode(secrets.token_bytes(KEY_SIZE)) + b"\n", mode=0o600)
            return True
        finally:
            os.close(fd)


@contextlib.contextmanager
def _os_errors(action: str) -> Iterator[None]:
    """Translate OSError at this edge: permissions are the operator's to fix, the rest may pass."""
    try:
        yield
    except PermissionError as exc:
        raise PermissionDenied(f"{action}: {exc.strerror} ({exc.filename})") from exc
    except OSError as exc:
        raise BackendUnavailable(f"{action}: {exc.strerror} ({exc.filename})") from exc


@contextlib.contextmanager
def _flock(lock_path: Path, *, exclusive: bool) -> Iterator[None]:
    """Hold a flock for the block.  Each call opens its own descriptor, so threads of one
    process exclude each other exactly as separate processes do."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


class FileBackend(Backend):
    """Encrypted, versioned documents under ``settings.directory``; see the module docstring."""

    kind: ClassVar[str] = "file"

    def __init__(self, name: str, settings: FileBackendSettings, *, clock: Clock | None = None) -> None:
        self.name = name
        self._settings = settings
        self._root = settings.directory
        self._clock: Clock = clock or SystemClock()
        self._aead: AESGCM | None = None
        self._key_lock = threading.Lock()
        #: path -> (pointer stamp, version file stamp, version, what observe() saw); see observe().
        self._observed: dict[str, tuple[tuple[int, ...], tuple[int, ...], int, Observed]] = {}

    def __repr__(self) -> str:
        return f"FileBackend(name={self.name!r}, directory={str(self._root)!r})"

    # -- the Backend contract ------------------------------------------------------------------

    def read(self, path: str) -> Versioned | None:
        where = self._secret_dir(path)
        with self._os_errors(f"cannot read {path}"):
            if self._pointer(path, where) is None:
                return None  # nothing committed yet; no lock needed to observe that
            aead = self._key()
            with _flock(where / _LOCK, exclusive=False):
                current = self._pointer(path, where)
                if current is None:
                    return None
                envelope = self._open(aead, path, where, current)
        document = parse_document(envelope["document"], where=f"{path} version {current}")
        return Versioned(document, str(current), envelope["request_id"])

    def write(self, path: str, document: Document, *, expected: str | None, request_id: str) -> str:
        where = self._secret_dir(path)
        plaintext_doc = to_dict(document)  # fail on a malformed document before touching disk
        with self._os_errors(f"cannot write {path}"):
            aead = self._key()
            _make_private_dirs(where)
            with _flock(where / _LOCK, exclusive=True):
                current = self._pointer(path, where)
                if current is not None and self._open(aead, path, where, current)["request_id"] == request_id:
                    return str(current)  # a retry of a write that already happened
                actual = None if current is None else str(current)
                if expected != actual:
                    raise ConflictError(
                        f"backend {self.name!r}: {path}: expected "
                        f"{'no version (create)' if expected is None else f'version {expected}'}, "
                        f"but the current version is {'none' if actual is None else actual}"
                    )
                new = (current or 0) + 1
                envelope = {
                    "request_id": request_id,
                    "written_at": format_ts(self._clock.now()),
                    "document": plaintext_doc,
                }
                plaintext = json.dumps(envelope, sort_keys=True, separators=(",", ":")).encode()
                nonce = os.urandom(NONCE_SIZE)
                blob = MAGIC + nonce + aead.encrypt(nonce, plaintext, _aad(path, new))
                atomic_write(where / _version_file(new), blob)
                atomic_write(where / _POINTER, f"{new}\n".encode())
                self._prune(path, where, new)
                return str(new)

    def observe(self, path: str) -> Observed | None:
        """See :meth:`Backend.observe`.  The answer for unchanged files is remembered: the drift
        check asks for every secret every few minutes, and decrypting and validating each
        document again (or even taking its lock) would cost a daemon with 1,000 secrets a
        second of CPU each time.  "Unchanged" is the ``current`` pointer's and the version
        file's inode, size, mtime and ctime: any write, rename or ``touch`` changes the ctime,
        which no unprivileged process can set back.
        """
        where = self._secret_dir(path)
        cached = self._observed.get(path)
        if cached is not None:
            was_pointer, was_version, number, known = cached
            if _stamp(where / _POINTER) == was_pointer and _stamp(where / _version_file(number)) == was_version:
                return known
        with self._os_errors(f"cannot read {path}"):
            if self._pointer(path, where) is None:
                return None
            aead = self._key()
            with _flock(where / _LOCK, exclusive=False):
                pointer_stamp = _stamp(where / _POINTER)
                current = self._pointer(path, where)
                if current is None:
                    return None
                version_stamp = _stamp(where / _version_file(current))
                try:
                    envelope = self._open(aead, path, where, current)
                except DocumentInvalid as exc:
                    # Missing, undecryptable or tampered: someone other than rotatord was here.
                    return Observed(str(current), None, unreadable="invalid", problem=str(exc))
        request_id = envelope.get("request_id")
        raw = envelope.get("document")
        try:
            if not isinstance(raw, dict):
                raise DocumentInvalid(f"{path} version {current}: no document in the envelope")
            document = parse_document(raw, where=f"{path} version {current}")
        except DocumentInvalid as exc:
            return Observed(str(current), None, request_id, unreadable="invalid", problem=str(exc))
        seen = Observed(str(current), digest(document), request_id, owner=(document.name, document.kind))
        if pointer_stamp is not None and version_stamp is not None:
            self._observed[path] = (pointer_stamp, version_stamp, current, seen)
        return seen

    def history(self, path: str) -> list[VersionInfo]:
        where = self._secret_dir(path)
        with self._os_errors(f"cannot list versions of {path}"):
            if self._pointer(path, where) is None:
                return []
            aead = self._key()
            with _flock(where / _LOCK, exclusive=False):
                current = self._pointer(path, where)
                if current is None:
                    return []
                out = []
                for version in self._committed(where, current):
                    envelope = self._open(aead, path, where, version)
                    out.append(
                        VersionInfo(
                            version=str(version),
                            created_at=_parse_written_at(envelope.get("written_at")),
                            current=version == current,
                            request_id=envelope["request_id"],
                        )
                    )
                return out

    def read_version(self, path: str, version: str) -> Versioned | None:
        where = self._secret_dir(path)
        if not version.isdigit() or int(version) < 1:
            return None
        number = int(version)
        with self._os_errors(f"cannot read {path} version {version}"):
            if self._pointer(path, where) is None:
                return None
            aead = self._key()
            with _flock(where / _LOCK, exclusive=False):
                current = self._pointer(path, where)
                # Versions above the pointer are orphans of a crashed write: never published.
                if current is None or number > current or not (where / _version_file(number)).exists():
                    return None
                envelope = self._open(aead, path, where, number)
        document = parse_document(envelope["document"], where=f"{path} version {number}")
        return Versioned(document, str(number), envelope["request_id"])

    def check(self) -> None:
        with self._os_errors(f"cannot use directory {self._root}"):
            _make_private_dirs(self._root)
            if not os.access(self._root, os.W_OK | os.X_OK):
                raise PermissionDenied(f"backend {self.name!r}: directory {self._root} is not writable")
        self._key()

    def close(self) -> None:
        with self._key_lock:
            self._aead = None

    # -- internals -------------------------------------------------------------------------------

    def _secret_dir(self, path: str) -> Path:
        problem = path_problem(path)
        if problem:
            raise ConfigError(f"backend {self.name!r}: path {path!r} {problem}")
        return self._root.joinpath(*path.split("/"))

    def _key(self) -> AESGCM:
        """Load the master key on first use; later calls reuse the cipher held in memory."""
        with self._key_lock:
            if self._aead is None:
                what = _key_field(self.name, self._settings)
                if self._settings.master_key_file is None and self._settings.master_key_credential is None:
                    raise ConfigError(f"backends.{self.name}: set one of master_key_file, master_key_credential")
                raw = read_credential(self._settings.master_key_file, self._settings.master_key_credential, what)
                try:
                    key = base64.b64decode(raw.strip(), validate=True)
                except ValueError:
                    key = b""
                if len(key) != KEY_SIZE:
                    raise ConfigError(
                        f"{what}: not a master key (expected {KEY_SIZE} random bytes, base64-encoded; "
                        "'rotatord init' creates one)"
                    )
                self._aead = AESGCM(key)
            return self._aead

    def _pointer(self, path: str, where: Path) -> int | None:
        """The committed version at ``where``, or None if nothing was ever committed there."""
        try:
            text = (where / _POINTER).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            if where.exists() and not where.is_dir():
                raise NotManaged(f"backend {self.name!r}: {path} is a file, not a secret directory") from None
            return None
        value = text.strip()
        if not value.isdigit() or int(value) < 1:
            raise NotManaged(f"backend {self.name!r}: {path}: {_POINTER!r} does not hold a version number")
        return int(value)

    def _open(self, aead: AESGCM, path: str, where: Path, version: int) -> dict[str, Any]:
        """Decrypt and authenticate one version file into its envelope."""
        try:
            blob = (where / _version_file(version)).read_bytes()
        except FileNotFoundError:
            raise DocumentInvalid(
                f"backend {self.name!r}: {path} version {version}: the version file is missing"
            ) from None
        # One message for every failure (short file, wrong magic, wrong key, tampering, wrong
        # place), so the error is no oracle about which check failed.
        undecryptable = DocumentInvalid(
            f"backend {self.name!r}: {path} version {version}: cannot be decrypted with the configured "
            "master key (wrong key or tampered file)"
        )
        if len(blob) < len(MAGIC) + NONCE_SIZE + _TAG_SIZE or not blob.startswith(MAGIC):
            raise undecryptable
        nonce = blob[len(MAGIC) : len(MAGIC) + NONCE_SIZE]
        try:
            plaintext = aead.decrypt(nonce, blob[len(MAGIC) + NONCE_SIZE :], _aad(path, version))
        except InvalidTag:
            raise undecryptable from None
        try:
            envelope = json.loads(plaintext)
        except ValueError:
            envelope = None
        if not isinstance(envelope, dict) or not isinstance(envelope.get("request_id"), str | None):
            raise DocumentInvalid(f"backend {self.name!r}: {path} version {version}: malformed envelope")
        return envelope

    def _committed(self, where: Path, current: int) -> list[int]:
        """Version numbers kept at ``where`` up to ``current``, oldest first; orphans excluded."""
        versions = []
        for entry in os.listdir(where):
            match = _VERSION_RE.match(entry)
            if match and int(match.group(1)) <= current:
                versions.append(int(match.group(1)))
        return sorted(versions)

    def _prune(self, path: str, where: Path, current: int) -> None:
        """Delete the oldest versions beyond ``max_versions``.  The write is already committed,
        so a failure here is logged, not raised: the next write prunes again."""
        try:
            for version in self._committed(where, current)[: -self._settings.max_versions]:
                (where / _version_file(version)).unlink(missing_ok=True)
        except OSError as exc:
            log.warning("backend %r: %s: could not prune old versions (%s)", self.name, path, exc.strerror)

    def _os_errors(self, action: str) -> contextlib.AbstractContextManager[None]:
        return _os_errors(f"backend {self.name!r}: {action}")


def _parse_written_at(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return parse_ts(value)
    except ValueError:
        return None
