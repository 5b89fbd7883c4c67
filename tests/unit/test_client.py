"""``rotatord.client``: Keyring, TokenSet and SigningSecrets over a real file backend.

Documents are written with ``FileBackend.write`` and built with the engine's transitions, as the
daemon writes them; the bot side reads them through ``FileReader``.  Time is a parameter: a fake
monotonic clock for the cache, a settable wall clock for expiry.  Secret values are compared
through digests or booleans, so a failing assertion prints no key material.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import pytest
from cryptography.fernet import Fernet

from rotatord import client
from rotatord.backends.file import FileBackend, init_master_key
from rotatord.client import (
    BackendError,
    DecryptError,
    DocumentInvalid,
    FileReader,
    Keyring,
    SigningSecrets,
    TokenCheck,
    TokenSet,
)
from rotatord.config.model import FileBackendSettings
from rotatord.crypto.generators import ApiTokenGenerator, FernetGenerator, WebhookSecretGenerator
from rotatord.crypto.keyring import KeyIdentifier
from rotatord.crypto.tokens import make_token
from rotatord.document import Credential, CredentialSet, Document, FernetRing, sha256_hex
from rotatord.engine.transitions import (
    issue_credential,
    promote_ring,
    retire_ring,
    revoke_credential,
    stage_ring,
)
from rotatord.errors import ConfigError, NotManaged
from rotatord.sensitive import Sensitive
from tests.helpers import assert_no_material, materials

PATH = "bots/support-bot/db-key"
T0 = datetime(2025, 3, 3, 3, 0, tzinfo=UTC)
TTL = 60.0
D = TypeVar("D", FernetRing, CredentialSet)


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class WallClock:
    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


class CountingReader:
    """A real FileReader, counted; while ``gate`` is clear, reads wait for it (a slow backend)."""

    def __init__(self, inner: FileReader) -> None:
        self.inner = inner
        self.reads = 0
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.gate.set()
        self._lock = threading.Lock()

    def read(self) -> Document:
        with self._lock:
            self.reads += 1
        self.entered.set()
        assert self.gate.wait(10), "the test never opened the gate"
        return self.inner.read()


@dataclass
class Store:
    """The daemon's side: a FileBackend writing documents, plus readers for bots."""

    settings: FileBackendSettings
    backend: FileBackend

    def publish(self, doc: D, path: str = PATH) -> D:
        current = self.backend.read(path)
        expected = None if current is None else current.version
        self.backend.write(path, doc, expected=expected, request_id=str(uuid.uuid4()))
        return doc

    def reader(self, path: str = PATH) -> CountingReader:
        assert self.settings.master_key_file is not None
        return CountingReader(FileReader(self.settings.directory, path, master_key_file=self.settings.master_key_file))

    def pointer(self, path: str = PATH) -> Path:
        return self.settings.directory.joinpath(*path.split("/"), "current")


@pytest.fixture
def store(tmp_path: Path) -> Store:
    settings = FileBackendSettings(
        kind="file", directory=tmp_path / "store", master_key_file=tmp_path / "keys" / "master.key"
    )
    assert init_master_key(settings)
    return Store(settings, FileBackend("daemon", settings))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


fernet_key = FernetGenerator().generate


def ring_v1(store: Store) -> FernetRing:
    ring = stage_ring(None, "support-bot-db", 1, fernet_key, T0)
    assert ring is not None
    store.publish(ring)
    return ring


def staged(ring: FernetRing, version: int, at: datetime) -> FernetRing:
    out = stage_ring(ring, ring.name, version, fernet_key, at)
    assert out is not None
    return out


def promoted(ring: FernetRing, version: int, at: datetime) -> FernetRing:
    out = promote_ring(ring, version, at, at + timedelta(days=7))
    assert out is not None
    return out


# -- Keyring ---------------------------------------------------------------------------------------


def test_keyring_follows_a_rotation_without_restart(store: Store, clock: FakeClock) -> None:
    ring = ring_v1(store)
    keyring = Keyring(store.reader(), ttl=TTL, clock=clock)
    old = keyring.encrypt(b"written under v1")
    assert (keyring.primary_id, keyring.key_ids, keyring.version) == ("v1", ("v1",), 1)

    ring = store.publish(staged(ring, 2, T0 + timedelta(days=30)))
    clock.advance(TTL)
    # Staged: the new key decrypts, the old primary still encrypts (decrypt before encrypt).
    assert (keyring.primary_id, keyring.key_ids, keyring.version) == ("v1", ("v1", "v2"), 2)
    assert KeyIdentifier(ring)(keyring.encrypt(b"x")) == "v1"

    ring = store.publish(promoted(ring, 2, T0 + timedelta(days=30, minutes=10)))
    clock.advance(TTL)
    assert (keyring.primary_id, keyring.key_ids) == ("v2", ("v2", "v1"))
    new = keyring.encrypt(b"written under v2")
    assert KeyIdentifier(ring)(new) == "v2"
    assert keyring.decrypt(old) == b"written under v1"
    assert keyring.decrypt(new.decode()) == b"written under v2"
    # The daemon re-encrypts stored data under the new primary before retiring the old key.
    moved = keyring.fernet.rotate(old)

    retired = retire_ring(ring, {"v1"}, T0 + timedelta(days=38))
    assert retired is not None
    store.publish(retired)
    clock.advance(TTL)
    assert keyring.key_ids == ("v2",)
    assert keyring.decrypt(moved) == b"written under v1"
    assert keyring.decrypt(new) == b"written under v2"
    with pytest.raises(DecryptError):
        keyring.decrypt(old)


def test_keyring_caches_for_ttl_and_refresh_forces_a_read(store: Store, clock: FakeClock) -> None:
    ring = ring_v1(store)
    reader = store.reader()
    keyring = Keyring(reader, ttl=TTL, clock=clock)
    assert reader.reads == 0  # nothing is read before first use
    assert keyring.primary_id == "v1"
    ring = store.publish(staged(ring, 2, T0))
    for _ in range(5):
        clock.advance(TTL / 5 - 1)
        assert keyring.key_ids == ("v1",)
    assert reader.reads == 1
    clock.advance(5)
    assert keyring.key_ids == ("v1", "v2")
    assert reader.reads == 2

    store.publish(promoted(ring, 2, T0))
    assert keyring.primary_id == "v1"  # still cached
    assert keyring.refresh() == 2
    assert keyring.primary_id == "v2"
    assert reader.reads == 3


def test_a_token_under_a_key_staged_after_our_read_triggers_one_rate_limited_reread(
    store: Store, clock: FakeClock
) -> None:
    ring = ring_v1(store)
    reader = store.reader()
    keyring = Keyring(reader, ttl=TTL, clock=clock, min_interval=5)
    assert keyring.primary_id == "v1"
    # Another bot instance, already on the promoted ring, writes a token under v2.
    ring = store.publish(promoted(store.publish(staged(ring, 2, T0)), 2, T0))
    token = Fernet(ring.primary_key.material.reveal().encode()).encrypt(b"from the other bot")

    clock.advance(1)  # our ring is fresh: a miss does not re-read
    with pytest.raises(DecryptError):
        keyring.decrypt(token)
    assert reader.reads == 1
    clock.advance(5)
    assert keyring.decrypt(token) == b"from the other bot"
    assert reader.reads == 2
    # Garbage cannot turn into a stream of backend reads.
    for _ in range(10):
        with pytest.raises(DecryptError):
            keyring.decrypt(b"gAAAAA-not-a-token")
    assert reader.reads == 2
    clock.advance(6)
    for _ in range(10):
        with pytest.raises(DecryptError):
            keyring.decrypt("gAAAAA-still-not-a-token")
    assert reader.reads == 3


def test_a_failed_reread_keeps_the_cached_ring(
    store: Store, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    ring = ring_v1(store)
    reader = store.reader()
    keyring = Keyring(reader, ttl=TTL, clock=clock, min_interval=5)
    token = keyring.encrypt(b"kept")
    good_pointer = store.pointer().read_bytes()
    store.pointer().write_bytes(b"garbage\n")  # the backend now fails every read

    clock.advance(TTL)
    with caplog.at_level(logging.WARNING, logger="rotatord.client"):
        assert keyring.decrypt(token) == b"kept"
    assert reader.reads == 2
    warnings = [r.getMessage() for r in caplog.records if r.name == "rotatord.client"]
    assert len(warnings) == 1 and "'support-bot-db'" in warnings[0] and "version 1" in warnings[0]
    assert_no_material(materials(ring), texts=[caplog.text])

    clock.advance(1)  # failed reads are retried no sooner than min_interval
    assert keyring.decrypt(token) == b"kept"
    assert reader.reads == 2
    with pytest.raises(NotManaged):  # an explicit refresh says it failed...
        keyring.refresh()
    assert keyring.decrypt(token) == b"kept"  # ...and the ring stays in use
    assert reader.reads == 3

    store.pointer().write_bytes(good_pointer)
    store.publish(staged(ring, 2, T0))
    clock.advance(5)
    assert keyring.key_ids == ("v1", "v2")
    assert reader.reads == 4


def test_the_first_read_failing_raises_and_is_not_remembered(store: Store, clock: FakeClock) -> None:
    keyring = Keyring(store.reader(), ttl=TTL, clock=clock)
    with pytest.raises(BackendError, match="nothing published"):
        keyring.encrypt(b"x")
    ring_v1(store)
    assert keyring.primary_id == "v1"


def test_views_refuse_a_document_of_another_kind(store: Store, clock: FakeClock) -> None:
    ring_v1(store)
    tokens = issue_credential(
        None,
        name="bot-api",
        kind="api_token",
        version=1,
        generate=ApiTokenGenerator().generate,
        now=T0,
        valid_until=T0,
        ttl=None,
    )
    assert tokens is not None
    store.publish(tokens, "bots/api")
    with pytest.raises(DocumentInvalid, match="api_token document, not a fernet key ring"):
        Keyring(store.reader("bots/api"), clock=clock).primary_id  # noqa: B018
    with pytest.raises(DocumentInvalid, match="fernet document, not api_token"):
        TokenSet(store.reader(), clock=clock).verify("rtd_x")
    with pytest.raises(DocumentInvalid, match="api_token document, not webhook_secret"):
        SigningSecrets(store.reader("bots/api"), clock=clock).secrets()


def test_decrypt_errors_say_nothing(store: Store, clock: FakeClock) -> None:
    ring = ring_v1(store)
    keyring = Keyring(store.reader(), clock=clock)
    token = keyring.encrypt(b"payload")
    tampered = token[:-4] + (b"AAAA" if not token.endswith(b"AAAA") else b"BBBB")
    errors = []
    for bad in (tampered, b"", b"%%%", "caf\u00e9"):
        with pytest.raises(DecryptError) as info:
            keyring.decrypt(bad)
        errors.append(info.value)
    with pytest.raises(DecryptError):
        keyring.decrypt_at_time(token, ttl=60, now=datetime.now(UTC) + timedelta(hours=1))
    assert keyring.decrypt_at_time(token, ttl=60, now=datetime.now(UTC)) == b"payload"
    assert {str(e) for e in errors} == {"cannot decrypt"}
    assert all(e.__cause__ is None and e.__context__ is None for e in errors)
    with pytest.raises(TypeError):
        keyring.encrypt("text")  # type: ignore[arg-type]
    assert_no_material(materials(ring), texts=[repr(keyring), repr(keyring.fernet), repr(store.reader().inner)])


def test_twenty_threads_decrypt_during_refreshes(store: Store, clock: FakeClock) -> None:
    ring = ring_v1(store)
    reader = store.reader()
    keyring = Keyring(reader, ttl=TTL, clock=clock)
    tokens = {keyring.encrypt(f"record {i}".encode()): f"record {i}".encode() for i in range(5)}
    stop = threading.Event()
    failures: list[BaseException] = []
    done = [0]
    done_lock = threading.Lock()

    def bot() -> None:
        try:
            while not stop.is_set():
                for token, plain in tokens.items():
                    if keyring.decrypt(token) != plain:
                        raise AssertionError("wrong plaintext")
                with done_lock:
                    done[0] += 1
                time.sleep(0.001)  # let the publishing thread in: 20 busy loops would starve it
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=bot) for _ in range(20)]
    for t in threads:
        t.start()
    # Rotate four times while the bots decrypt; v1 stays in the ring (its data was not moved).
    for version in range(2, 6):
        ring = store.publish(staged(ring, version, T0 + timedelta(days=version)))
        assert keyring.refresh() == version
        ring = store.publish(promoted(ring, version, T0 + timedelta(days=version)))
        clock.advance(TTL)
        assert keyring.primary_id == f"v{version}"
    stop.set()
    for t in threads:
        t.join(30)
    assert not failures, [type(f).__name__ for f in failures]
    assert done[0] >= 20
    assert keyring.key_ids == ("v5", "v4", "v3", "v2", "v1")
    assert reader.reads == 9


def test_callers_do_not_wait_for_a_reread_in_progress(store: Store, clock: FakeClock) -> None:
    ring_v1(store)
    reader = store.reader()
    keyring = Keyring(reader, ttl=TTL, clock=clock)
    token = keyring.encrypt(b"payload")
    clock.advance(TTL)
    reader.gate.clear()
    reader.entered.clear()
    results: list[bytes] = []
    threads = [threading.Thread(target=lambda: results.append(keyring.decrypt(token))) for _ in range(20)]
    for t in threads:
        t.start()
    assert reader.entered.wait(10)
    # One thread is stuck in the backend; the other 19 finish with the cached ring meanwhile.
    for t in threads:
        t.join(0.5)
    blocked = [t for t in threads if t.is_alive()]
    assert len(blocked) == 1 and len(results) == 19
    reader.gate.set()
    blocked[0].join(10)
    assert results == [b"payload"] * 20
    assert reader.reads == 2


def test_concurrent_first_use_reads_once(store: Store, clock: FakeClock) -> None:
    ring_v1(store)
    reader = store.reader()
    keyring = Keyring(reader, ttl=TTL, clock=clock)
    reader.gate.clear()
    ids: list[str] = []
    threads = [threading.Thread(target=lambda: ids.append(keyring.primary_id)) for _ in range(20)]
    for t in threads:
        t.start()
    assert reader.entered.wait(10)
    reader.gate.set()
    for t in threads:
        t.join(10)
    assert ids == ["v1"] * 20
    assert reader.reads == 1


def test_bad_arguments_are_refused(store: Store) -> None:
    with pytest.raises(ValueError, match="ttl"):
        Keyring(store.reader(), ttl=-1)
    with pytest.raises(ValueError, match="min_interval"):
        TokenSet(store.reader(), min_interval=float("nan"))
    with pytest.raises(ConfigError, match="exactly one"):
        FileReader(store.settings.directory, PATH)
    with pytest.raises(ConfigError, match=r"segment '\.\.'"):
        FileReader(store.settings.directory, "bots/../etc", master_key_file="/k")
    with pytest.raises(ConfigError, match="master_key_credential"):
        FileReader(store.settings.directory, PATH, master_key_credential="no/slashes")


def test_file_reader_with_another_master_key_cannot_read(store: Store, tmp_path: Path) -> None:
    ring_v1(store)
    other = FileBackendSettings(kind="file", directory=tmp_path / "other", master_key_file=tmp_path / "other.key")
    assert init_master_key(other)
    assert other.master_key_file is not None
    reader = FileReader(store.settings.directory, PATH, master_key_file=other.master_key_file)
    with pytest.raises(DocumentInvalid, match="cannot be decrypted with the configured master key"):
        reader.read()
    assert repr(reader) == f"FileReader(directory={str(store.settings.directory)!r}, path={PATH!r})"


# -- TokenSet and SigningSecrets -------------------------------------------------------------------


def issue(
    store: Store,
    cs: CredentialSet | None,
    version: int,
    at: datetime,
    *,
    kind: str = "api_token",
    grace: timedelta = timedelta(days=7),
    ttl: timedelta | None = None,
    path: str = "bots/api",
) -> CredentialSet:
    generate = ApiTokenGenerator().generate if kind == "api_token" else WebhookSecretGenerator().generate
    out = issue_credential(
        cs,
        name=f"bot-{kind}",
        kind=kind,  # type: ignore[arg-type]
        version=version,
        generate=generate,
        now=at,
        valid_until=at + grace,
        ttl=ttl,
    )
    assert out is not None
    store.publish(out, path)
    return out


def status(tokens: TokenSet, credential: Credential | Sensitive) -> TokenCheck:
    """Verify a credential's token.  Taking the Credential (masked repr) rather than its text
    keeps the token out of pytest's assertion report."""
    value = credential if isinstance(credential, Sensitive) else credential.value
    return tokens.verify(value.reveal())


def test_token_statuses(store: Store, clock: FakeClock) -> None:
    wall = WallClock()
    v1 = issue(store, None, 1, T0)
    tokens = TokenSet(store.reader("bots/api"), ttl=TTL, clock=clock, now=wall)
    first, valid = v1.current, tokens.is_valid(v1.current.value.reveal())
    assert status(tokens, first) is TokenCheck.VALID and valid

    v2 = issue(store, v1, 2, T0 + timedelta(days=1))  # v1 stays valid as previous for 7 days
    second = v2.current
    clock.advance(TTL)
    wall.now = T0 + timedelta(days=2)
    assert status(tokens, second) is TokenCheck.VALID
    assert status(tokens, first) is TokenCheck.VALID  # previous, within its grace
    wall.now = T0 + timedelta(days=8)
    assert status(tokens, first) is TokenCheck.REVOKED  # previous, past its valid_until
    valid = tokens.is_valid(first.value.reveal())
    assert not valid
    assert status(tokens, second) is TokenCheck.VALID

    revoked = revoke_credential(v2, T0 + timedelta(days=8))
    assert revoked is not None
    store.publish(revoked, "bots/api")
    clock.advance(TTL)
    wall.now = T0 + timedelta(days=2)  # even within the old grace: the revoked list wins
    assert status(tokens, first) is TokenCheck.REVOKED
    assert status(tokens, make_token("rtd")) is TokenCheck.UNKNOWN
    assert status(tokens, Sensitive("")) is TokenCheck.UNKNOWN

    v3 = issue(store, revoked, 3, T0 + timedelta(days=9), ttl=timedelta(days=30))
    third = v3.current
    clock.advance(TTL)
    wall.now = T0 + timedelta(days=10)
    assert status(tokens, third) is TokenCheck.VALID
    assert status(tokens, second) is TokenCheck.VALID  # previous again, within its new grace
    wall.now = T0 + timedelta(days=39)
    assert status(tokens, third) is TokenCheck.EXPIRED  # current, past its expires_at
    assert status(tokens, second) is TokenCheck.REVOKED
    assert not TokenCheck.EXPIRED and not TokenCheck.REVOKED and not TokenCheck.UNKNOWN and TokenCheck.VALID


def test_a_previous_token_past_its_own_expiry_is_expired(store: Store, clock: FakeClock) -> None:
    wall = WallClock()
    v1 = issue(store, None, 1, T0, ttl=timedelta(days=1))
    v2 = issue(store, v1, 2, T0 + timedelta(hours=12), ttl=timedelta(days=1))
    tokens = TokenSet(store.reader("bots/api"), clock=clock, now=wall)
    wall.now = T0 + timedelta(hours=23)
    assert status(tokens, v1.current) is TokenCheck.VALID
    wall.now = T0 + timedelta(days=2)  # within the previous token's 7-day grace, past its ttl
    assert status(tokens, v1.current) is TokenCheck.EXPIRED
    assert status(tokens, v2.current) is TokenCheck.EXPIRED


def test_an_unknown_token_rereads_once_rate_limited(
    store: Store, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    v1 = issue(store, None, 1, T0)
    reader = store.reader("bots/api")
    tokens = TokenSet(reader, ttl=TTL, clock=clock, now=WallClock(), min_interval=5)
    assert status(tokens, v1.current) is TokenCheck.VALID
    v2 = issue(store, v1, 2, T0)
    with caplog.at_level(logging.DEBUG):
        assert status(tokens, v2.current) is TokenCheck.UNKNOWN  # our copy is too fresh to re-read
        clock.advance(5)
        assert status(tokens, v2.current) is TokenCheck.VALID
        assert reader.reads == 2
        for _ in range(20):
            assert status(tokens, make_token("rtd")) is TokenCheck.UNKNOWN
        assert reader.reads == 2
    with pytest.raises(TypeError) as info:
        tokens.verify(v2.current.value.reveal().encode())  # type: ignore[arg-type]
    assert_no_material(materials(v2), texts=[caplog.text, str(info.value), repr(tokens)])


def test_signing_secrets_follow_dual_signing(store: Store, clock: FakeClock) -> None:
    wall = WallClock()
    path = "bots/hooks"
    v1 = issue(store, None, 1, T0, kind="webhook_secret", path=path)
    secrets = SigningSecrets(store.reader(path), ttl=TTL, clock=clock, now=wall)

    def digests() -> list[str]:
        return [sha256_hex(s) for s in secrets.secrets()]

    assert digests() == [v1.current.sha256]
    v2 = issue(store, v1, 2, T0 + timedelta(days=1), kind="webhook_secret", path=path, grace=timedelta(hours=1))
    clock.advance(TTL)
    wall.now = T0 + timedelta(days=1, minutes=30)
    assert digests() == [v2.current.sha256, v1.current.sha256]
    assert all(s.startswith("whsec_") for s in secrets.secrets())
    wall.now = T0 + timedelta(days=1, hours=1)
    assert digests() == [v2.current.sha256]
    assert secrets.version == 2


# -- the public surface ------------------------------------------------------------------------------


def test_public_names_are_pinned() -> None:
    assert client.__all__ == [
        "AwsReader",
        "BackendError",
        "DecryptError",
        "DocumentInvalid",
        "DocumentReader",
        "FileReader",
        "Keyring",
        "RevokedUse",
        "RevokedUseReporter",
        "SigningSecrets",
        "TokenCheck",
        "TokenSet",
        "VaultReader",
        "WebhookEvent",
        "WebhookHandler",
        "WebhookVerificationError",
        "verify_webhook",
    ]
    assert set(client.__all__) <= set(dir(client))
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        client.Nope  # noqa: B018


FORBIDDEN = [
    "apscheduler",
    "sqlalchemy",
    "hvac",
    "boto3",
    "botocore",
    "pydantic",
    "pydantic_settings",
    "rotatord.daemon",
    "rotatord.engine",
    "rotatord.cli",
    "rotatord.backends",
    "rotatord.config",
    "rotatord.client.vault",
    "rotatord.client.aws",
]


def _imported_after(code: str) -> set[str]:
    script = f"import json, sys\n{code}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    return set(json.loads(out.stdout.splitlines()[-1]))


def _loaded(modules: set[str], names: list[str]) -> list[str]:
    return [n for n in names if any(m == n or m.startswith(n + ".") for m in modules)]


def test_importing_the_client_loads_no_daemon_scheduler_store_or_sdk() -> None:
    modules = _imported_after("import rotatord.client")
    assert "rotatord.client" in modules and "cryptography.fernet" in modules
    assert _loaded(modules, FORBIDDEN) == []


def test_reading_a_file_backend_loads_pydantic_but_not_the_daemon(store: Store) -> None:
    ring_v1(store)
    code = (
        "from rotatord.client import FileReader, Keyring\n"
        f"ring = Keyring(FileReader({str(store.settings.directory)!r}, {PATH!r}, "
        f"master_key_file={str(store.settings.master_key_file)!r}))\n"
        "assert ring.primary_id == 'v1'"
    )
    modules = _imported_after(code)
    assert "pydantic" in modules and "rotatord.backends.file" in modules
    assert _loaded(modules, [m for m in FORBIDDEN if not m.startswith(("pydantic", "rotatord"))]) == []
    assert _loaded(modules, ["rotatord.daemon", "rotatord.engine", "rotatord.cli", "rotatord.client.vault"]) == []


@pytest.mark.parametrize(("name", "module", "sdk"), [("VaultReader", "vault", "hvac"), ("AwsReader", "aws", "boto3")])
def test_sdk_readers_load_on_first_access(name: str, module: str, sdk: str) -> None:
    code = (
        "import rotatord.client as c\n"
        f"assert 'rotatord.client.{module}' not in sys.modules\n"
        f"reader = c.{name}\n"
        f"assert reader.__module__ == 'rotatord.client.{module}' and c.{name} is reader"
    )
    modules = _imported_after(code)
    assert f"rotatord.client.{module}" in modules
    other_sdk = {"hvac": "boto3", "boto3": "hvac"}[sdk]
    assert _loaded(modules, [other_sdk, "rotatord.daemon", "rotatord.engine", "apscheduler", "sqlalchemy"]) == []
