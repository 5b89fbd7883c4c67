"""Read the TOML file and ``ROTATORD_`` environment overrides into frozen :class:`Settings`.

Everything is validated before anything runs; every problem is reported with its TOML path
(``secrets[1].every: ...``) and the whole load fails with :class:`ConfigError` (exit 78).
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from ..errors import ConfigError
from .model import BASE_DIR, Settings

__all__ = ["DEFAULT_PATH", "config_path", "load_settings"]

DEFAULT_PATH = Path("/etc/rotatord/config.toml")
_BACKEND_KINDS = {"file", "vault", "aws"}
_MESSAGES = {
    "Extra inputs are not permitted": "unknown key",
    "Field required": "missing required key",
}


class _EnvAwareSettings(BaseSettings, Settings):
    """Settings with ``ROTATORD_SECTION__KEY`` environment overrides on top of the TOML data."""

    model_config = SettingsConfigDict(env_prefix="ROTATORD_", env_nested_delimiter="__", extra="forbid", frozen=True)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (env_settings, init_settings)


def config_path(explicit: str | os.PathLike[str] | None) -> Path:
    """``--config`` if given, else ``$ROTATORD_CONFIG``, else /etc/rotatord/config.toml."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("ROTATORD_CONFIG")
    return Path(env) if env else DEFAULT_PATH


def load_settings(path: Path) -> Settings:
    """Parse, validate and cross-check the configuration file at ``path``."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read configuration ({exc.strerror})") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    token = BASE_DIR.set(path.resolve().parent)
    try:
        settings = _EnvAwareSettings(**data)
    except ValidationError as exc:
        raise ConfigError([_format_error(err, data) for err in exc.errors()]) from None
    finally:
        BASE_DIR.reset(token)
    problems = cross_check(settings)
    if problems:
        raise ConfigError(problems)
    return settings


def _format_loc(loc: tuple[int | str, ...], data: dict[str, Any]) -> str:
    out = ""
    parts = list(loc)
    i = 0
    while i < len(parts):
        part = parts[i]
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
        # A discriminated union puts its tag into the location; the TOML path has no such level.
        if i >= 1 and parts[i - 1] == "backends" and i + 1 < len(parts) and parts[i + 1] in _BACKEND_KINDS:
            i += 1
        i += 1
    if len(loc) >= 2 and loc[0] == "secrets" and isinstance(loc[1], int):
        secrets = data.get("secrets")
        if isinstance(secrets, list) and loc[1] < len(secrets) and isinstance(secrets[loc[1]], dict):
            name = secrets[loc[1]].get("name")
            if isinstance(name, str):
                out += f" (secret {name!r})"
    return out or "(top level)"


def _format_error(err: Any, data: dict[str, Any]) -> str:
    msg = str(err["msg"])
    msg = _MESSAGES.get(msg, msg)
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if err["type"] == "union_tag_invalid":
        msg = "unknown kind (expected one of: file)"
    return f"{_format_loc(tuple(err['loc']), data)}: {msg}"


def cross_check(settings: Settings) -> list[str]:
    """Problems that span several fields: names, references between sections, kind rules."""
    problems: list[str] = []
    seen_names: dict[str, int] = {}
    seen_paths: dict[tuple[str, str], str] = {}
    for i, backend in settings.backends.items():
        if (backend.master_key_file is None) == (backend.master_key_credential is None):
            problems.append(f"backends.{i}: set exactly one of master_key_file, master_key_credential")
    for idx, s in enumerate(settings.secrets):
        where = f"secrets[{idx}] (secret {s.name!r})"
        if s.name in seen_names:
            problems.append(
                f"secrets[{idx}].name: duplicate secret name {s.name!r} (also secrets[{seen_names[s.name]}])"
            )
        seen_names.setdefault(s.name, idx)
        if s.backend not in settings.backends:
            known = ", ".join(sorted(settings.backends)) or "none defined"
            problems.append(f"secrets[{idx}].backend: unknown backend {s.backend!r} (known: {known})")
        else:
            key = (s.backend, s.path)
            if key in seen_paths:
                problems.append(f"secrets[{idx}].path: {s.path!r} is already used by secret {seen_paths[key]!r}")
            seen_paths.setdefault(key, s.name)
        if (s.every is None) == (s.cron is None):
            problems.append(f"{where}: set exactly one of 'every' and 'cron'")
        if s.kind != "api_token":
            for field_name in ("token_prefix", "token_ttl"):
                if getattr(s, field_name) is not None:
                    problems.append(f"secrets[{idx}].{field_name}: only applies to kind 'api_token'")
        if s.kind != "fernet" and s.keep:
            problems.append(f"secrets[{idx}].keep: only applies to kind 'fernet'")
        for c in s.consumers:
            if c not in settings.consumers:
                problems.append(f"secrets[{idx}].consumers: consumer {c!r} is not defined under [consumers]")
    kinds = {s.name: s.kind for s in settings.secrets}
    for cname, consumer in settings.consumers.items():
        ref = consumer.signing_secret
        if ref is not None and kinds.get(ref) != "webhook_secret":
            problems.append(
                f"consumers.{cname}.signing_secret: {ref!r} is not a managed secret of kind 'webhook_secret'"
            )
    return problems
