"""The ``vault`` backend: HashiCorp Vault or OpenBao, KV version 2, through hvac.

Layout: one KV v2 secret per rotatord secret, at ``<mount>/data/<path_prefix>/<path>``, whose data is::

    {"document": "<canonical JSON of the secret document>", "request_id": "<the journal's idempotency key>"}

One read returns the whole key ring at one KV version, and that KV version number is the backend
version the journal records and webhooks name.  Every write is a check-and-set (``cas=0``
creates, ``cas=N`` replaces version N).  After writing, rotatord marks the path as its own:
``cas_required``, its ``max_versions`` and ``custom_metadata["managed-by"] = "rotatord"``,
passing back the ``delete_version_after`` and custom metadata it read, because hvac's
``update_metadata`` would otherwise reset ``delete_version_after`` to ``0s``.

This is the only module that imports hvac and requests, and their exceptions stop here::

    sealed (503), 500, 502, 429, connection refused, timeouts  BackendUnavailable, retried inside the call
    "permission denied" (403)                                  authenticate again once, then PermissionDenied
    check-and-set mismatch (400)                               ConflictError (the engine re-reads, re-validates)
    wrong mount, refused AppRole login, TLS failure            ConfigError
    anything else                                              BackendError

:class:`VaultKV` takes primitives, so bots use it through :mod:`rotatord.client.vault` without
pydantic: ``rotatord.config`` is imported for type checking only, and by :class:`VaultBackend`
lazily.  Tokens live in memory as :class:`~rotatord.sensitive.Sensitive` and never reach a
message.  The module is longer than most because it is the whole hvac edge, kept in one place.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import hvac
import hvac.exceptions as hx
import requests

from ..document import Document, digest, dump_document, parse_document
from ..errors import (
    BackendError,
    BackendUnavailable,
    ConfigError,
    ConflictError,
    DocumentInvalid,
    NotManaged,
    PermissionDenied,
)
from ..interfaces import Backend, Observed, Versioned, VersionInfo
from ..sensitive import Sensitive
from ..timeutil import parse_ts, utcnow

if TYPE_CHECKING:
    from pathlib import Path

    from ..config.model import VaultBackendSettings

__all__ = ["MANAGED_BY", "AppRoleAuth", "Backoff", "TokenAuth", "VaultBackend", "VaultKV"]

log = logging.getLogger(__name__)

#: ``custom_metadata`` entry rotatord puts on every path it owns.
MANAGED_BY = ("managed-by", "rotatord")
_CAS_MISMATCH = "check-and-set parameter did not match"
_TRANSIENT = (
    hx.VaultDown,
    hx.InternalServerError,
    hx.BadGateway,
    hx.RateLimitExceeded,
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
)
_T = TypeVar("_T")


@dataclass(frozen=True)
class Backoff:
    """Delays between attempts of one call: doubling from ``initial``, capped, jittered on the upper half."""

    initial: float = 0.2
    cap: float = 2.0

    def delay(self, attempt: int) -> float:
        base: float = min(self.initial * 2.0 ** max(attempt - 1, 0), self.cap)
        return base / 2 + random.random() * base / 2


@dataclass(frozen=True)
class TokenAuth:
    """Authenticate with a token.  ``load`` is called at first use and again after "permission
    denied", so a token file rewritten by Vault Agent is picked up without a restart."""

    load: Callable[[], str]

    @classmethod
    def fixed(cls, token: str) -> TokenAuth:
        return cls(Sensitive(token).reveal)


@dataclass(frozen=True)
class AppRoleAuth:
    """Log in with AppRole; each callable returns its credential (read at every login)."""

    role_id: Callable[[], str]
    secret_id: Callable[[], str]
    mount: str = "approle"


def _errors(exc: hx.VaultError) -> str:
    """The server's own error text (never a token), shortened for a message."""
    text = "; ".join(str(e).strip() for e in (exc.errors or []) if str(e).strip())
    return (text or f"HTTP error {type(exc).__name__}")[:300]


def _reason(exc: Exception) -> str:
    if isinstance(exc, hx.VaultDown):
        return f"the server is sealed or in standby ({_errors(exc)})"
    if isinstance(exc, hx.VaultError):
        return f"{type(exc).__name__} ({_errors(exc)})"
    if isinstance(exc, requests.exceptions.Timeout):
        return "the request timed out"
    return "connection failed (refused, reset or unresolvable)"


@dataclass
class _Refused:
    """The first "permission denied" of a call, kept while the call authenticates again."""

    generation: int
    error: PermissionDenied
    retried: bool = False


class VaultKV:
    """One KV version 2 mount of one Vault / OpenBao server, rotatord's documents on it.

    Thread-safe: requests run concurrently; logging in and renewing are serialised.  The token
    is renewed lazily, before a call made past half its TTL; an AppRole token whose renewal was
    capped by its max TTL is replaced by a fresh login instead.
    """

    def __init__(
        self,
        address: str,
        mount: str = "secret",
        *,
        auth: TokenAuth | AppRoleAuth,
        namespace: str | None = None,
        verify: bool | str = True,
        timeout: float = 10.0,
        retries: int = 0,
        label: str = "vault",
        backoff: Backoff = Backoff(),
    ) -> None:
        self.address = address.rstrip("/")
        self.mount = mount.strip("/")
        self.label = label
        self._auth = auth
        self._retries = retries
        self._backoff = backoff
        # token="" keeps hvac from picking up $VAULT_TOKEN or ~/.vault-token behind our back.
        self._client = hvac.Client(url=self.address, token="", verify=verify, timeout=timeout, namespace=namespace)
        self._lock = threading.Lock()
        self._token: Sensitive | None = None
        self._generation = 0
        self._refresh_at: float | None = None
        self._relogin_next = False
        self._full_ttl = 0
        self._mount_ok = False
        if verify is False:
            log.warning("TLS verification is off", extra={"backend": label, "address": self.address})

    def __repr__(self) -> str:
        return f"VaultKV(address={self.address!r}, mount={self.mount!r})"

    # -- documents ---------------------------------------------------------------------------

    def read(self, path: str, version: int | None = None) -> Versioned | None:
        """The document at ``path`` (its latest version, or ``version``), or None when absent.

        Raises NotManaged (data rotatord did not write), DocumentInvalid, BackendError (the
        current version was deleted or destroyed), ConfigError (wrong mount), and the call errors.
        """
        secret = self._read_raw(path, version)
        if secret is None:
            if version is None:
                self._refuse_deleted_current(path)
            return None
        data, number = secret
        return self._decode(path, number, data)

    def write(self, path: str, document: Document, *, cas: int, request_id: str) -> int:
        """Write ``document`` with check-and-set ``cas`` (0: create) and return the new KV version.

        Raises ConflictError when the path is no longer at version ``cas``; nothing is written then.
        """
        self._check_mount()
        payload = {"document": dump_document(document).decode(), "request_id": request_id}
        api = self._api("data", path)

        def op(client: Any) -> int:
            try:
                response = client.secrets.kv.v2.create_or_update_secret(
                    path=path, secret=payload, cas=cas, mount_point=self.mount
                )
            except hx.InvalidRequest as exc:
                if _CAS_MISMATCH in _errors(exc):
                    expected = "no version (create)" if cas == 0 else f"version {cas}"
                    raise ConflictError(
                        f"{self.label}: {api}: expected {expected}, but another writer changed it"
                    ) from exc
                raise
            return int(response["data"]["version"])

        return self._call("write", "create/update", api, op)

    def metadata(self, path: str) -> dict[str, Any] | None:
        """The KV metadata of ``path`` (``current_version``, ``versions``, ...), or None."""
        self._check_mount()

        def op(client: Any) -> dict[str, Any] | None:
            try:
                response = client.secrets.kv.v2.read_secret_metadata(path=path, mount_point=self.mount)
            except hx.InvalidPath:
                return None
            data: dict[str, Any] = response["data"]
            return data

        return self._call("read the metadata of", "read", self._api("metadata", path), op)

    def ensure_managed(self, path: str, max_versions: int) -> bool:
        """Set ``cas_required``, ``max_versions`` and the managed-by mark on ``path``, keeping the
        rest of its metadata.  Returns whether anything had to change."""
        meta = self.metadata(path)
        if meta is None:
            return False
        custom = {str(k): str(v) for k, v in (meta.get("custom_metadata") or {}).items()}
        key, value = MANAGED_BY
        if meta.get("cas_required") is True and meta.get("max_versions") == max_versions and custom.get(key) == value:
            return False
        custom[key] = value
        delete_after = meta.get("delete_version_after") or "0s"

        def op(client: Any) -> None:
            client.secrets.kv.v2.update_metadata(
                path=path, max_versions=max_versions, cas_required=True, delete_version_after=delete_after,
                custom_metadata=custom, mount_point=self.mount,
            )  # fmt: skip

        self._call("update the metadata of", "update", self._api("metadata", path), op)
        log.info("path marked as managed by rotatord", extra={"backend": self.label, "path": self._api("data", path)})
        return True

    def observe(self, path: str) -> Observed | None:
        """A fingerprint of ``path`` for drift detection (see :class:`Observed`), None when absent."""
        meta = self.metadata(path)
        if meta is None:
            return None
        current = int(meta.get("current_version") or 0)
        if current == 0:
            return None
        now = utcnow()
        gone: dict[int, str] = {}
        for key, info in (meta.get("versions") or {}).items():
            deleted_at = _parse_time(info.get("deletion_time"))
            if info.get("destroyed"):
                gone[int(key)] = "destroyed"
            elif deleted_at is not None and deleted_at <= now:  # a future time is a scheduled expiry
                gone[int(key)] = "deleted"
        custom = meta.get("custom_metadata") or {}
        key, value = MANAGED_BY
        marked = custom.get(key) == value and meta.get("cas_required") is True
        deleted = frozenset(str(v) for v in gone)
        if current in gone:
            return Observed(str(current), None, unreadable=gone[current], marked=marked, deleted=deleted)
        raw = self._read_raw(path, current)
        if raw is None:  # deleted between the two calls
            return Observed(str(current), None, unreadable="deleted", marked=marked, deleted=deleted)
        data, number = raw
        request_id = data.get("request_id") if isinstance(data.get("request_id"), str) else None
        try:
            doc = self._decode(path, number, data).document
        except (NotManaged, DocumentInvalid) as exc:
            why = "foreign" if isinstance(exc, NotManaged) else "invalid"
            return Observed(str(number), None, request_id, why, marked, deleted=deleted, problem=str(exc))
        return Observed(str(number), digest(doc), request_id, None, marked, deleted=deleted, owner=(doc.name, doc.kind))

    def history(self, path: str) -> list[VersionInfo]:
        """Versions kept for ``path`` (destroyed ones excluded), oldest first."""
        meta = self.metadata(path)
        if meta is None:
            return []
        current = int(meta.get("current_version") or 0)
        out = []
        for number, info in sorted((int(k), v) for k, v in (meta.get("versions") or {}).items()):
            if info.get("destroyed"):
                continue
            raw = self._read_raw(path, number)
            request_id = raw[0].get("request_id") if raw is not None else None
            out.append(
                VersionInfo(
                    version=str(number),
                    created_at=_parse_time(info.get("created_time")),
                    current=number == current,
                    request_id=request_id if isinstance(request_id, str) else None,
                )
            )
        return out

    def check(self) -> None:
        """Verify the server answers, the credentials authenticate, and the mount is KV version 2."""
        self._call("look up", "", "auth/token/lookup-self", lambda client: client.auth.token.lookup_self())
        self._mount_ok = False
        self._check_mount()

    def close(self) -> None:
        """Drop the token and the connections.  Idempotent; a later call authenticates again."""
        with self._lock:
            self._token = None
            self._client.token = ""
            self._refresh_at = None
        self._client.adapter.close()

    # -- KV internals ------------------------------------------------------------------------

    def _api(self, kind: str, path: str) -> str:
        return f"{self.mount}/{kind}/{path}"

    def _read_raw(self, path: str, version: int | None) -> tuple[dict[str, Any], int] | None:
        self._check_mount()

        def op(client: Any) -> tuple[dict[str, Any], int] | None:
            try:
                response = client.secrets.kv.v2.read_secret_version(
                    path=path, version=version, mount_point=self.mount, raise_on_deleted_version=True
                )
            except hx.InvalidPath:
                return None
            body = response["data"]
            data = body.get("data")
            return (data if isinstance(data, dict) else {}), int(body["metadata"]["version"])

        return self._call("read", "read", self._api("data", path), op)

    def _decode(self, path: str, number: int, data: dict[str, Any]) -> Versioned:
        where = f"{self.label}: {self._api('data', path)} version {number}"
        foreign = NotManaged(
            f"{where} holds data rotatord did not write (no rotatord document in it); rotatord never "
            "overwrites it: configure another path, or delete that secret if it is stale"
        )
        raw = data.get("document")
        if not isinstance(raw, str):
            raise foreign
        try:
            parsed = json.loads(raw)
        except ValueError:
            raise foreign from None
        if not isinstance(parsed, dict) or not str(parsed.get("schema", "")).startswith("rotatord/"):
            raise foreign
        document = parse_document(parsed, where=where)  # DocumentInvalid, future schemas included
        request_id = data.get("request_id")
        return Versioned(document, str(number), request_id if isinstance(request_id, str) else None)

    def _refuse_deleted_current(self, path: str) -> None:
        """A missing latest version means "absent" only if the path never had a version: a
        soft-deleted or destroyed current version must not look like room for a new secret."""
        try:
            meta = self.metadata(path)
        except PermissionDenied:
            return  # a reader without metadata access cannot tell the two apart
        current = int((meta or {}).get("current_version") or 0)
        if current > 0:
            raise BackendError(
                f"{self.label}: {self._api('data', path)}: its current version {current} is deleted or "
                "destroyed; rotatord will not write over it: undelete it, or delete the secret's metadata "
                "to start afresh"
            )

    def _check_mount(self) -> None:
        """Once per object: the mount exists, is KV version 2 and is the mount itself.

        Uses the same preflight as the ``vault kv`` CLI, which any token with some capability
        under the mount may call, so no policy on ``sys/`` is needed.
        """
        if self._mount_ok:
            return
        where = f"{self.label}: mount {self.mount!r}"

        def op(client: Any) -> Any:
            try:
                return client.adapter.get(f"/v1/sys/internal/ui/mounts/{self.mount}")
            except hx.Forbidden as exc:
                if "preflight" not in _errors(exc):
                    raise  # the token itself was refused
                raise ConfigError(
                    f"{where} does not exist, or the token's policy grants nothing under it "
                    "(set mount to the path of a KV version 2 secrets engine)"
                ) from exc
            except (hx.InvalidPath, hx.InvalidRequest) as exc:
                raise ConfigError(f"{where} does not exist ({_errors(exc)})") from exc

        # Any valid token may ask (capability ""), so a refusal there means the token itself.
        response = self._call("look up", "", f"sys/internal/ui/mounts/{self.mount}", op)
        info = response.get("data") if isinstance(response, dict) else None
        if not isinstance(info, dict):
            raise ConfigError(f"{where}: the server did not describe it; is this a Vault / OpenBao address?")
        kind = info.get("type")
        version = str((info.get("options") or {}).get("version", "1"))
        if kind != "kv" or version != "2":
            what = f"KV version {version}" if kind == "kv" else f"a {kind!r} engine"
            raise ConfigError(f"{where} is {what}; rotatord needs a KV version 2 secrets engine")
        actual = str(info.get("path", "")).strip("/")
        if actual and actual != self.mount:
            raise ConfigError(
                f"{where} is a path inside the mount {actual!r}: set mount = {actual!r} and put the rest in path_prefix"
            )
        self._mount_ok = True

    # -- calls, authentication ---------------------------------------------------------------

    def _call(self, action: str, capability: str, api: str, fn: Callable[[Any], _T]) -> _T:
        """Run ``fn(client)`` authenticated, translating and retrying as the module docstring says.

        ``action`` and ``api`` name the operation in messages; ``capability`` the policy it needs.
        """
        failures = 0
        refused: _Refused | None = None
        while True:
            stage = "auth"
            generation = self._generation
            try:
                if refused is not None and not refused.retried:
                    refused.retried = True
                    if not self._reauthenticate(refused.generation):
                        raise refused.error
                client = self._authenticated()
                generation, stage = self._generation, "call"
                return fn(client)
            except (hx.Forbidden, hx.Unauthorized) as exc:
                error = PermissionDenied(self._denied(stage, action, capability, api))
                if refused is None:
                    # A refused login belongs to the token it just set; a refused call to the
                    # token it ran with (another thread may have replaced it meanwhile).
                    refused = _Refused(self._generation if stage == "auth" else generation, error)
                    continue
                raise error from exc
            except requests.exceptions.SSLError as exc:
                raise ConfigError(
                    f"{self.label}: TLS with {self.address} failed; check ca_bundle and tls_verify ({str(exc)[:300]})"
                ) from exc
            except _TRANSIENT as exc:
                failures += 1
                if failures > self._retries:
                    raise BackendUnavailable(
                        f"{self.label}: cannot {action} {api} at {self.address}: {_reason(exc)}; "
                        f"gave up after {failures} attempt(s)"
                    ) from exc
                delay = self._backoff.delay(failures)
                log.warning(
                    "vault request failed; retrying",
                    extra={"backend": self.label, "api": api, "reason": _reason(exc), "attempt": failures,
                           "retry_in": round(delay, 3)},
                )  # fmt: skip
                time.sleep(delay)
            except hx.VaultError as exc:
                raise BackendError(f"{self.label}: cannot {action} {api}: {_reason(exc)}") from exc
            except requests.exceptions.RequestException as exc:
                raise BackendError(f"{self.label}: cannot {action} {api}: {type(exc).__name__}") from exc

    def _denied(self, stage: str, action: str, capability: str, api: str) -> str:
        if stage == "auth" or not capability:
            on = "auth/token/lookup-self" if stage == "auth" else api
            return (
                f"{self.label}: the token was refused by {self.address} (permission denied on {on}): "
                "it is invalid, expired or revoked, or its policy lacks read on auth/token/lookup-self"
            )
        return (
            f"{self.label}: permission denied to {action} {api}: the token's policy must grant "
            f"{capability} on {api} (see the policies in contrib/vault/), or the token was revoked"
        )

    def _authenticated(self) -> Any:
        """The hvac client with a live token: log in on first use, renew past half the TTL."""
        with self._lock:
            if self._token is None:
                self._login()
            elif self._refresh_at is not None and time.monotonic() >= self._refresh_at:
                self._refresh()
            return self._client

    def _reauthenticate(self, generation: int) -> bool:
        """After "permission denied": log in again (AppRole) or reload the token.  False when
        there is nothing new to try (the token source still gives the refused token)."""
        with self._lock:
            if self._generation != generation:
                return True  # another thread already authenticated again
            if isinstance(self._auth, TokenAuth) and self._auth.load().strip() == self._client.token:
                return False
            log.info("permission denied; authenticating again", extra={"backend": self.label})
            self._login()
            return True

    def _set_token(self, token: str) -> None:
        self._token = Sensitive(token)
        self._client.token = token
        self._generation += 1

    def _login(self) -> None:
        auth = self._auth
        if isinstance(auth, AppRoleAuth):
            self._client.token = ""  # the login path needs no token; never send a refused one
            try:
                response = self._client.auth.approle.login(
                    role_id=auth.role_id().strip(), secret_id=auth.secret_id().strip(), mount_point=auth.mount,
                    use_token=False,
                )  # fmt: skip
            except (hx.InvalidRequest, hx.Forbidden, hx.Unauthorized, hx.InvalidPath) as exc:
                raise ConfigError(
                    f"{self.label}: AppRole login at auth/{auth.mount}/login was refused ({_errors(exc)}); "
                    "check role_id, secret_id (a secret_id with a use limit cannot log in again) and auth_mount"
                ) from exc
            info = response["auth"]
            self._set_token(info["client_token"])
            lease, renewable = int(info.get("lease_duration") or 0), bool(info.get("renewable"))
            self._full_ttl = lease
            log.info("logged in with AppRole", extra={"backend": self.label, "ttl": lease})
        else:
            token = auth.load().strip()
            if not token:
                raise ConfigError(f"{self.label}: the Vault token is empty")
            self._set_token(token)
            try:
                data = self._client.auth.token.lookup_self()["data"]
            except BaseException:
                self._token = None  # not logged in: the next call looks the token up again
                raise
            lease, renewable = int(data.get("ttl") or 0), bool(data.get("renewable"))
            self._full_ttl = int(data.get("creation_ttl") or lease)
        self._schedule(lease, renewable)

    def _schedule(self, lease: int, renewable: bool, *, capped: bool = False) -> None:
        """Plan the next refresh at half the lease; none for a token that never expires (root)."""
        approle = isinstance(self._auth, AppRoleAuth)
        if lease <= 0 or not (renewable or approle):
            self._refresh_at = None
            if lease > 0:
                log.warning("the token is not renewable; it expires", extra={"backend": self.label, "ttl": lease})
            return
        self._refresh_at = time.monotonic() + lease / 2
        # A renewal capped by the max TTL means the token lapses soon: log in afresh next time.
        self._relogin_next = approle and (not renewable or capped)

    def _refresh(self) -> None:
        if self._relogin_next:
            self._login()
            return
        try:
            # Asking for the full TTL makes a capped renewal say so (a warning, and a shorter lease).
            response = self._client.auth.token.renew_self(increment=self._full_ttl or None)
        except hx.VaultDown:
            raise  # sealed: transient, retried by the call
        except hx.VaultError as exc:
            # Expired, revoked, not renewable, or past its max TTL (which OpenBao reports as a 500).
            if isinstance(self._auth, AppRoleAuth):
                log.info("token renewal refused; logging in again", extra={"backend": self.label})
                self._login()
                return
            log.warning("token renewal refused", extra={"backend": self.label, "error": _errors(exc)})
            self._refresh_at = None
            return
        info = response.get("auth") or {}
        lease = int(info.get("lease_duration") or 0)
        capped = lease < self._full_ttl or any("capped" in str(w) for w in response.get("warnings") or ())
        self._schedule(lease, bool(info.get("renewable")), capped=capped)
        log.debug("token renewed", extra={"backend": self.label, "ttl": lease, "capped": capped})


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return parse_ts(value)
    except ValueError:
        return None


class VaultBackend(Backend):
    """The :class:`Backend` over :class:`VaultKV`, configured by ``[backends.<name>]``."""

    kind: ClassVar[str] = "vault"

    def __init__(self, name: str, settings: VaultBackendSettings) -> None:
        self.name = name
        self._settings = settings
        self._prefix = settings.path_prefix.strip("/")
        verify: bool | str = settings.tls_verify
        if settings.tls_verify and settings.ca_bundle is not None:
            verify = str(settings.ca_bundle)
        self._kv = VaultKV(
            settings.address, settings.mount, auth=_auth_from(name, settings), namespace=settings.namespace,
            verify=verify, timeout=settings.timeout.total_seconds(), retries=settings.transient_retries,
            label=f"backend {name!r}",
        )  # fmt: skip

    def __repr__(self) -> str:
        return f"VaultBackend(name={self.name!r}, address={self._settings.address!r}, mount={self._settings.mount!r})"

    def read(self, path: str) -> Versioned | None:
        return self._kv.read(self._full(path))

    def write(self, path: str, document: Document, *, expected: str | None, request_id: str) -> str:
        full = self._full(path)
        current = self._kv.read(full)
        if current is not None and current.request_id == request_id:
            self._mark(full)  # a retry after a crash: the write happened, its metadata perhaps not
            return current.version
        actual = None if current is None else current.version
        if expected != actual:
            raise ConflictError(
                f"backend {self.name!r}: {self._settings.mount}/data/{full}: expected "
                f"{'no version (create)' if expected is None else f'version {expected}'}, "
                f"but the current version is {'none' if actual is None else actual}"
            )
        try:
            cas = 0 if expected is None else int(expected)
            version = self._kv.write(full, document, cas=cas, request_id=request_id)
        except ConflictError:
            # An attempt that timed out may have landed before the retry; then the write is ours.
            again = self._kv.read(full)
            if again is None or again.request_id != request_id:
                raise
            version = int(again.version)
        self._mark(full)
        return str(version)

    def history(self, path: str) -> list[VersionInfo]:
        return self._kv.history(self._full(path))

    def observe(self, path: str) -> Observed | None:
        return self._kv.observe(self._full(path))

    def mark_managed(self, path: str) -> None:
        self._kv.ensure_managed(self._full(path), self._settings.max_versions)

    def read_version(self, path: str, version: str) -> Versioned | None:
        if not version.isdigit() or int(version) < 1:
            return None
        return self._kv.read(self._full(path), int(version))

    def check(self) -> None:
        self._kv.check()

    def close(self) -> None:
        self._kv.close()

    def _full(self, path: str) -> str:
        if not path or any(part in ("", ".", "..") for part in path.split("/")):
            raise ConfigError(f"backend {self.name!r}: path {path!r} is not a relative path of plain segments")
        return f"{self._prefix}/{path}" if self._prefix else path

    def _mark(self, full: str) -> None:
        """Mark the path as rotatord's.  The document is already written, so a failure here is
        logged and retried by the next write instead of failing the step."""
        try:
            self._kv.ensure_managed(full, self._settings.max_versions)
        except (BackendError, ConfigError) as exc:
            log.warning(
                "could not set cas_required and max_versions; the next write tries again",
                extra={"backend": self.name, "path": full, "error": str(exc)},
            )


def _auth_from(name: str, settings: VaultBackendSettings) -> TokenAuth | AppRoleAuth:
    """Credential loaders for the configured auth method; each file is read when it is needed."""
    # Imported here, not at the top: bots import this module without pydantic (rotatord.config).
    from ..config.references import read_credential

    def loader(ref: str, file: Path | None, credential: str | None) -> Callable[[], str]:
        def load() -> str:
            if file is None and credential is None:
                raise ConfigError(f"backends.{name}: set one of {ref}_file, {ref}_credential")
            what = f"backends.{name}.{ref}_{'file' if file is not None else 'credential'}"
            raw = read_credential(file, credential, what)
            try:
                return raw.decode().strip()
            except UnicodeDecodeError:
                raise ConfigError(f"{what}: not UTF-8 text") from None

        return load

    if settings.auth == "approle":
        return AppRoleAuth(
            loader("role_id", settings.role_id_file, settings.role_id_credential),
            loader("secret_id", settings.secret_id_file, settings.secret_id_credential),
            settings.auth_mount,
        )
    return TokenAuth(loader("token", settings.token_file, settings.token_credential))
