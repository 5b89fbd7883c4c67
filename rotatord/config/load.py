"""Read the TOML file and ``ROTATORD_`` environment overrides into frozen :class:`Settings`.

Everything is validated before anything runs; every problem is reported with its TOML path
(``secrets[1].every: ...``) and the whole load fails with :class:`ConfigError` (exit 78).
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from ..errors import ConfigError
from ..logs import redact_text
from .model import (
    BASE_DIR,
    ENV_NAME_RE,
    HOOK_NAME_RE,
    NAME_RE,
    PATH_RE,
    SOCKET_MODE_RE,
    TOKEN_PREFIX_RE,
    HookSettings,
    Settings,
    backend_kinds,
)

__all__ = ["DEFAULT_PATH", "ENV_PREFIX", "config_path", "cross_check", "load_settings"]

DEFAULT_PATH = Path("/etc/rotatord/config.toml")
ENV_PREFIX = "ROTATORD_"
_MESSAGES = {
    "Extra inputs are not permitted": "unknown key",
    "Field required": "missing required key",
}
# pydantic would quote the regular expression; an operator wants to read the rule instead.
_PATTERN_HINTS = {
    NAME_RE: "must be 1 to 63 lowercase letters, digits, '.', '_' or '-', starting with a letter or digit",
    PATH_RE: "must be segments of letters, digits, '.', '_' or '-' separated by single '/' (no leading '/')",
    SOCKET_MODE_RE: "must be an octal file mode such as '0660'",
    TOKEN_PREFIX_RE: "must be 2 to 16 lowercase letters and digits, starting with a letter",
    HOOK_NAME_RE: "must be 1 to 63 letters, digits, '.', '_' or '-', starting with a letter or digit",
    ENV_NAME_RE: "must be an environment variable name (letters, digits, '_'; not starting with a digit)",
}
# The phases each kind goes through.  api_token / webhook_secret: a hook listing "promoted" also
# runs at "issued" (the new credential is the one in use) and "retired" at "revoked".
_KIND_PHASES = {
    "fernet": {"staged", "promoted", "reencrypted", "retired", "failed", "drift"},
    "api_token": {"issued", "revoked", "promoted", "retired", "failed", "drift"},
    "webhook_secret": {"issued", "revoked", "promoted", "retired", "failed", "drift"},
}


class _EnvAwareSettings(BaseSettings, Settings):
    """Settings with ``ROTATORD_SECTION__KEY`` environment overrides on top of the TOML data."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", frozen=True)

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
    """Parse, validate and cross-check the configuration file at ``path``.

    Raises :class:`ConfigError` listing every problem, each prefixed with its TOML path (and the
    environment variable, when an override supplied the value).  Reads files; creates nothing.
    """
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
    except SettingsError as exc:
        # A whole section overridden from the environment must be JSON; pydantic-settings
        # raises before validation, with the field name only in its message.
        raise ConfigError(_env_decode_problem(str(exc))) from None
    finally:
        BASE_DIR.reset(token)
    problems = cross_check(settings)
    if problems:
        raise ConfigError(problems)
    return settings


def _env_decode_problem(message: str) -> str:
    match = re.search(r'field "([^"]+)"', message)
    if match is None:
        return f"environment override ({ENV_PREFIX}*): {message}"
    field = match.group(1)
    return (
        f"{field} (from ${ENV_PREFIX}{field.upper()}): not valid JSON "
        "(a whole section overridden from the environment is a JSON object or array)"
    )


def _env_source(loc: tuple[int | str, ...]) -> str | None:
    """The ``ROTATORD_`` variable that supplied the value at ``loc``, if one did."""
    keys: list[str] = []
    for part in loc:
        if isinstance(part, int):
            break
        keys.append(str(part))
    present = {name.upper() for name in os.environ}
    # The longest match wins: ROTATORD_DAEMON__LOG_LEVEL before a whole-section ROTATORD_DAEMON.
    for n in range(len(keys), 0, -1):
        name = ENV_PREFIX + "__".join(keys[:n]).upper()
        if name in present:
            return name
    return None


def _format_loc(loc: tuple[int | str, ...], data: dict[str, Any]) -> str:
    kinds = set(backend_kinds())
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
        if i == 1 and parts[0] == "backends" and i + 1 < len(parts) and parts[i + 1] in kinds:
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
    loc = tuple(err["loc"])
    msg = str(err["msg"])
    msg = _MESSAGES.get(msg, msg)
    if msg.startswith("Input should be a valid dictionary"):
        msg = "expected a table"
    elif msg in ("Input should be a valid tuple", "Input should be a valid list"):
        msg = "expected an array"
    elif msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    ctx = err.get("ctx") or {}
    expected = ", ".join(backend_kinds())
    if err["type"] == "union_tag_invalid":
        loc += ("kind",)
        msg = f"unknown kind {ctx.get('tag')!r} (expected one of: {expected})"
    elif err["type"] == "union_tag_not_found":
        loc += ("kind",)
        msg = f"missing required key (expected one of: {expected})"
    elif err["type"] == "string_pattern_mismatch" and ctx.get("pattern") in _PATTERN_HINTS:
        msg = f"{_PATTERN_HINTS[ctx['pattern']]}, not {err['input']!r}"
    where = _format_loc(loc, data)
    source = _env_source(loc)
    if source is not None:
        where += f" (from ${source})"
    return f"{where}: {msg}"


def cross_check(settings: Settings) -> list[str]:
    """Problems that span several fields: names, references between sections, kind rules.

    Each problem starts with the TOML path of the key to change (the same form as
    :func:`load_settings` uses); an empty list means the settings are consistent.
    """
    problems: list[str] = []
    daemon = settings.daemon
    if daemon.lease_ttl < timedelta(seconds=2):
        problems.append("daemon.lease_ttl: must be at least 2s")
    elif daemon.lease_renew_every * 2 > daemon.lease_ttl or daemon.lease_renew_every <= timedelta(0):
        problems.append("daemon.lease_renew: must be more than 0s and at most half of daemon.lease_ttl")
    for bname, backend in settings.backends.items():
        for ref in backend.credential_refs():
            if ref.file is not None and ref.credential is not None:
                problems.append(
                    f"backends.{bname}.{ref.name}_credential: set only one of {ref.name}_file and {ref.name}_credential"
                )
            elif ref.required and not ref.is_set:
                problems.append(
                    f"backends.{bname}.{ref.name}_file: missing: set {ref.name}_file (a path) "
                    f"or {ref.name}_credential (a name under $CREDENTIALS_DIRECTORY)"
                )
    seen_names: dict[str, int] = {}
    seen_paths: dict[tuple[str, str], str] = {}
    for idx, s in enumerate(settings.secrets):

        def at(field: str, idx: int = idx, name: str = s.name) -> str:
            return f"secrets[{idx}].{field} (secret {name!r})"

        if s.name in seen_names:
            problems.append(f"{at('name')}: duplicate secret name (also secrets[{seen_names[s.name]}])")
        seen_names.setdefault(s.name, idx)
        if s.backend not in settings.backends:
            known = ", ".join(sorted(settings.backends)) or "none defined"
            problems.append(f"{at('backend')}: unknown backend {s.backend!r} (defined: {known})")
        else:
            key = (s.backend, s.path)
            if key in seen_paths:
                problems.append(
                    f"{at('path')}: {s.path!r} on backend {s.backend!r} is already used by secret {seen_paths[key]!r}"
                )
            seen_paths.setdefault(key, s.name)
        if s.every is not None and s.cron is not None:
            problems.append(f"{at('cron')}: 'every' is set too; set only one of 'every' and 'cron'")
        elif s.every is None and s.cron is None:
            problems.append(f"{at('every')}: missing: set 'every' (a period such as '30d') or 'cron' (a crontab)")
        if s.kind != "api_token":
            for field_name in ("token_prefix", "token_ttl"):
                if getattr(s, field_name) is not None:
                    problems.append(f"{at(field_name)}: only applies to kind 'api_token', not {s.kind!r}")
        if s.kind != "fernet" and s.stores:
            problems.append(f"{at('stores')}: only applies to kind 'fernet', not {s.kind!r}")
        for sidx, store in enumerate(s.stores):
            for ref in store.credential_refs():
                field = f"stores[{sidx}].{ref.name}"
                if ref.file is not None and ref.credential is not None:
                    problems.append(
                        f"{at(field + '_credential')}: set only one of {ref.name}_file and {ref.name}_credential"
                    )
                elif ref.required and not ref.is_set:
                    problems.append(f"{at(field + '_file')}: missing: set {ref.name}_file or {ref.name}_credential")
        if s.kind != "fernet" and s.keep:
            problems.append(f"{at('keep')}: only applies to kind 'fernet', not {s.kind!r}")
        for c in s.consumers:
            if c not in settings.consumers:
                problems.append(f"{at('consumers')}: consumer {c!r} is not defined under [consumers]")
        problems.extend(_hook_problems(s.hooks, at))
        for hidx, hook in enumerate(s.hooks):
            never = [p for p in hook.phases if p not in _KIND_PHASES[s.kind]]
            if never:
                problems.append(f"{at(f'hooks[{hidx}].phases')}: not a phase of a {s.kind} secret: {', '.join(never)}")
    problems.extend(_hook_problems(settings.hooks, str))
    for idx, c in enumerate(settings.notify.security_consumers):
        if c not in settings.consumers:
            problems.append(f"notify.security_consumers[{idx}]: consumer {c!r} is not defined under [consumers]")
    if settings.consumers or settings.notify.allow:
        from ..notify.ssrf import config_problems

        problems.extend(config_problems(settings.consumers, settings.notify.allow))
    kinds = {s.name: s.kind for s in settings.secrets}
    for cname, consumer in settings.consumers.items():
        signing = consumer.signing_secret
        if signing is not None and kinds.get(signing) != "webhook_secret":
            what = "not a managed secret" if signing not in kinds else f"of kind {kinds[signing]!r}"
            problems.append(
                f"consumers.{cname}.signing_secret: {signing!r} is {what}; "
                "it must name a secret of kind 'webhook_secret'"
            )
    return problems


def _hook_problems(hooks: tuple[HookSettings, ...], at: Callable[[str], str]) -> list[str]:
    """Two hooks of one scope with the same command would share their run records."""
    problems: list[str] = []
    seen: dict[tuple[str, ...], int] = {}
    names: dict[str, int] = {}
    for idx, hook in enumerate(hooks):
        if hook.command in seen:
            first = seen[hook.command]
            problems.append(f"{at(f'hooks[{idx}].command')}: the same command as hooks[{first}]; merge their phases")
        seen.setdefault(hook.command, idx)
        for key, value in hook.env.items():
            if redact_text(value) != value:
                problems.append(
                    f"{at(f'hooks[{idx}].env.{key}')}: looks like key material; secrets are never written in "
                    "the configuration (let the hook read a file, or use with_secret for the rotated one)"
                )
        if hook.name is not None:
            if hook.name in names:
                problems.append(f"{at(f'hooks[{idx}].name')}: duplicate hook name (also hooks[{names[hook.name]}])")
            names.setdefault(hook.name, idx)
    return problems
