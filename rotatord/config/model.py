"""Typed, frozen settings.  Each component receives only its own slice of these."""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import MappingProxyType, UnionType
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    WrapSerializer,
    field_validator,
)

from ..timeutil import parse_duration

__all__ = [
    "BASE_DIR",
    "METRICS_OFF",
    "NAME_RE",
    "PATH_RE",
    "SOCKET_MODE_RE",
    "TOKEN_PREFIX_RE",
    "BackendSettings",
    "backend_kinds",
    "ConsumerSettings",
    "EVENT_TYPES",
    "DaemonSettings",
    "NotifySettings",
    "AwsBackendSettings",
    "CredentialRef",
    "FileBackendSettings",
    "VaultBackendSettings",
    "FilesStoreSettings",
    "HOOK_PHASES",
    "HookSettings",
    "listen_address",
    "RedisStoreSettings",
    "SecretSettings",
    "SqlStoreSettings",
    "StoreSettings",
    "Settings",
]

#: Directory that relative paths in the configuration are resolved against (the file's own).
BASE_DIR: ContextVar[Path | None] = ContextVar("rotatord_config_base_dir", default=None)
NAME_RE = r"^[a-z0-9][a-z0-9._-]{0,62}$"
PATH_RE = r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$"
SOCKET_MODE_RE = r"^0?[0-7]{3}$"
INSTANCE_RE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
TOKEN_PREFIX_RE = r"^[a-z][a-z0-9]{1,15}$"  # noqa: S105 - a pattern, not a password
_V = TypeVar("_V")


def _resolve(path: Path) -> Path:
    return path if path.is_absolute() else (BASE_DIR.get() or Path.cwd()) / path


def _duration(value: object) -> timedelta:
    if isinstance(value, timedelta):
        return value
    return parse_duration(value)  # type: ignore[arg-type]


def _non_negative(value: timedelta) -> timedelta:
    if value < timedelta(0):
        raise ValueError("must not be negative")
    return value


def _dump_mapping(value: Mapping[str, Any], handler: SerializerFunctionWrapHandler) -> Any:
    return handler(dict(value))


def _empty_mapping() -> Mapping[str, Any]:
    return MappingProxyType({})


RelPath = Annotated[Path, AfterValidator(_resolve)]
Duration = Annotated[timedelta, BeforeValidator(_duration), AfterValidator(_non_negative)]
Name = Annotated[str, Field(pattern=NAME_RE)]
#: The value of ``daemon.metrics`` that switches the HTTP endpoint (metrics and /healthz) off.
METRICS_OFF = "off"


def listen_address(value: str) -> tuple[str, int] | None:
    """``"host:port"`` (an IP address or ``localhost``; IPv6 in brackets) -> (ip, port); ``"off"`` -> None.

    Raises ValueError naming the accepted forms.  Host names other than ``localhost`` are refused:
    the address to bind must not depend on DNS.
    """
    if value == METRICS_OFF:
        return None
    host, sep, port_text = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        host = ""  # an IPv6 address without brackets: the port is ambiguous
    if host == "localhost":
        host = "127.0.0.1"
    try:
        ip = ipaddress.ip_address(host)
        port = int(port_text) if port_text.isdigit() else -1
    except ValueError:
        port = -1
    if not sep or port < 1 or port > 65535:
        raise ValueError(
            f'must be "host:port" (an IP address or localhost, IPv6 in brackets, port 1-65535) '
            f'or "{METRICS_OFF}", not {value!r}'
        )
    return str(ip), port


def _metrics_address(value: str) -> str:
    listen_address(value)
    return value


CredentialName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,128}$")]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DaemonSettings(_Frozen):
    state_dir: RelPath = Path("/var/lib/rotatord")
    state_url: str | None = None
    control_socket: RelPath | None = None
    socket_group: str | None = None
    socket_mode: Annotated[str, Field(pattern=SOCKET_MODE_RE)] = "0660"
    audit_log: RelPath | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    startup_jitter: Duration = timedelta(seconds=30)
    step_retry_initial: Duration = timedelta(seconds=5)
    step_retry_max: Duration = timedelta(minutes=10)
    #: Prometheus /metrics and /healthz over HTTP: "host:port", or "off".
    metrics: Annotated[str, AfterValidator(_metrics_address)] = "127.0.0.1:9464"
    #: How often every managed secret is compared with what rotatord last wrote (drift check);
    #: also how long a secret paused by drift waits between looks.
    drift_check_interval: Duration = timedelta(minutes=5)

    @field_validator("drift_check_interval")
    @classmethod
    def _drift_interval_floor(cls, value: timedelta) -> timedelta:
        if value < timedelta(seconds=1):
            raise ValueError("must be at least 1s")
        return value

    # Several instances on one PostgreSQL state database (rotatord.daemon.leader).
    instance_name: Annotated[str, Field(pattern=INSTANCE_RE)] | None = None
    lease_ttl: Duration = timedelta(seconds=15)
    lease_renew: Duration | None = None

    @property
    def instance(self) -> str:
        """This instance's name in the leader lease: ``instance_name``, else the host name."""
        if self.instance_name:
            return self.instance_name
        host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:63].lstrip("._-")
        return host or "rotatord"

    @property
    def lease_renew_every(self) -> timedelta:
        return self.lease_renew if self.lease_renew is not None else self.lease_ttl / 3

    @property
    def database_url(self) -> str:
        return self.state_url or f"sqlite:///{self.state_dir / 'state.db'}"

    @property
    def socket_path(self) -> Path:
        return self.control_socket or self.state_dir / "control.sock"

    @property
    def audit_path(self) -> Path:
        return self.audit_log or self.state_dir / "audit.log"

    @property
    def socket_mode_int(self) -> int:
        return int(self.socket_mode, 8)

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """Where to serve /metrics and /healthz, or None when switched off."""
        return listen_address(self.metrics)


@dataclass(frozen=True)
class CredentialRef:
    """A secret-bearing value held by reference: ``<name>_file`` or ``<name>_credential``."""

    name: str
    file: Path | None
    credential: str | None
    required: bool

    @property
    def is_set(self) -> bool:
        return self.file is not None or self.credential is not None


class FileBackendSettings(_Frozen):
    kind: Literal["file"]
    directory: RelPath
    master_key_file: RelPath | None = None
    master_key_credential: CredentialName | None = None
    max_versions: Annotated[int, Field(ge=2, le=1000)] = 20

    def credential_refs(self) -> tuple[CredentialRef, ...]:
        return (CredentialRef("master_key", self.master_key_file, self.master_key_credential, True),)


URL_RE = r"^https?://[^/@\s]+(/[^@\s]*)?$"
KV_MOUNT_RE = r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$"
PREFIX_RE = r"^([A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*)?$"


class VaultBackendSettings(_Frozen):
    """HashiCorp Vault or OpenBao, KV version 2, through hvac."""

    kind: Literal["vault"]
    address: Annotated[str, Field(pattern=URL_RE)]
    mount: Annotated[str, Field(pattern=KV_MOUNT_RE)] = "secret"
    path_prefix: Annotated[str, Field(pattern=PREFIX_RE)] = ""
    namespace: str | None = None
    ca_bundle: RelPath | None = None
    tls_verify: bool = True
    timeout: Duration = timedelta(seconds=10)
    auth: Literal["token", "approle"] = "token"
    auth_mount: Annotated[str, Field(pattern=KV_MOUNT_RE)] = "approle"
    token_file: RelPath | None = None
    token_credential: CredentialName | None = None
    role_id_file: RelPath | None = None
    role_id_credential: CredentialName | None = None
    secret_id_file: RelPath | None = None
    secret_id_credential: CredentialName | None = None
    #: KV versions kept per path (rotatord sets it with cas_required on the paths it owns).
    max_versions: Annotated[int, Field(ge=3, le=1000)] = 20
    #: Attempts inside one step for transient failures (sealed, 5xx, connection refused, timeouts).
    transient_retries: Annotated[int, Field(ge=0, le=10)] = 3

    def credential_refs(self) -> tuple[CredentialRef, ...]:
        if self.auth == "token":
            return (CredentialRef("token", self.token_file, self.token_credential, True),)
        return (
            CredentialRef("role_id", self.role_id_file, self.role_id_credential, True),
            CredentialRef("secret_id", self.secret_id_file, self.secret_id_credential, True),
        )


class AwsBackendSettings(_Frozen):
    """AWS Secrets Manager through boto3; rotatord drives the staging labels itself."""

    kind: Literal["aws"]
    region: Annotated[str, Field(pattern=r"^[a-z]{2}(-[a-z]+)+-\d$")]
    endpoint_url: Annotated[str, Field(pattern=URL_RE)] | None = None
    profile: str | None = None
    #: A shared-credentials file (the AWS CLI format); else boto3's default chain (env, role).
    credentials_file: RelPath | None = None
    credentials_credential: CredentialName | None = None
    kms_key_id: str | None = None
    path_prefix: Annotated[str, Field(pattern=PREFIX_RE)] = ""
    #: Take over an existing secret that lacks rotatord's management tag (refused by default).
    adopt_unmanaged: bool = False
    timeout: Duration = timedelta(seconds=10)
    transient_retries: Annotated[int, Field(ge=0, le=10)] = 3

    def credential_refs(self) -> tuple[CredentialRef, ...]:
        return (CredentialRef("credentials", self.credentials_file, self.credentials_credential, False),)


# One entry per backend kind.
BackendSettings = Annotated[
    FileBackendSettings | VaultBackendSettings | AwsBackendSettings, Field(discriminator="kind")
]


def backend_kinds() -> tuple[str, ...]:
    """The ``kind`` values the configuration accepts, read from :data:`BackendSettings` itself."""
    union = get_args(BackendSettings)[0]
    members = get_args(union) if get_origin(union) in (Union, UnionType) else (union,)
    return tuple(kind for member in members for kind in get_args(member.model_fields["kind"].annotation))


EventType = Literal[
    "key.staged",
    "key.promoted",
    "key.retired",
    "token.issued",
    "token.revoked",
    "rotation.failed",
    "rotation.rolled_back",
    "secret.drift_detected",
    "credential.revoked_use",
]
EVENT_TYPES: tuple[EventType, ...] = get_args(EventType)


class ConsumerSettings(_Frozen):
    """A bot told about rotations by signed webhook; its 2xx means "I re-read the secret"."""

    url: Annotated[str, Field(pattern=URL_RE)]
    #: A managed secret of kind webhook_secret whose current (and, while it rotates, previous)
    #: value signs every request (Standard Webhooks ``webhook-signature``).
    signing_secret: Name
    #: The events this consumer wants; all by default.
    events: tuple[EventType, ...] = EVENT_TYPES
    #: Its acknowledgement of key.staged gates promotion (see notify.on_unacknowledged).
    required: bool = False
    timeout: Duration = timedelta(seconds=15)


class NotifySettings(_Frozen):
    """Webhook delivery: targets allowed, retry schedule, what happens without acknowledgement."""

    #: Hosts (exact names) and networks (CIDR) webhooks may go to.  Checked after DNS resolution;
    #: loopback and private ranges only when listed here; link-local / metadata never.
    allow: tuple[Annotated[str, Field(min_length=1, max_length=253)], ...] = ()
    #: Delays before each attempt, counted from the previous failure (Svix's schedule).
    retry_schedule: tuple[Duration, ...] = (
        timedelta(0),
        timedelta(seconds=5),
        timedelta(minutes=5),
        timedelta(minutes=30),
        timedelta(hours=2),
        timedelta(hours=5),
        timedelta(hours=10),
        timedelta(hours=10),
    )
    #: An endpoint failing every attempt for this long is marked failing (and alerted on).
    failing_after: Duration = timedelta(days=5)
    #: Deliveries in flight at once.
    concurrency: Annotated[int, Field(ge=1, le=10_000)] = 200
    #: CA bundle for HTTPS targets (default: the system's).  Verification is always on.
    ca_bundle: RelPath | None = None
    #: When the propagation window ends before every required consumer acknowledged key.staged:
    #: "promote" anyway (and alert) or "hold" the rotation at staged (and alert).
    on_unacknowledged: Literal["promote", "hold"] = "promote"
    #: Consumers (names under [consumers]) that also receive the security events of every
    #: secret: secret.drift_detected and credential.revoked_use.
    security_consumers: tuple[Name, ...] = ()


IDENT_RE = r"^[A-Za-z_][A-Za-z0-9_]{0,62}(\.[A-Za-z_][A-Za-z0-9_]{0,62})?$"
Identifier = Annotated[str, Field(pattern=IDENT_RE)]
RateLimit = Annotated[float, Field(gt=0)]
BatchSize = Annotated[int, Field(ge=1, le=100_000)]


class SqlStoreSettings(_Frozen):
    """Rows of one table: SQLite, PostgreSQL (psycopg 3) or MariaDB/MySQL, through SQLAlchemy Core."""

    kind: Literal["sql"]
    #: The SQLAlchemy URL holds a password, so it is only referenced (a 0600 file or a credential).
    url_file: RelPath | None = None
    url_credential: CredentialName | None = None
    table: Identifier
    key: Annotated[tuple[Identifier, ...], Field(min_length=1)]
    columns: Annotated[tuple[Identifier, ...], Field(min_length=1)]
    #: Optional SQL filter (trusted text from the operator), e.g. "tenant_id = 7".
    where: Annotated[str, Field(max_length=1000)] | None = None
    batch_size: BatchSize = 1000
    rate_limit: RateLimit | None = None

    def credential_refs(self) -> tuple[CredentialRef, ...]:
        return (CredentialRef("url", self.url_file, self.url_credential, True),)


class FilesStoreSettings(_Frozen):
    """Files under ``directory`` matching ``pattern``, each holding one Fernet token."""

    kind: Literal["files"]
    directory: RelPath
    pattern: Annotated[str, Field(min_length=1, max_length=256)] = "**/*"
    batch_size: BatchSize = 500
    rate_limit: RateLimit | None = None

    def credential_refs(self) -> tuple[CredentialRef, ...]:
        return ()


class RedisStoreSettings(_Frozen):
    """Keys matching ``pattern`` (walked with SCAN): string values, or the named fields of hashes."""

    kind: Literal["redis"]
    url_file: RelPath | None = None
    url_credential: CredentialName | None = None
    pattern: Annotated[str, Field(min_length=1, max_length=256)]
    #: Empty: the keys hold strings.  Otherwise: the keys are hashes and these fields hold tokens.
    hash_fields: tuple[Annotated[str, Field(min_length=1, max_length=256)], ...] = ()
    batch_size: BatchSize = 500
    rate_limit: RateLimit | None = None

    def credential_refs(self) -> tuple[CredentialRef, ...]:
        return (CredentialRef("url", self.url_file, self.url_credential, True),)


StoreSettings = Annotated[SqlStoreSettings | FilesStoreSettings | RedisStoreSettings, Field(discriminator="kind")]


HookPhase = Literal["staged", "promoted", "reencrypted", "retired", "issued", "revoked", "failed", "drift"]
HOOK_PHASES: tuple[HookPhase, ...] = get_args(HookPhase)
ENV_NAME_RE = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"
HOOK_NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"


def _hook_program(argv: tuple[str, ...]) -> tuple[str, ...]:
    # No shell and no $PATH lookup: the program is a path, resolved like every other path here.
    if not argv:
        return argv
    program = argv[0]
    if "/" not in program:
        raise ValueError(f"the program must be a path, not {program!r} (no $PATH lookup; e.g. '/usr/bin/{program}')")
    return (str(_resolve(Path(program))), *argv[1:])


def _no_reserved_env(env: Mapping[str, str]) -> Mapping[str, str]:
    reserved = sorted(k for k in env if k.upper().startswith("ROTATORD_"))
    if reserved:
        raise ValueError(f"names starting with ROTATORD_ are set by rotatord itself: {', '.join(reserved)}")
    return env


HookArgv = Annotated[
    tuple[Annotated[str, Field(min_length=1, max_length=4096)], ...],
    Field(min_length=1, max_length=256),
    AfterValidator(_hook_program),
]
HookEnv = Annotated[
    Mapping[Annotated[str, Field(pattern=ENV_NAME_RE)], Annotated[str, Field(max_length=4096)]],
    AfterValidator(_no_reserved_env),
    AfterValidator(MappingProxyType),
    WrapSerializer(_dump_mapping),
]


class HookSettings(_Frozen):
    """A command run after a lifecycle phase (certbot's deploy hooks): no shell, a clean environment,
    the event as JSON on stdin.  Secret material goes only to stdin, and only with ``with_secret``."""

    #: Shown in logs, audit records and ``status`` (default: hooks[i] / <secret>.hooks[i]).
    name: Annotated[str, Field(pattern=HOOK_NAME_RE)] | None = None
    command: HookArgv
    phases: Annotated[tuple[HookPhase, ...], Field(min_length=1)]
    timeout: Duration = timedelta(seconds=60)
    on_failure: Literal["ignore", "retry", "block"] = "ignore"
    with_secret: bool = False
    env: HookEnv = Field(default_factory=_empty_mapping)

    @field_validator("timeout")
    @classmethod
    def _timeout_range(cls, value: timedelta) -> timedelta:
        if not timedelta(seconds=1) <= value <= timedelta(hours=1):
            raise ValueError("must be between 1s and 1h")
        return value


class SecretSettings(_Frozen):
    name: Name
    kind: Literal["fernet", "api_token", "webhook_secret"]
    backend: Name
    path: Annotated[str, Field(pattern=PATH_RE, max_length=512)]
    every: Duration | None = None
    cron: str | None = None
    grace: Duration = timedelta(days=7)
    propagation: Duration = timedelta(minutes=10)
    keep: Annotated[int, Field(ge=0, le=16)] = 0
    consumers: tuple[Name, ...] = ()
    token_prefix: Annotated[str, Field(pattern=TOKEN_PREFIX_RE)] | None = None
    token_ttl: Duration | None = None
    #: Data re-encrypted under the new key (fernet only).
    stores: tuple[StoreSettings, ...] = ()
    #: Commands run after this secret's phases (after the global [[hooks]]).
    hooks: tuple[HookSettings, ...] = ()

    @field_validator("path")
    @classmethod
    def _no_dot_segments(cls, value: str) -> str:
        if any(part in (".", "..") for part in value.split("/")):
            raise ValueError("must not contain '.' or '..' segments")
        return value

    @field_validator("every")
    @classmethod
    def _positive_every(cls, value: timedelta | None) -> timedelta | None:
        if value is not None and value < timedelta(seconds=10):
            raise ValueError("must be at least 10s")
        return value

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str | None) -> str | None:
        if value is not None:
            from ..schedule import validate_cron

            validate_cron(value)
        return value


# Frozen models alone would still hand out mutable dicts; a read-only view keeps the sections
# as immutable as the models inside them (assignment raises TypeError).
FrozenMapping = Annotated[Mapping[Name, _V], AfterValidator(MappingProxyType), WrapSerializer(_dump_mapping)]


class Settings(_Frozen):
    daemon: DaemonSettings = DaemonSettings()
    backends: FrozenMapping[BackendSettings] = Field(default_factory=_empty_mapping)
    consumers: FrozenMapping[ConsumerSettings] = Field(default_factory=_empty_mapping)
    notify: NotifySettings = NotifySettings()
    secrets: tuple[SecretSettings, ...] = ()
    #: Commands run after the phases of every secret.
    hooks: tuple[HookSettings, ...] = ()

    def secret(self, name: str) -> SecretSettings | None:
        return next((s for s in self.secrets if s.name == name), None)
