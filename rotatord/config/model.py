"""Typed, frozen settings.  Each component receives only its own slice of these."""

from __future__ import annotations

from contextvars import ContextVar
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from ..timeutil import parse_duration

__all__ = [
    "BASE_DIR",
    "BackendSettings",
    "ConsumerSettings",
    "DaemonSettings",
    "FileBackendSettings",
    "SecretSettings",
    "Settings",
]

#: Directory that relative paths in the configuration are resolved against (the file's own).
BASE_DIR: ContextVar[Path | None] = ContextVar("rotatord_config_base_dir", default=None)
NAME_RE = r"^[a-z0-9][a-z0-9._-]{0,62}$"


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


RelPath = Annotated[Path, AfterValidator(_resolve)]
Duration = Annotated[timedelta, BeforeValidator(_duration), AfterValidator(_non_negative)]
Name = Annotated[str, Field(pattern=NAME_RE)]
CredentialName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,128}$")]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DaemonSettings(_Frozen):
    state_dir: RelPath = Path("/var/lib/rotatord")
    state_url: str | None = None
    control_socket: RelPath | None = None
    socket_group: str | None = None
    socket_mode: Annotated[str, Field(pattern=r"^0?[0-7]{3}$")] = "0660"
    audit_log: RelPath | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    startup_jitter: Duration = timedelta(seconds=30)
    step_retry_initial: Duration = timedelta(seconds=5)
    step_retry_max: Duration = timedelta(minutes=10)

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


class FileBackendSettings(_Frozen):
    kind: Literal["file"]
    directory: RelPath
    master_key_file: RelPath | None = None
    master_key_credential: CredentialName | None = None
    max_versions: Annotated[int, Field(ge=2, le=1000)] = 20


# One entry per backend kind; later kinds join this union.
BackendSettings = Annotated[FileBackendSettings, Field(discriminator="kind")]


class ConsumerSettings(_Frozen):
    url: Annotated[str, Field(pattern=r"^https?://")]
    signing_secret: Name | None = None
    required: bool = False
    timeout: Duration = timedelta(seconds=15)


class SecretSettings(_Frozen):
    name: Name
    kind: Literal["fernet", "api_token", "webhook_secret"]
    backend: Name
    path: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$", max_length=512)]
    every: Duration | None = None
    cron: str | None = None
    grace: Duration = timedelta(days=7)
    propagation: Duration = timedelta(minutes=10)
    keep: Annotated[int, Field(ge=0, le=16)] = 0
    consumers: tuple[Name, ...] = ()
    token_prefix: Annotated[str, Field(pattern=r"^[a-z][a-z0-9]{1,15}$")] | None = None
    token_ttl: Duration | None = None

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


class Settings(_Frozen):
    daemon: DaemonSettings = DaemonSettings()
    backends: dict[Name, BackendSettings] = {}
    consumers: dict[Name, ConsumerSettings] = {}
    secrets: tuple[SecretSettings, ...] = ()

    def secret(self, name: str) -> SecretSettings | None:
        return next((s for s in self.secrets if s.name == name), None)
