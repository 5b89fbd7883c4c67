"""The vault backend against a real OpenBao dev server: CAS, metadata, bad input, outages, auth.

Each test gets a fresh KV version 2 mount on the session's server, so nothing leaks between them.
Tokens and AppRole credentials used here must never show in an exception message or a log line.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hvac.exceptions
import pytest

from rotatord.backends.vault import VaultBackend
from rotatord.client.vault import VaultReader
from rotatord.config.model import VaultBackendSettings
from rotatord.document import digest, to_dict
from rotatord.errors import (
    BackendError,
    BackendUnavailable,
    ConfigError,
    ConflictError,
    DocumentInvalid,
    NotManaged,
    PermissionDenied,
)
from tests.contract.conftest import fernet_ring
from tests.servers import free_port
from tests.servers.openbao import OpenBao

PREFIX = "rotatord"
PATH = "bots/bot/db-key"
FULL = f"{PREFIX}/{PATH}"
# What an OpenBao service token looks like, to scan logs and messages for any token at all.
TOKEN_RE = re.compile(r"\b[sb]\.[A-Za-z0-9]{20,}")

BackendMaker = Callable[..., VaultBackend]


@pytest.fixture
def mount(openbao: OpenBao) -> Iterator[str]:
    path = openbao.new_kv_mount("unit")
    yield path
    openbao.drop_mount(path)


@pytest.fixture
def make_backend(openbao: OpenBao, mount: str, tmp_path: Path) -> Iterator[BackendMaker]:
    """``make_backend(**settings)``: a VaultBackend on the test's mount, root token by default."""
    made: list[VaultBackend] = []

    def make(**overrides: Any) -> VaultBackend:
        values: dict[str, Any] = {
            "kind": "vault",
            "address": openbao.address,
            "mount": mount,
            "path_prefix": PREFIX,
            "transient_retries": 1,
        }
        if "auth" not in overrides and "token_file" not in overrides:
            values["token_file"] = openbao.token_file(tmp_path / f"token-{len(made)}")
        values.update(overrides)
        backend = VaultBackend("vault", VaultBackendSettings(**values))
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()


def scan(texts: list[str], secrets: list[str]) -> None:
    for text in texts:
        assert not TOKEN_RE.search(text), "a token reached a message or a log line"
        for secret in secrets:
            assert secret not in text, "a credential reached a message or a log line"


# -- check-and-set ------------------------------------------------------------------------------


def test_two_writers_with_the_same_expected_version_one_wins_the_other_retries(make_backend: BackendMaker) -> None:
    a, b = make_backend(), make_backend()
    base = a.write(PATH, fernet_ring(version=1), expected=None, request_id="base")
    barrier = threading.Barrier(2)
    outcome: dict[str, str | Exception] = {}

    def attempt(name: str, backend: VaultBackend) -> None:
        barrier.wait()
        try:
            outcome[name] = backend.write(PATH, fernet_ring(version=2), expected=base, request_id=name)
        except Exception as exc:  # collected, asserted below
            outcome[name] = exc

    threads = [threading.Thread(target=attempt, args=(n, be)) for n, be in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    winners = {n: v for n, v in outcome.items() if isinstance(v, str)}
    losers = {n: e for n, e in outcome.items() if isinstance(e, ConflictError)}
    assert len(winners) == 1 and len(losers) == 1, outcome
    (winner, version), (loser, _error) = next(iter(winners.items())), next(iter(losers.items()))
    assert version == "2"
    backend = a if loser == "a" else b
    seen = backend.read(PATH)
    assert seen is not None and (seen.version, seen.request_id) == ("2", winner)
    assert backend.write(PATH, fernet_ring(version=3), expected=seen.version, request_id=loser) == "3"
    assert [(h.version, h.request_id, h.current) for h in a.history(PATH)] == [
        ("1", "base", False), ("2", winner, False), ("3", loser, True),
    ]  # fmt: skip


def test_managed_metadata_is_set_without_resetting_other_metadata(openbao: OpenBao, mount: str,
                                                                  make_backend: BackendMaker) -> None:  # fmt: skip
    root = openbao.client()
    # An operator's own settings on the path, made before rotatord ever wrote there.
    root.secrets.kv.v2.update_metadata(
        FULL, delete_version_after="1h", custom_metadata={"team": "support"}, mount_point=mount
    )
    backend = make_backend(max_versions=3)
    assert backend.read(PATH) is None  # metadata without any version is still "absent"
    expected = None
    for n in range(1, 6):
        expected = backend.write(PATH, fernet_ring(version=n), expected=expected, request_id=f"r{n}")
    meta = root.secrets.kv.v2.read_secret_metadata(FULL, mount_point=mount)["data"]
    assert meta["cas_required"] is True
    assert meta["max_versions"] == 3
    assert meta["delete_version_after"] == "1h0m0s"
    assert meta["custom_metadata"] == {"team": "support", "managed-by": "rotatord"}
    assert [h.version for h in backend.history(PATH)] == ["3", "4", "5"]  # pruned by the server
    # cas_required now refuses any writer that does not check-and-set.
    with pytest.raises(hvac.exceptions.InvalidRequest, match="check-and-set parameter required"):
        root.secrets.kv.v2.create_or_update_secret(FULL, secret={"document": "x"}, mount_point=mount)
    got = backend.read(PATH)
    assert got is not None and (got.version, got.request_id) == ("5", "r5")


def test_fresh_path_gets_the_default_metadata_plus_rotatords(openbao: OpenBao, mount: str,
                                                             make_backend: BackendMaker) -> None:  # fmt: skip
    make_backend().write(PATH, fernet_ring(), expected=None, request_id="r1")
    meta = openbao.client().secrets.kv.v2.read_secret_metadata(FULL, mount_point=mount)["data"]
    assert (meta["cas_required"], meta["max_versions"], meta["delete_version_after"]) == (True, 20, "0s")
    assert meta["custom_metadata"] == {"managed-by": "rotatord"}


def test_repeated_request_id_after_a_crash_returns_the_version_and_marks_the_path(
    openbao: OpenBao, mount: str, make_backend: BackendMaker
) -> None:
    backend = make_backend()
    doc = fernet_ring()
    # The first attempt wrote the document, then the process died before it set the metadata.
    root = openbao.client()
    root.secrets.kv.v2.create_or_update_secret(
        FULL, secret={"document": json.dumps(to_dict(doc)), "request_id": "stage-1"}, cas=0, mount_point=mount
    )
    assert backend.write(PATH, doc, expected=None, request_id="stage-1") == "1"
    meta = root.secrets.kv.v2.read_secret_metadata(FULL, mount_point=mount)["data"]
    assert (meta["current_version"], meta["cas_required"]) == (1, True)


# -- bad input: nothing written -------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [{"password": "hunter2-not-ours"}, {"document": "hunter2-not-json"}, {"document": '{"hunter2": "not-ours"}'}],
    ids=["no-document", "not-json", "not-rotatord"],
)
def test_someone_elses_data_is_not_managed_and_never_overwritten(
    openbao: OpenBao, mount: str, make_backend: BackendMaker, data: dict[str, str]
) -> None:
    root = openbao.client()
    root.secrets.kv.v2.create_or_update_secret(FULL, secret=data, mount_point=mount)
    backend = make_backend()
    with pytest.raises(NotManaged) as read_error:
        backend.read(PATH)
    for expected in (None, "1"):
        with pytest.raises(NotManaged) as write_error:
            backend.write(PATH, fernet_ring(), expected=expected, request_id="r1")
    for error in (read_error.value, write_error.value):
        assert f"{mount}/data/{FULL}" in str(error)
        assert "hunter2" not in str(error)
    meta = root.secrets.kv.v2.read_secret_metadata(FULL, mount_point=mount)["data"]
    assert (meta["current_version"], meta["cas_required"], meta["custom_metadata"]) == (1, False, None)
    stored = root.secrets.kv.v2.read_secret_version(FULL, mount_point=mount, raise_on_deleted_version=True)
    assert stored["data"]["data"] == data


def test_a_future_schema_is_document_invalid_and_never_overwritten(
    openbao: OpenBao, mount: str, make_backend: BackendMaker
) -> None:
    future = to_dict(fernet_ring())
    future["schema"] = "rotatord/v9"
    root = openbao.client()
    root.secrets.kv.v2.create_or_update_secret(
        FULL, secret={"document": json.dumps(future), "request_id": "x"}, mount_point=mount
    )
    backend = make_backend()
    with pytest.raises(DocumentInvalid, match="rotatord/v9"):
        backend.read(PATH)
    with pytest.raises(DocumentInvalid):
        backend.write(PATH, fernet_ring(version=2), expected="1", request_id="r2")
    assert root.secrets.kv.v2.read_secret_metadata(FULL, mount_point=mount)["data"]["current_version"] == 1


def test_a_deleted_current_version_is_not_mistaken_for_an_absent_secret(
    openbao: OpenBao, mount: str, make_backend: BackendMaker
) -> None:
    backend = make_backend()
    backend.write(PATH, fernet_ring(), expected=None, request_id="r1")
    openbao.client().secrets.kv.v2.delete_latest_version_of_secret(FULL, mount_point=mount)
    with pytest.raises(BackendError, match="current version 1 is deleted"):
        backend.read(PATH)
    with pytest.raises(BackendError, match="deleted"):
        backend.write(PATH, fernet_ring(), expected=None, request_id="r2")


def test_wrong_token_is_permission_denied_and_never_quoted(
    make_backend: BackendMaker, openbao: OpenBao, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "s.ThisTokenDoesNotExist0123456789"
    backend = make_backend(token_file=openbao.token_file(tmp_path / "wrong", wrong))
    errors = []
    for call in (backend.check, lambda: backend.read(PATH)):
        with pytest.raises(PermissionDenied) as info:
            call()
        errors.append(str(info.value))
    assert "token was refused" in errors[0]
    # A valid token whose policy does not cover the path: the message names the capability.
    root = openbao.client()
    root.sys.create_or_update_policy("elsewhere", 'path "nowhere/*" { capabilities = ["read"] }')
    narrow = root.auth.token.create(policies=["elsewhere"], ttl="10m")["auth"]["client_token"]
    limited = make_backend(token_file=openbao.token_file(tmp_path / "narrow", narrow))
    with pytest.raises(ConfigError, match="grants nothing under it"):
        limited.read(PATH)  # the mount preflight already says the policy reaches nothing there
    scan([*errors, caplog.text], [wrong, narrow])


def test_policy_without_write_is_permission_denied_naming_the_capability(
    make_backend: BackendMaker, openbao: OpenBao, mount: str, tmp_path: Path
) -> None:
    root = openbao.client()
    root.sys.create_or_update_policy(f"{mount}-ro", f'path "{mount}/data/*" {{ capabilities = ["read"] }}')
    token = root.auth.token.create(policies=[f"{mount}-ro"], ttl="10m")["auth"]["client_token"]
    backend = make_backend(token_file=openbao.token_file(tmp_path / "ro", token))
    assert backend.read(PATH) is None
    with pytest.raises(PermissionDenied) as info:
        backend.write(PATH, fernet_ring(), expected=None, request_id="r1")
    message = str(info.value)
    assert f"create/update on {mount}/data/{FULL}" in message
    assert token not in message


def test_wrong_mount_gives_a_clear_error_from_check_and_never_reads_as_absent(
    openbao: OpenBao, make_backend: BackendMaker
) -> None:
    missing = make_backend(mount="no-such-mount")
    with pytest.raises(ConfigError, match="'no-such-mount' does not exist"):
        missing.check()
    with pytest.raises(ConfigError):
        missing.read(PATH)
    v1 = f"kv1-{time.monotonic_ns()}"
    openbao.client().sys.enable_secrets_engine("kv", path=v1, options={"version": "1"})
    try:
        with pytest.raises(ConfigError, match="is KV version 1; rotatord needs a KV version 2"):
            make_backend(mount=v1).check()
    finally:
        openbao.drop_mount(v1)
    with pytest.raises(ConfigError, match="inside the mount 'secret'"):
        make_backend(mount="secret/sub").check()


# -- outages ----------------------------------------------------------------------------------------


def test_unreachable_address_is_unavailable_after_the_retries(
    make_backend: BackendMaker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="rotatord.backends.vault")
    backend = make_backend(address=f"http://127.0.0.1:{free_port()}", transient_retries=2, timeout="1s")
    started = time.monotonic()
    with pytest.raises(BackendUnavailable, match=r"connection failed .* gave up after 3 attempt") as info:
        backend.read(PATH)
    assert info.value.transient
    retries = [r for r in caplog.records if r.getMessage() == "vault request failed; retrying"]
    assert [r.attempt for r in retries] == [1, 2]  # type: ignore[attr-defined]
    assert time.monotonic() - started >= 0.1 + 0.2  # backoff: at least half of 0.2 s, then of 0.4 s


def test_sealed_server_is_unavailable_then_the_call_succeeds_after_unseal(
    openbao: OpenBao, make_backend: BackendMaker
) -> None:
    backend = make_backend()
    doc = fernet_ring()
    backend.write(PATH, doc, expected=None, request_id="r1")
    with openbao.sealed():
        with pytest.raises(BackendUnavailable, match="sealed"):
            backend.read(PATH)
        with pytest.raises(BackendUnavailable):
            backend.write(PATH, fernet_ring(version=2), expected="1", request_id="r2")
    got = backend.read(PATH)
    assert got is not None and (got.version, digest(got.document)) == ("1", digest(doc))
    assert backend.write(PATH, fernet_ring(version=2), expected="1", request_id="r2") == "2"


# -- AppRole ------------------------------------------------------------------------------------------


@pytest.fixture
def approle(openbao: OpenBao, mount: str, tmp_path: Path) -> Callable[..., tuple[dict[str, Any], list[str]]]:
    """``approle(**role)``: a role with a policy on the test's mount; returns backend settings
    and the credential values to scan for."""
    root = openbao.client()
    if "approle/" not in root.sys.list_auth_methods()["data"]:
        root.sys.enable_auth_method("approle")
    root.sys.create_or_update_policy(
        f"{mount}-rw",
        f'path "{mount}/data/*" {{ capabilities = ["create", "read", "update"] }}\n'
        f'path "{mount}/metadata/*" {{ capabilities = ["read", "update"] }}',
    )

    def make(**role: Any) -> tuple[dict[str, Any], list[str]]:
        name = f"role-{mount}"
        root.auth.approle.create_or_update_approle(name, token_policies=[f"{mount}-rw"], **role)
        role_id = root.auth.approle.read_role_id(name)["data"]["role_id"]
        secret_id = root.auth.approle.generate_secret_id(name)["data"]["secret_id"]
        settings = {
            "auth": "approle",
            "role_id_file": openbao.token_file(tmp_path / "role-id", role_id),
            "secret_id_file": openbao.token_file(tmp_path / "secret-id", secret_id),
        }
        return settings, [role_id, secret_id]

    return make


def role_tokens(openbao: OpenBao, mount: str) -> list[dict[str, Any]]:
    """Every live token issued to the test's role, looked up by accessor (no token ids exposed)."""
    root = openbao.client()
    out = []
    for accessor in root.auth.token.list_accessors()["data"]["keys"]:
        try:
            data = root.auth.token.lookup_accessor(accessor)["data"]
        except hvac.exceptions.VaultError:
            continue
        if (data.get("meta") or {}).get("role_name") == f"role-{mount}":
            out.append(data)
    return out


def test_approle_token_is_renewed_at_half_its_ttl(
    openbao: OpenBao, mount: str, approle: Callable[..., Any], make_backend: BackendMaker,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    caplog.set_level(logging.DEBUG)
    settings, credentials = approle(token_ttl="2s", token_max_ttl="1m")
    backend = make_backend(**settings)
    backend.check()
    backend.write(PATH, fernet_ring(), expected=None, request_id="r1")
    [token] = role_tokens(openbao, mount)
    assert token.get("last_renewal_time") is None
    for _ in range(2):
        time.sleep(1.1)  # past half the TTL: the next call renews first
        assert backend.read(PATH) is not None
    # 2.2 s after the login a 2 s token is alive only because it was renewed; no second login.
    [renewed] = role_tokens(openbao, mount)
    assert renewed["accessor"] == token["accessor"]
    assert renewed["last_renewal_time"] and renewed["ttl"] > 0
    scan([caplog.text], credentials)


def test_approle_token_near_its_max_ttl_is_replaced_before_it_lapses(
    openbao: OpenBao, mount: str, approle: Callable[..., Any], make_backend: BackendMaker,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    caplog.set_level(logging.INFO, logger="rotatord.backends.vault")
    settings, _credentials = approle(token_ttl="2s", token_max_ttl="3s")
    backend = make_backend(**settings)
    backend.write(PATH, fernet_ring(), expected=None, request_id="r1")
    [first] = role_tokens(openbao, mount)
    deadline = time.monotonic() + 4.0  # well past the first token's 3 s max TTL
    while time.monotonic() < deadline:
        time.sleep(0.4)
        assert backend.read(PATH) is not None
    accessors = {t["accessor"] for t in role_tokens(openbao, mount)} | {first["accessor"]}
    assert len(accessors) >= 2
    logins = [r for r in caplog.records if r.getMessage() == "logged in with AppRole"]
    assert len(logins) >= 2
    # Replaced ahead of time: no call was ever refused for an expired token.
    assert "authenticating again" not in caplog.text


def test_approle_logs_in_again_once_after_the_token_is_revoked(
    openbao: OpenBao, mount: str, approle: Callable[..., Any], make_backend: BackendMaker,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    caplog.set_level(logging.DEBUG)
    settings, credentials = approle(token_ttl="10m")
    backend = make_backend(**settings)
    backend.write(PATH, fernet_ring(), expected=None, request_id="r1")
    [first] = role_tokens(openbao, mount)
    openbao.client().auth.token.revoke_accessor(first["accessor"])
    got = backend.read(PATH)
    assert got is not None and got.version == "1"
    [second] = role_tokens(openbao, mount)
    assert second["accessor"] != first["accessor"]
    assert "permission denied; authenticating again" in caplog.text
    scan([caplog.text], credentials)


def test_approle_with_a_used_up_secret_id_fails_with_a_clear_message(
    openbao: OpenBao, mount: str, approle: Callable[..., Any], make_backend: BackendMaker,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    caplog.set_level(logging.DEBUG)
    settings, credentials = approle(token_ttl="10m", secret_id_num_uses=1)
    backend = make_backend(**settings)
    backend.write(PATH, fernet_ring(), expected=None, request_id="r1")
    [token] = role_tokens(openbao, mount)
    openbao.client().auth.token.revoke_accessor(token["accessor"])
    with pytest.raises(ConfigError, match="AppRole login at auth/approle/login was refused") as info:
        backend.read(PATH)
    scan([str(info.value), caplog.text], credentials)


# -- the client reader -----------------------------------------------------------------------------


def test_vault_reader_reads_the_document_by_token_file_token_or_environment(
    openbao: OpenBao, mount: str, make_backend: BackendMaker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = make_backend()
    first, second = fernet_ring(version=1), fernet_ring(version=2, keys=2)
    v1 = backend.write(PATH, first, expected=None, request_id="r1")
    backend.write(PATH, second, expected=v1, request_id="r2")
    monkeypatch.setenv("VAULT_TOKEN", openbao.root_token)
    readers = [
        VaultReader(openbao.address, FULL, mount=mount, token_file=openbao.token_file(tmp_path / "bot-token")),
        VaultReader(openbao.address, FULL, mount=mount, token=openbao.root_token),
        VaultReader(openbao.address, FULL, mount=mount),
    ]
    for reader in readers:
        with reader:
            assert digest(reader.read()) == digest(second)
            old = reader.read_versioned(1)
            assert (old.version, digest(old.document)) == ("1", digest(first))


def test_vault_reader_errors_are_rotatord_errors(openbao: OpenBao, mount: str, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    with pytest.raises(BackendError, match="nothing at"):
        VaultReader(openbao.address, "not/there", mount=mount, token=openbao.root_token).read()
    shared = openbao.token_file(tmp_path / "shared-token")
    shared.chmod(0o644)
    with pytest.raises(ConfigError, match="accessible by others"):
        VaultReader(openbao.address, FULL, mount=mount, token_file=shared).read()
    monkeypatch.delenv("VAULT_TOKEN", raising=False)
    with pytest.raises(ConfigError, match=r"\$VAULT_TOKEN"):
        VaultReader(openbao.address, FULL, mount=mount).read()
