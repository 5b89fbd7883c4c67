"""What is specific to the ``file`` backend: layout, permissions, encryption at rest, the master key."""

from __future__ import annotations

import base64
import os
import shutil
import stat
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from rotatord.backends.file import FileBackend, _os_errors, init_master_key
from rotatord.backends.registry import BACKENDS, open_backend
from rotatord.config.model import FileBackendSettings
from rotatord.document import digest
from rotatord.errors import (
    BackendUnavailable,
    ConfigError,
    ConflictError,
    DocumentInvalid,
    NotManaged,
    PermissionDenied,
)
from rotatord.fsutil import atomic_write
from tests.contract.conftest import api_tokens, fernet_ring, materials
from tests.helpers import unwritable

PATH = "bots/support-bot/db-key"


class FixedClock:
    def __init__(self, now: datetime) -> None:
        self.value = now

    def now(self) -> datetime:
        return self.value


def settings_for(tmp_path: Path, **overrides: object) -> FileBackendSettings:
    values: dict[str, object] = {
        "kind": "file",
        "directory": tmp_path / "store",
        "master_key_file": tmp_path / "keys" / "master.key",
    }
    values.update(overrides)
    return FileBackendSettings.model_validate(values)


@pytest.fixture
def settings(tmp_path: Path) -> FileBackendSettings:
    s = settings_for(tmp_path)
    assert init_master_key(s)
    return s


@pytest.fixture
def backend(settings: FileBackendSettings) -> FileBackend:
    return FileBackend("main", settings)


def secret_dir(settings: FileBackendSettings, path: str = PATH) -> Path:
    return settings.directory.joinpath(*path.split("/"))


def test_registry_opens_file_backend_lazily(settings: FileBackendSettings) -> None:
    backend = open_backend("main", settings)
    assert isinstance(backend, FileBackend) and backend.name == "main" and backend.kind == "file"
    assert BACKENDS["file"] == "rotatord.backends.file:FileBackend"
    # The registry names modules instead of importing them, so no unused SDK gets loaded.
    code = "import sys, rotatord.backends.registry; print('rotatord.backends.file' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_layout_and_modes(tmp_path: Path, settings: FileBackendSettings, backend: FileBackend) -> None:
    v1 = backend.write(PATH, fernet_ring(), expected=None, request_id="r1")
    backend.write(PATH, fernet_ring(version=2), expected=v1, request_id="r2")
    where = secret_dir(settings)
    assert sorted(os.listdir(where)) == [".lock", "current", "v00000001.enc", "v00000002.enc"]
    assert (where / "current").read_text() == "2\n"
    assert settings.master_key_file is not None
    checked = 0
    for root in (settings.directory, settings.master_key_file.parent):
        for dirpath, _subdirs, filenames in os.walk(root):
            assert stat.S_IMODE(os.stat(dirpath).st_mode) == 0o700, dirpath
            for name in filenames:
                assert stat.S_IMODE(os.stat(Path(dirpath) / name).st_mode) == 0o600, name
                checked += 1
    assert checked == 5  # four in the secret's directory, plus the master key


def test_no_plaintext_at_rest(settings: FileBackendSettings, backend: FileBackend) -> None:
    ring, tokens = fernet_ring(keys=3), api_tokens()
    backend.write(PATH, ring, expected=None, request_id="r1")
    backend.write("bots/api", tokens, expected=None, request_id="r2")
    needles = [m.encode() for m in materials(ring) + materials(tokens)]
    # The raw 32 bytes behind each Fernet key, too, not only their base64 text.
    needles += [base64.urlsafe_b64decode(m) for m in materials(ring)]
    needles += [ring.name.encode(), b"rotatord/v1"]
    blobs = [p.read_bytes() for p in settings.directory.rglob("*") if p.is_file()]
    assert len(blobs) == 6
    for blob in blobs:
        assert not any(needle in blob for needle in needles)


@pytest.mark.parametrize("offset", [0, 6, 30, -1], ids=["magic", "nonce", "ciphertext", "tag"])
def test_tampered_version_file_is_refused(settings: FileBackendSettings, backend: FileBackend, offset: int) -> None:
    ring = fernet_ring()
    backend.write(PATH, ring, expected=None, request_id="r1")
    target = secret_dir(settings) / "v00000001.enc"
    blob = bytearray(target.read_bytes())
    blob[offset] ^= 0x01
    target.write_bytes(bytes(blob))
    for call in (lambda: backend.read(PATH), lambda: backend.history(PATH)):
        with pytest.raises(DocumentInvalid) as info:
            call()
        message = str(info.value)
        # The same words whichever check failed, naming the place and never the material.
        assert f"{PATH} version 1: cannot be decrypted with the configured master key" in message
        assert not any(m in message for m in materials(ring))
    # A damaged current version is never overwritten.
    with pytest.raises(DocumentInvalid):
        backend.write(PATH, fernet_ring(version=2), expected="1", request_id="r2")
    assert (secret_dir(settings) / "current").read_text() == "1\n"


def test_version_file_is_bound_to_its_place(settings: FileBackendSettings, backend: FileBackend) -> None:
    v1 = backend.write(PATH, fernet_ring(version=1), expected=None, request_id="r1")
    backend.write(PATH, fernet_ring(version=2), expected=v1, request_id="r2")
    where = secret_dir(settings)
    shutil.copyfile(where / "v00000001.enc", where / "v00000002.enc")
    with pytest.raises(DocumentInvalid, match="version 2: cannot be decrypted"):
        backend.read(PATH)
    # Nor does a version file moved to another secret's path.
    backend.write("bots/other", api_tokens(), expected=None, request_id="o1")
    shutil.copyfile(where / "v00000001.enc", secret_dir(settings, "bots/other") / "v00000001.enc")
    with pytest.raises(DocumentInvalid, match="bots/other version 1: cannot be decrypted"):
        backend.read("bots/other")


def test_wrong_master_key_cannot_decrypt(tmp_path: Path, settings: FileBackendSettings, backend: FileBackend) -> None:
    backend.write(PATH, fernet_ring(), expected=None, request_id="r1")
    other = settings_for(tmp_path, master_key_file=tmp_path / "other" / "master.key")
    assert init_master_key(other)
    with pytest.raises(DocumentInvalid, match="wrong key or tampered file"):
        FileBackend("main", other).read(PATH)


def test_group_readable_master_key_is_refused(settings: FileBackendSettings) -> None:
    assert settings.master_key_file is not None
    settings.master_key_file.chmod(0o644)
    backend = FileBackend("main", settings)
    for call in (backend.check, lambda: backend.write(PATH, fernet_ring(), expected=None, request_id="r")):
        with pytest.raises(ConfigError, match=r"backends\.main\.master_key_file: .*accessible by group or others"):
            call()
    assert not secret_dir(settings).exists()


@pytest.mark.parametrize(
    "content", [b"", b"not base64!!\n", base64.b64encode(b"x" * 16)], ids=["empty", "junk", "short"]
)
def test_malformed_master_key_is_refused(tmp_path: Path, content: bytes) -> None:
    s = settings_for(tmp_path)
    assert s.master_key_file is not None
    s.master_key_file.parent.mkdir(mode=0o700)
    atomic_write(s.master_key_file, content)
    with pytest.raises(ConfigError, match=r"backends\.main\.master_key_file: not a master key") as info:
        FileBackend("main", s).check()
    if content.strip():
        assert content.strip().decode() not in str(info.value)


def test_master_key_from_credentials_directory(
    tmp_path: Path, settings: FileBackendSettings, backend: FileBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = tmp_path / "creds"
    creds.mkdir(mode=0o700)
    assert settings.master_key_file is not None
    atomic_write(creds / "file-master-key", settings.master_key_file.read_bytes())
    by_credential = settings_for(tmp_path, master_key_file=None, master_key_credential="file-master-key")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    ring = fernet_ring()
    version = FileBackend("main", by_credential).write(PATH, ring, expected=None, request_id="r1")
    # The file-configured backend reads it back: both really used the same key.
    got = backend.read(PATH)
    assert got is not None and (got.version, digest(got.document)) == (version, digest(ring))
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    with pytest.raises(ConfigError, match="CREDENTIALS_DIRECTORY is not set"):
        FileBackend("main", by_credential).read(PATH)


def test_init_master_key_creates_once(tmp_path: Path) -> None:
    s = settings_for(tmp_path)
    assert s.master_key_file is not None
    assert init_master_key(s) is True
    key_text = s.master_key_file.read_bytes()
    assert len(base64.b64decode(key_text.strip(), validate=True)) == 32
    assert stat.S_IMODE(s.master_key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(s.directory.stat().st_mode) == 0o700
    assert init_master_key(s) is False
    assert s.master_key_file.read_bytes() == key_text
    FileBackend("main", s).check()


def test_orphan_version_is_ignored_then_overwritten(settings: FileBackendSettings, backend: FileBackend) -> None:
    first = fernet_ring(version=1)
    v1 = backend.write(PATH, first, expected=None, request_id="r1")
    backend.write(PATH, fernet_ring(version=2), expected=v1, request_id="crashed")
    # A crash between the version file and the pointer: the pointer still says 1.
    atomic_write(secret_dir(settings) / "current", b"1\n")
    got = backend.read(PATH)
    assert got is not None and (got.version, digest(got.document)) == ("1", digest(first))
    assert [h.version for h in backend.history(PATH)] == ["1"]
    with pytest.raises(ConflictError):
        backend.write(PATH, fernet_ring(version=2), expected="2", request_id="r3")
    replacement = fernet_ring(version=2)
    assert backend.write(PATH, replacement, expected="1", request_id="r3") == "2"
    got = backend.read(PATH)
    assert got is not None
    assert (got.version, got.request_id, digest(got.document)) == ("2", "r3", digest(replacement))


def test_max_versions_keeps_the_newest(tmp_path: Path) -> None:
    s = settings_for(tmp_path, max_versions=3)
    init_master_key(s)
    backend = FileBackend("main", s)
    expected = None
    for n in range(1, 6):
        expected = backend.write(PATH, fernet_ring(version=n), expected=expected, request_id=f"r{n}")
    kept = sorted(p.name for p in secret_dir(s).glob("v*.enc"))
    assert kept == ["v00000003.enc", "v00000004.enc", "v00000005.enc"]
    history = backend.history(PATH)
    assert [(h.version, h.request_id, h.current) for h in history] == [
        ("3", "r3", False),
        ("4", "r4", False),
        ("5", "r5", True),
    ]


def test_history_timestamps_come_from_the_clock(settings: FileBackendSettings) -> None:
    clock = FixedClock(datetime(2025, 3, 1, 12, 0, tzinfo=UTC))
    backend = FileBackend("main", settings, clock=clock)
    v1 = backend.write(PATH, fernet_ring(), expected=None, request_id="r1")
    clock.value = datetime(2025, 3, 2, 12, 0, tzinfo=UTC)
    backend.write(PATH, fernet_ring(version=2), expected=v1, request_id="r2")
    assert [h.created_at for h in backend.history(PATH)] == [
        datetime(2025, 3, 1, 12, 0, tzinfo=UTC),
        datetime(2025, 3, 2, 12, 0, tzinfo=UTC),
    ]


def test_document_name_is_not_checked_against_path(backend: FileBackend) -> None:
    backend.write("anything/else", fernet_ring(name="bot-db"), expected=None, request_id="r1")
    got = backend.read("anything/else")
    assert got is not None and got.document.name == "bot-db"


@pytest.mark.parametrize("path", ["../escape", "a/../b", ".hidden", "a//b", "a/current", "a/v00000001.enc", ""])
def test_unsafe_or_reserved_paths_are_refused(settings: FileBackendSettings, backend: FileBackend, path: str) -> None:
    with pytest.raises(ConfigError, match="backend 'main': path"):
        backend.write(path, fernet_ring(), expected=None, request_id="r1")
    assert sorted(os.listdir(settings.directory)) == []


def test_malformed_pointer_is_not_managed(settings: FileBackendSettings, backend: FileBackend) -> None:
    backend.write(PATH, fernet_ring(), expected=None, request_id="r1")
    (secret_dir(settings) / "current").write_text("seven\n")
    with pytest.raises(NotManaged, match=f"{PATH}: 'current' does not hold a version number"):
        backend.read(PATH)


def test_os_errors_are_translated(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    s = settings_for(tmp_path, directory=blocker / "store")
    init_master_key(settings_for(tmp_path))  # the key itself is fine
    backend = FileBackend("main", s)
    with pytest.raises(BackendUnavailable, match=f"backend 'main': cannot write {PATH}"):
        backend.write(PATH, fernet_ring(), expected=None, request_id="r1")
    with pytest.raises(BackendUnavailable):
        backend.check()


def test_permission_errors_map_to_permission_denied() -> None:
    # Root (as in CI containers) ignores modes, so the mapping itself is checked here as well.
    with (
        pytest.raises(PermissionDenied, match=r"^cannot write x: Permission denied \(/store/x\)$"),
        _os_errors("cannot write x"),
    ):
        raise PermissionError(13, "Permission denied", "/store/x")


def test_unwritable_directory_is_permission_denied(settings: FileBackendSettings, backend: FileBackend) -> None:
    backend.check()
    with (
        unwritable(settings.directory),
        pytest.raises(PermissionDenied, match=f"backend 'main': cannot write {PATH}"),
    ):
        backend.write(PATH, fernet_ring(), expected=None, request_id="r1")
    assert backend.read(PATH) is None


def test_repr_names_no_key(settings: FileBackendSettings, backend: FileBackend) -> None:
    backend.check()
    assert settings.master_key_file is not None
    key_text = settings.master_key_file.read_text().strip()
    assert repr(backend) == f"FileBackend(name='main', directory={str(settings.directory)!r})"
    assert key_text not in repr(backend.__dict__)


_WRITER = """
import sys
from pathlib import Path
from rotatord.backends.file import FileBackend
from rotatord.config.model import FileBackendSettings
from rotatord.errors import ConflictError
from tests.contract.conftest import fernet_ring

directory, key_file, worker = sys.argv[1], sys.argv[2], sys.argv[3]
settings = FileBackendSettings(kind="file", directory=Path(directory), master_key_file=Path(key_file), max_versions=20)
backend = FileBackend("main", settings)
for n in range(5):
    while True:
        seen = backend.read("shared")
        try:
            backend.write("shared", fernet_ring(), expected=seen.version if seen else None, request_id=f"{worker}-{n}")
            break
        except ConflictError:
            continue
"""


def test_writer_processes_lose_no_update(settings: FileBackendSettings) -> None:
    root = Path(__file__).resolve().parents[2]
    args = [str(settings.directory), str(settings.master_key_file)]
    procs = [
        subprocess.Popen([sys.executable, "-c", _WRITER, *args, f"p{i}"], cwd=root, stderr=subprocess.PIPE)
        for i in range(4)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()[-2000:]
    history = FileBackend("main", settings).history("shared")
    assert [h.version for h in history][-1] == "20"
    assert len(history) == 20  # 4 processes x 5 writes: none lost, none doubled
    assert sorted(h.request_id or "" for h in history) == sorted(f"p{i}-{n}" for i in range(4) for n in range(5))


def test_observe_remembers_an_unchanged_version_and_sees_any_rewrite(
    settings: FileBackendSettings, backend: FileBackend
) -> None:
    """The drift check observes every secret every few minutes: an unchanged version file is
    not decrypted again, yet a rewrite is seen even when its mtime is put back (the ctime moves)."""
    ring = fernet_ring()
    v1 = backend.write(PATH, ring, expected=None, request_id="r1")
    first = backend.observe(PATH)
    assert first is not None and first.digest == digest(ring) and first.unreadable is None
    assert backend.observe(PATH) is first  # remembered, not decrypted again
    blob = secret_dir(settings) / "v00000001.enc"
    before = blob.stat()
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0x01
    blob.write_bytes(bytes(data))
    os.utime(blob, ns=(before.st_atime_ns, before.st_mtime_ns))  # hide the write from the mtime
    tampered = backend.observe(PATH)
    assert tampered is not None and tampered.unreadable == "invalid" and tampered.version == v1
    blob.write_bytes(bytes(data[:-1]) + bytes([data[-1] ^ 0x01]))  # put the original bytes back
    restored = backend.observe(PATH)
    assert restored is not None and restored.digest == first.digest and restored is not first
