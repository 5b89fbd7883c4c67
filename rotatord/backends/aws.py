"""The ``aws`` backend: secret documents in AWS Secrets Manager, through botocore.

This is the only module of rotatord that imports boto3/botocore, and botocore's exceptions stop
here: every call goes through :meth:`SecretsManagerKV._call`, which re-raises the most specific
:mod:`rotatord.errors` class.  It imports no configuration code at run time, so the bot-side
reader (:mod:`rotatord.client.aws`) can use :class:`SecretsManagerKV` without the daemon.

Layout: one secret per path, named ``<path_prefix>/<path>``.  Its ``SecretString`` is the
document's canonical JSON (``dump_document``), the same document every backend holds, so a bot
may read it with its own boto3 client (always with ``VersionStage="AWSCURRENT"``).  Secrets rotatord creates
carry the tag ``managed-by=rotatord``; any other secret is refused unless ``adopt_unmanaged``.

rotatord drives the staging labels itself (no RotateSecret, no Lambda).  One write is::

    describe_secret                     where AWSCURRENT is; refuse deleted/foreign secrets
    put_secret_value(AWSPENDING)        VersionId = version_id_for(request_id, expected)
    update_secret_version_stage         AWSCURRENT -> new, RemoveFromVersionId=expected (the CAS)
    update_secret_version_stage         remove AWSPENDING from the new version

Every call is idempotent, so a write interrupted anywhere (crash, timeout, paused server) is
finished by repeating it with the same request id; transient failures repeat the whole write.

The module is longer than most on purpose: the SDK may be imported by one module only (STYLE
rule 3), and the SDK edge (:class:`SecretsManagerKV`) and the protocol (:class:`AwsBackend`)
are both here.
"""

from __future__ import annotations

import configparser
import hashlib
import json
import logging
import os
import random
import re
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn, TypeVar

import botocore.config  # type: ignore[import-untyped]
import botocore.exceptions  # type: ignore[import-untyped]
import botocore.session  # type: ignore[import-untyped]

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

if TYPE_CHECKING:
    from ..config.model import AwsBackendSettings

__all__ = [
    "MANAGED_TAG",
    "AwsBackend",
    "AwsCredentials",
    "SecretMeta",
    "SecretsManagerKV",
    "load_shared_credentials",
    "request_id_of",
    "secret_name",
    "version_id_for",
]

log = logging.getLogger(__name__)

CURRENT = "AWSCURRENT"
PENDING = "AWSPENDING"
#: The tag rotatord puts on the secrets it creates, and looks for before touching one.
MANAGED_TAG = ("managed-by", "rotatord")
#: The same variable as rotatord.engine.runner.CRASH_ENV (not imported: this module stays free of
#: the engine).  ``aws.pending`` kills the process between the put and the label move.
_CRASH_ENV = "ROTATORD_TEST_CRASH_AT"

_BACKOFF_FIRST = 0.2
_BACKOFF_CAP = 2.0
_TRANSIENT_CODES = frozenset({
    "ThrottlingException", "Throttling", "TooManyRequestsException", "RequestLimitExceeded", "InternalServiceError",
    "InternalFailure", "ServiceUnavailable", "ServiceUnavailableException", "RequestTimeout",
    "RequestTimeoutException", "PriorRequestNotComplete",
})  # fmt: skip
_REJECTED_CREDENTIAL_CODES = (
    "UnrecognizedClientException", "InvalidClientTokenId", "InvalidSignatureException", "SignatureDoesNotMatch",
    "IncompleteSignature", "ExpiredTokenException", "ExpiredToken", "MissingAuthenticationToken", "AuthFailure",
)  # fmt: skip
_DENIED_CODES = ("AccessDeniedException", "AccessDenied")
_KMS_CODES = frozenset({"DecryptionFailure", "EncryptionFailure", "KMSAccessDeniedException"})

_NAME_RE = re.compile(r"^[A-Za-z0-9_+=.@-]+(/[A-Za-z0-9_+=.@-]+)*$")
_NAME_MAX = 512
_RID_RE = re.compile(r"^[A-Za-z0-9]{1,32}$")
_TAIL_RE = re.compile(r"^[0-9a-f]+$")
_VERSION_ID_LENGTH = 64
_CREATED_CACHE = 4096
_EPOCH = datetime.min.replace(tzinfo=UTC)

T = TypeVar("T")


# -- version ids: the idempotency key, derived from the request id ---------------------------------


def _request_part(request_id: str) -> str:
    """The request id itself when it fits a VersionId (1-32 letters or digits, as the engine's
    uuid4().hex does); otherwise ``_`` and a hash of it, so any string still works."""
    if _RID_RE.match(request_id):
        return request_id
    return "_" + hashlib.sha256(request_id.encode()).hexdigest()[:31]


def version_id_for(request_id: str, expected: str | None) -> str:
    """The VersionId (ClientRequestToken) that a write of ``request_id`` on top of ``expected`` creates.

    ``<request id>-<hex of SHA-256(expected)>``, 64 characters.  The request id comes first so
    an operator can match a version to the journal; the hash of the version the write is based
    on means a retry after another writer moved the secret on gets a new version instead of
    promoting a pending value computed from an older one.
    """
    base = "\0create" if expected is None else expected
    head = _request_part(request_id)
    tail = hashlib.sha256(base.encode()).hexdigest()
    return f"{head}-{tail}"[:_VERSION_ID_LENGTH]


def request_id_of(version_id: str) -> str | None:
    """The request id a VersionId made by :func:`version_id_for` carries; None for any other id
    (made by someone else, or from a request id that had to be hashed)."""
    head, sep, tail = version_id.partition("-")
    if sep and len(version_id) == _VERSION_ID_LENGTH and _RID_RE.match(head) and _TAIL_RE.match(tail):
        return head
    return None


def _written_by(version_id: str | None, request_id: str) -> bool:
    if version_id is None:
        return False
    head, sep, _ = version_id.partition("-")
    return bool(sep) and len(version_id) == _VERSION_ID_LENGTH and head == _request_part(request_id)


def secret_name(path_prefix: str, path: str) -> str:
    """The Secrets Manager name of ``path``: ``<path_prefix>/<path>``, or ``path`` without a prefix."""
    return f"{path_prefix}/{path}" if path_prefix else path


# -- credentials ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class AwsCredentials:
    """Static credentials from a shared-credentials file.  The secret parts are masked in reprs."""

    access_key_id: str
    secret_access_key: Sensitive
    session_token: Sensitive | None = None


def load_shared_credentials(raw: bytes, profile: str | None, what: str) -> AwsCredentials:
    """Parse an AWS shared-credentials file (the AWS CLI's INI format) and pick ``profile``.

    Raises ConfigError naming ``what`` (the configuration field) and the profile; messages never
    quote the file, since any line of it may be a key.
    """
    section = profile or "default"
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(raw.decode("utf-8"))
    except (UnicodeDecodeError, configparser.Error):
        raise ConfigError(f"{what}: not an AWS shared-credentials file (INI sections of key = value)") from None
    if not parser.has_section(section):
        raise ConfigError(f"{what}: has no [{section}] section (the profile to use is set by 'profile')")
    values = parser[section]
    key_id = values.get("aws_access_key_id", "").strip()
    secret = values.get("aws_secret_access_key", "").strip()
    if not key_id or not secret:
        raise ConfigError(f"{what}: [{section}] needs aws_access_key_id and aws_secret_access_key")
    token = values.get("aws_session_token", "").strip()
    return AwsCredentials(key_id, Sensitive(secret), Sensitive(token) if token else None)


# -- what describe_secret says -----------------------------------------------------------------------


@dataclass(frozen=True)
class SecretMeta:
    """The parts of ``describe_secret`` rotatord decides on.  No secret material."""

    name: str
    stages: Mapping[str, tuple[str, ...]]
    tags: Mapping[str, str]
    deleted: bool
    rotation_enabled: bool
    owning_service: str | None

    @property
    def current(self) -> str | None:
        return next((v for v, labels in self.stages.items() if CURRENT in labels), None)

    @property
    def pending(self) -> list[str]:
        return [v for v, labels in self.stages.items() if PENDING in labels]

    @property
    def managed(self) -> bool:
        return self.tags.get(MANAGED_TAG[0]) == MANAGED_TAG[1]


class _Refused(BackendError):
    """A service error the caller asked to handle itself (``expect=``); never escapes this module."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


def _snippet(text: str) -> str:
    return " ".join(text.split())[:300]


def _action(operation: str) -> str:
    return "".join(part.capitalize() for part in operation.split("_"))


class SecretsManagerKV:
    """A typed edge over botocore's ``secretsmanager`` client: read, version and label secrets.

    Takes primitives only, so both the daemon's backend and a bot's reader can use it.  Give
    ``credentials`` (a loader called on first use) for static keys, else ``session`` (a botocore
    Session) or ``profile`` for botocore's default chain (environment, shared files, instance
    role).  botocore's own retries are off: :meth:`retrying` repeats whole operations, which are
    idempotent, with capped exponential backoff and jitter.
    """

    def __init__(
        self,
        *,
        region: str,
        endpoint_url: str | None = None,
        profile: str | None = None,
        credentials: Callable[[], AwsCredentials] | None = None,
        session: Any = None,
        timeout: float = 10.0,
        retries: int = 3,
        label: str = "aws",
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if retries < 0:
            raise ValueError("retries must not be negative")
        self.region = region
        self.endpoint_url = endpoint_url
        self.profile = profile
        self.timeout = timeout
        self.retries = retries
        self.label = label
        self._credentials = credentials
        self._session = session
        self._sleep = sleep
        self._client: Any = None
        self._client_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"SecretsManagerKV(region={self.region!r}, endpoint={self.endpoint!r})"

    @property
    def endpoint(self) -> str:
        return self.endpoint_url or f"https://secretsmanager.{self.region}.amazonaws.com"

    # -- operations ----------------------------------------------------------------------------

    def describe(self, secret_id: str) -> SecretMeta | None:
        """What ``describe_secret`` says about ``secret_id``, or None when there is no such secret."""
        try:
            raw = self._call("describe_secret", secret_id, expect={"ResourceNotFoundException"}, SecretId=secret_id)
        except _Refused:
            return None
        stages = {str(v): tuple(str(s) for s in labels) for v, labels in (raw.get("VersionIdsToStages") or {}).items()}
        tags = {str(t.get("Key")): str(t.get("Value")) for t in raw.get("Tags") or []}
        return SecretMeta(
            name=str(raw.get("Name", secret_id)),
            stages=stages,
            tags=tags,
            deleted=raw.get("DeletedDate") is not None,
            rotation_enabled=bool(raw.get("RotationEnabled")),
            owning_service=raw.get("OwningService"),
        )

    def read(self, secret_id: str) -> Versioned | None:
        """The AWSCURRENT version of ``secret_id`` (always named: a stage-less read may be stale
        on moto after a label move), or None when the secret or its current version is missing.

        Raises NotManaged for a value that is not a rotatord document, DocumentInvalid for one
        that fails the schema (a future version included), and the errors of :meth:`_call`.
        """
        return self._get(secret_id, VersionStage=CURRENT)

    def read_version(self, secret_id: str, version_id: str) -> Versioned | None:
        """One version by its VersionId (what rotatord's webhooks name), or None when it is gone."""
        return self._get(secret_id, VersionId=version_id)

    def create(self, secret_id: str, body: str, version_id: str, kms_key_id: str | None) -> None:
        """Create the secret with its first version, tagged as rotatord's.  Raises _Refused
        (ResourceExistsException) when the name is taken."""
        kwargs: dict[str, Any] = {
            "Name": secret_id,
            "SecretString": body,
            "ClientRequestToken": version_id,
            "Tags": [{"Key": MANAGED_TAG[0], "Value": MANAGED_TAG[1]}],
            "Description": "Managed by rotatord: written by the rotation daemon, read by bots.",
        }
        if kms_key_id:
            kwargs["KmsKeyId"] = kms_key_id
        self._call("create_secret", secret_id, expect={"ResourceExistsException"}, **kwargs)

    def put_pending(self, secret_id: str, body: str, version_id: str) -> tuple[str, ...] | None:
        """Add version ``version_id`` labelled AWSPENDING; return its labels, or None when that
        VersionId already exists with another value (versions are immutable)."""
        try:
            raw = self._call(
                "put_secret_value",
                secret_id,
                expect={"ResourceExistsException"},
                SecretId=secret_id,
                SecretString=body,
                ClientRequestToken=version_id,
                VersionStages=[PENDING],
            )
        except _Refused:
            return None
        return tuple(str(s) for s in raw.get("VersionStages") or ())

    def move_label(self, secret_id: str, label: str, to_version: str, from_version: str | None) -> None:
        """Move ``label`` to ``to_version``.  With ``from_version`` this is a check-and-set: AWS
        refuses (raises _Refused, InvalidParameterException) unless the label is on it."""
        kwargs: dict[str, Any] = {"SecretId": secret_id, "VersionStage": label, "MoveToVersionId": to_version}
        if from_version is not None:
            kwargs["RemoveFromVersionId"] = from_version
        self._call("update_secret_version_stage", secret_id, expect={"InvalidParameterException"}, **kwargs)

    def remove_label(self, secret_id: str, label: str, version_id: str) -> bool:
        """Take ``label`` off ``version_id``; False when it was not there ("already gone" is done)."""
        try:
            self._call(
                "update_secret_version_stage",
                secret_id,
                expect={"InvalidParameterException"},
                SecretId=secret_id,
                VersionStage=label,
                RemoveFromVersionId=version_id,
            )
        except _Refused:
            return False
        return True

    def tag_managed(self, secret_id: str) -> None:
        self._call(
            "tag_resource", secret_id, SecretId=secret_id, Tags=[{"Key": MANAGED_TAG[0], "Value": MANAGED_TAG[1]}]
        )

    def versions(self, secret_id: str) -> list[tuple[str, tuple[str, ...], datetime | None]]:
        """(VersionId, labels, created) of every version AWS keeps, deprecated ones included, in
        the service's order.  Empty when the secret does not exist."""
        out: list[tuple[str, tuple[str, ...], datetime | None]] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"SecretId": secret_id, "IncludeDeprecated": True, "MaxResults": 100}
            if token:
                kwargs["NextToken"] = token
            try:
                raw = self._call("list_secret_version_ids", secret_id, expect={"ResourceNotFoundException"}, **kwargs)
            except _Refused:
                return []
            for item in raw.get("Versions") or []:
                created = item.get("CreatedDate")
                stamp = created.astimezone(UTC) if isinstance(created, datetime) else None
                out.append((str(item["VersionId"]), tuple(str(s) for s in item.get("VersionStages") or ()), stamp))
            token = raw.get("NextToken")
            if not token:
                break
        return out

    def retrying(self, operation: Callable[[], T], what: str) -> T:
        """Run ``operation``; repeat it on BackendUnavailable up to ``retries`` more times, after
        0.2 s, 0.4 s, ... (capped at 2 s, jittered over the upper half)."""
        attempt = 0
        while True:
            try:
                return operation()
            except BackendUnavailable as exc:
                if attempt >= self.retries:
                    raise
                delay = min(_BACKOFF_FIRST * 2**attempt, _BACKOFF_CAP)
                delay = delay / 2 + random.random() * delay / 2
                attempt += 1
                log.warning(
                    "secrets manager unavailable; retrying",
                    extra={"backend": self.label, "what": what, "attempt": attempt, "error": str(exc)},
                )
                self._sleep(delay)

    def close(self) -> None:
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    # -- the SDK edge ------------------------------------------------------------------------------

    def _get(self, secret_id: str, **selector: str) -> Versioned | None:
        try:
            raw = self._call(
                "get_secret_value", secret_id, expect={"ResourceNotFoundException"}, SecretId=secret_id, **selector
            )
        except _Refused:
            return None
        version = str(raw["VersionId"])
        where = f"{self.label}: secret {secret_id!r} version {version}"
        text = raw.get("SecretString")
        if not isinstance(text, str):
            raise NotManaged(f"{where}: holds a binary secret, not a rotatord document")
        return Versioned(_parse_secret_string(text, where), version, request_id_of(version))

    def _client_for_calls(self) -> Any:
        with self._client_lock:
            if self._client is None:
                self._client = self._make_client()
            return self._client

    def _make_client(self) -> Any:
        try:
            if self._session is not None:
                session = self._session
            elif self._credentials is not None:
                # With static credentials the profile only chose their section of the file: keep
                # botocore from looking it (or $AWS_PROFILE) up in ~/.aws/config as well.
                session = botocore.session.Session(session_vars={"profile": (None, None, None, None)})
            else:
                session = botocore.session.Session(profile=self.profile)
            kwargs: dict[str, Any] = {}
            if self._credentials is not None:
                creds = self._credentials()
                kwargs = {
                    "aws_access_key_id": creds.access_key_id,
                    "aws_secret_access_key": creds.secret_access_key.reveal(),
                    "aws_session_token": creds.session_token.reveal() if creds.session_token else None,
                }
            config = botocore.config.Config(
                connect_timeout=self.timeout,
                read_timeout=self.timeout,
                retries={"total_max_attempts": 1},  # rotatord retries whole, idempotent operations
                user_agent_extra="rotatord",
            )
            return session.create_client(
                "secretsmanager", region_name=self.region, endpoint_url=self.endpoint_url, config=config, **kwargs
            )
        except botocore.exceptions.ProfileNotFound:
            raise ConfigError(f"{self.label}: AWS profile {self.profile!r} is not defined") from None
        except botocore.exceptions.BotoCoreError as exc:
            raise ConfigError(f"{self.label}: cannot set up the AWS client ({type(exc).__name__})") from None

    def _call(self, operation: str, secret_id: str, *, expect: AbstractSet[str] = frozenset(), **kwargs: Any) -> Any:
        """Call one API operation; translate every SDK exception at this edge.

        A service error whose code is in ``expect`` is raised as _Refused for the caller to
        handle; the rest become the rotatord error that says what the operator does next.
        """
        where = f"{self.label}: secret {secret_id!r}"
        client = self._client_for_calls()
        try:
            return getattr(client, operation)(**kwargs)
        except botocore.exceptions.ClientError as exc:
            error = exc.response.get("Error") or {}
            code = str(error.get("Code") or "")
            message = str(error.get("Message") or "")
            if code in expect:
                raise _Refused(code, _snippet(message)) from None
            status = int((exc.response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)
            _raise_service_error(code, status, message, operation, where, self.endpoint)
        except (botocore.exceptions.SSLError, botocore.exceptions.ProxyConnectionError) as exc:
            raise BackendError(
                f"{where}: TLS or proxy failure talking to {self.endpoint} ({type(exc).__name__}); "
                "check endpoint_url and the CA trust store"
            ) from exc
        except (botocore.exceptions.ReadTimeoutError, botocore.exceptions.ConnectTimeoutError) as exc:
            raise BackendUnavailable(
                f"{where}: Secrets Manager at {self.endpoint} did not answer {_action(operation)} "
                f"within {self.timeout:g}s"
            ) from exc
        except (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError) as exc:
            raise BackendUnavailable(
                f"{where}: cannot reach Secrets Manager at {self.endpoint} ({type(exc).__name__}); "
                "check region, endpoint_url and the network"
            ) from exc
        except (
            botocore.exceptions.NoCredentialsError,
            botocore.exceptions.PartialCredentialsError,
            botocore.exceptions.CredentialRetrievalError,
        ):
            raise ConfigError(
                f"{self.label}: no usable AWS credentials (set credentials_file or credentials_credential, "
                "or provide them through the environment or an instance role)"
            ) from None
        except botocore.exceptions.ParamValidationError:
            # Its message may quote a parameter's value (the secret string included): never use it.
            raise BackendError(f"{where}: {_action(operation)} rejected by the SDK's parameter validation") from None
        except botocore.exceptions.BotoCoreError as exc:
            raise BackendError(f"{where}: {_action(operation)} failed ({type(exc).__name__})") from exc


def _raise_service_error(code: str, status: int, message: str, operation: str, where: str, endpoint: str) -> NoReturn:
    """Map one service error to the rotatord error class that says what to do next."""
    action = _action(operation)
    # moto answers JSON-protocol calls with XML errors when it enforces IAM, so botocore sees the
    # HTTP status as the code; look for the real code in the message then.
    known = (
        code
        if not code.isdigit()
        else next((c for c in (*_REJECTED_CREDENTIAL_CODES, *_DENIED_CODES) if c in message), code)
    )
    if known in _REJECTED_CREDENTIAL_CODES:
        raise PermissionDenied(f"{where}: the AWS credentials were rejected ({known}): invalid, expired or revoked")
    if known in _DENIED_CODES or status in (401, 403):
        raise PermissionDenied(
            f"{where}: not authorized to call secretsmanager:{action} "
            "(grant the policy in contrib/aws/rotatord-daemon-policy.json)"
        )
    if known in _KMS_CODES:
        raise PermissionDenied(
            f"{where}: KMS refused to encrypt or decrypt the secret ({known}); "
            "check kms_key_id and kms:GenerateDataKey / kms:Decrypt on that key"
        )
    if known in _TRANSIENT_CODES or status >= 500 or status == 429:
        raise BackendUnavailable(f"{where}: Secrets Manager at {endpoint} failed {action} ({known or status})")
    if known == "InvalidRequestException":
        raise BackendError(f"{where}: {action} refused: {_snippet(message)}")
    if known == "LimitExceededException":
        raise BackendError(f"{where}: {action} would exceed a Secrets Manager quota: {_snippet(message)}")
    raise BackendError(f"{where}: {action} failed ({known or status}): {_snippet(message)}")


def _parse_secret_string(text: str, where: str) -> Document:
    """A rotatord document, or NotManaged for anything else (never overwritten, never quoted)."""
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    schema = data.get("schema") if isinstance(data, dict) else None
    if not isinstance(schema, str) or not schema.startswith("rotatord/"):
        raise NotManaged(f"{where}: holds something that is not a rotatord document")
    return parse_document(data, where)


# -- the Backend ---------------------------------------------------------------------------------------

_write_locks: dict[tuple[str, str, str], threading.Lock] = {}
_write_locks_guard = threading.Lock()


def _write_lock(key: tuple[str, str, str]) -> threading.Lock:
    with _write_locks_guard:
        return _write_locks.setdefault(key, threading.Lock())


class AwsBackend(Backend):
    """Secret documents in AWS Secrets Manager; see the module docstring for the protocol."""

    kind: ClassVar[str] = "aws"

    def __init__(self, name: str, settings: AwsBackendSettings, *, sleep: Callable[[float], None] = time.sleep) -> None:
        if settings.timeout.total_seconds() <= 0:
            raise ConfigError(f"backends.{name}.timeout: must be more than 0s")
        self.name = name
        self._settings = settings
        self._created: OrderedDict[str, datetime] = OrderedDict()
        self._created_lock = threading.Lock()
        self._kv = SecretsManagerKV(
            region=settings.region,
            endpoint_url=settings.endpoint_url,
            profile=settings.profile,
            credentials=self._load_credentials if settings.credential_refs()[0].is_set else None,
            timeout=settings.timeout.total_seconds(),
            retries=settings.transient_retries,
            label=f"backend {name!r}",
            sleep=sleep,
        )

    def __repr__(self) -> str:
        return (
            f"AwsBackend(name={self.name!r}, region={self._settings.region!r}, prefix={self._settings.path_prefix!r})"
        )

    # -- the Backend contract ------------------------------------------------------------------

    def read(self, path: str) -> Versioned | None:
        name = self._secret(path)
        return self._kv.retrying(lambda: self._read_once(name), f"read {name}")

    def write(self, path: str, document: Document, *, expected: str | None, request_id: str) -> str:
        name = self._secret(path)
        body = dump_document(document).decode()  # fails on a malformed document before any call
        # Writers of one process take turns per secret, so the loser of a race is refused before
        # it puts a version (AWS cannot delete one).  Across processes the label move is the CAS.
        with _write_lock((self._kv.endpoint, self._settings.region, name)):
            return self._kv.retrying(lambda: self._write_once(name, body, expected, request_id), f"write {name}")

    def history(self, path: str) -> list[VersionInfo]:
        name = self._secret(path)

        def run() -> list[tuple[str, tuple[str, ...], datetime | None]]:
            # Describe first: moto answers a listing of a missing secret with HTTP 500, not 404.
            return self._kv.versions(name) if self._kv.describe(name) is not None else []

        versions = self._kv.retrying(run, f"history {name}")
        out = [
            VersionInfo(
                version=v,
                created_at=self._created_at(v, created),
                current=CURRENT in labels,
                request_id=request_id_of(v),
            )
            for v, labels, created in versions
            # A version still only AWSPENDING was never published: like the file backend's
            # orphans, it is not part of the history.
            if not (PENDING in labels and CURRENT not in labels)
        ]
        return sorted(out, key=lambda info: info.created_at or _EPOCH)  # stable: ties keep the listing order

    def observe(self, path: str) -> Observed | None:
        name = self._secret(path)
        return self._kv.retrying(lambda: self._observe_once(name), f"observe {name}")

    def mark_managed(self, path: str) -> None:
        name = self._secret(path)

        def run() -> None:
            meta = self._kv.describe(name)
            if meta is not None and not meta.managed:
                self._kv.tag_managed(name)

        self._kv.retrying(run, f"tag {name}")

    def read_version(self, path: str, version: str) -> Versioned | None:
        name = self._secret(path)
        return self._kv.retrying(lambda: self._kv.read_version(name, version), f"read {name} version {version}")

    def check(self) -> None:
        probe = self._secret("rotatord-check")

        def run() -> None:
            meta = self._kv.describe(probe)
            if meta is not None:
                log.info("the check probe names an existing secret", extra={"backend": self.name, "secret": probe})

        self._kv.retrying(run, "check")

    def close(self) -> None:
        self._kv.close()

    # -- internals -------------------------------------------------------------------------------

    def _secret(self, path: str) -> str:
        name = secret_name(self._settings.path_prefix, path)
        if not _NAME_RE.match(name) or len(name) > _NAME_MAX or any(p in (".", "..") for p in path.split("/")):
            raise ConfigError(
                f"backend {self.name!r}: path {path!r} does not make a valid Secrets Manager name "
                f"(at most {_NAME_MAX} characters of letters, digits and /_+=.@-)"
            )
        return name

    def _created_at(self, version: str, listed: datetime | None) -> datetime | None:
        """The creation time first seen for ``version``.  Versions are immutable, so the first
        answer stands; moto reports the time of the listing instead, which this keeps stable."""
        if listed is None:
            return self._created.get(version)
        with self._created_lock:
            first = self._created.setdefault(version, listed)
            self._created.move_to_end(version)
            while len(self._created) > _CREATED_CACHE:
                self._created.popitem(last=False)
        return first

    def _where(self, name: str) -> str:
        return f"backend {self.name!r}: secret {name!r}"

    def _load_credentials(self) -> AwsCredentials:
        from ..config.references import read_credential  # the daemon's side only; bots never get here

        settings = self._settings
        which = "credentials_file" if settings.credentials_file is not None else "credentials_credential"
        what = f"backends.{self.name}.{which}"
        raw = read_credential(settings.credentials_file, settings.credentials_credential, what)
        return load_shared_credentials(raw, settings.profile, what)

    def _usable(self, name: str, meta: SecretMeta) -> None:
        """Refuse secrets rotatord must not touch; the same rules for reads and writes."""
        where = self._where(name)
        if meta.deleted:
            raise BackendError(
                f"{where}: is scheduled for deletion; restore it (aws secretsmanager restore-secret) "
                "or point rotatord at another path"
            )
        if meta.owning_service:
            raise NotManaged(f"{where}: is managed by the AWS service {meta.owning_service!r}")
        if meta.rotation_enabled:
            raise NotManaged(
                f"{where}: has Secrets Manager rotation enabled; rotatord drives the staging labels itself, "
                "so two rotators would race (aws secretsmanager cancel-rotate-secret)"
            )
        if not meta.managed and not self._settings.adopt_unmanaged:
            raise NotManaged(
                f"{where}: lacks the tag {MANAGED_TAG[0]}={MANAGED_TAG[1]}, so rotatord did not create it; "
                f"set backends.{self.name}.adopt_unmanaged = true to take it over"
            )

    def _read_once(self, name: str) -> Versioned | None:
        meta = self._kv.describe(name)
        if meta is None:
            return None
        self._usable(name, meta)
        return self._kv.read(name)

    def _observe_once(self, name: str) -> Observed | None:
        meta = self._kv.describe(name)
        if meta is None:
            return None
        # AWSPENDING is rotatord's own in-flight marker (a write interrupted between the put and
        # the label move leaves it, and the next write clears it): bots never read it.
        labels = {label: v for v, stages in meta.stages.items() for label in stages if label != PENDING}
        current = meta.current
        gone = "deleted" if meta.deleted or current is None else None
        if gone is not None or current is None:
            return Observed(current, None, unreadable=gone, marked=meta.managed, labels=labels)
        request_id = request_id_of(current)
        try:
            found = self._kv.read_version(name, current)
        except (NotManaged, DocumentInvalid) as exc:
            why = "foreign" if isinstance(exc, NotManaged) else "invalid"
            return Observed(current, None, request_id, why, meta.managed, labels, problem=str(exc))
        if found is None:
            return Observed(current, None, request_id, "deleted", meta.managed, labels)
        doc = found.document
        return Observed(current, digest(doc), request_id, None, meta.managed, labels, owner=(doc.name, doc.kind))

    def _write_once(self, name: str, body: str, expected: str | None, request_id: str) -> str:
        where = self._where(name)
        meta = self._kv.describe(name)
        if meta is None:
            if expected is not None:
                raise ConflictError(f"{where}: expected version {expected}, but the secret does not exist")
            version = version_id_for(request_id, None)
            try:
                self._kv.create(name, body, version, self._settings.kms_key_id)
                return version
            except _Refused:  # created meanwhile: by a concurrent writer, or by our own timed-out call
                meta = self._kv.describe(name)
                if meta is None:
                    raise BackendUnavailable(f"{where}: was created and deleted during the write") from None
        self._usable(name, meta)
        current = meta.current
        if _written_by(current, request_id):
            assert current is not None
            self._clear_pending(name, meta, keep=None)  # a crash before the last call left it
            return current  # a retry of a write that already happened
        if expected != current:
            raise ConflictError(
                f"{where}: expected "
                f"{'no version (create)' if expected is None else f'version {expected}'}, "
                f"but the current version is {'none' if current is None else current}"
            )
        if not meta.managed:  # adopt_unmanaged, checked by _usable: take it over
            self._kv.tag_managed(name)
        version = version_id_for(request_id, expected)
        self._clear_pending(name, meta, keep=version)  # left by an abandoned earlier attempt
        labels: tuple[str, ...] | None = meta.stages.get(version)
        if labels is None:
            labels = self._kv.put_pending(name, body, version)
            # None: the version exists unlabelled with the body of an interrupted attempt.  Versions
            # are immutable, and that body was computed from ``expected`` too: publish it.
        self._crash_point("aws.pending")
        if not (labels and CURRENT in labels):  # the first value of an empty secret is current at once
            try:
                self._kv.move_label(name, CURRENT, version, expected)
            except _Refused as exc:
                after = self._kv.describe(name)
                if after is None or after.current != version:  # not our own earlier move: we lost
                    self._kv.remove_label(name, PENDING, version)
                    raise ConflictError(
                        f"{where}: changed concurrently; version {expected} is no longer current"
                    ) from exc
        self._kv.remove_label(name, PENDING, version)
        return version

    def _clear_pending(self, name: str, meta: SecretMeta, keep: str | None) -> None:
        for version in meta.pending:
            if version != keep:
                self._kv.remove_label(name, PENDING, version)

    @staticmethod
    def _crash_point(point: str) -> None:
        if point in os.environ.get(_CRASH_ENV, "").split(","):
            log.warning("test crash point reached", extra={"point": point})
            os.kill(os.getpid(), signal.SIGKILL)
