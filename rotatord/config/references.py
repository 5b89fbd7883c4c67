"""Secret-bearing values are only ever referenced: by file, or by a systemd credential name."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConfigError
from ..fsutil import check_private_file
from .model import Settings

__all__ = ["check_references", "credential_path", "read_credential"]


def credential_path(name: str) -> Path:
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        raise ConfigError(
            f"credential {name!r}: $CREDENTIALS_DIRECTORY is not set (use LoadCredential= in the unit, or a *_file key)"
        )
    return Path(directory) / name


def read_credential(file: Path | None, credential: str | None, what: str) -> bytes:
    """Read a secret by reference; refuse files other users can read.  Errors name ``what``."""
    path = file if file is not None else credential_path(credential or "")
    problem = check_private_file(path)
    if problem:
        raise ConfigError(f"{what}: {problem}")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path} ({exc.strerror})") from None


def check_references(settings: Settings, config_file: Path, *, require_existing: bool = True) -> list[str]:
    """Problems with the files the configuration points at (and the configuration file itself).

    ``require_existing=False`` skips files that ``rotatord init`` will create.
    """
    problems: list[str] = []
    holds_refs = any(b.master_key_file or b.master_key_credential for b in settings.backends.values())
    try:
        mode = config_file.stat().st_mode
    except OSError:
        mode = 0
    if mode & 0o022:
        problems.append(f"{config_file}: writable by group or others (mode {mode & 0o777:04o}); chmod 600 it")
    elif holds_refs and mode & 0o044:
        problems.append(
            f"{config_file}: readable by group or others (mode {mode & 0o777:04o}) "
            "while it references credentials; chmod 600 it"
        )
    for name, backend in settings.backends.items():
        where = f"backends.{name}"
        if backend.master_key_file is not None:
            if backend.master_key_file.exists() or require_existing:
                p = check_private_file(backend.master_key_file)
                if p:
                    problems.append(
                        f"{where}.master_key_file: {p}" + (" (run 'rotatord init')" if "does not exist" in p else "")
                    )
        elif backend.master_key_credential is not None:
            try:
                p = check_private_file(credential_path(backend.master_key_credential))
            except ConfigError as exc:
                p = str(exc)
            if p:
                problems.append(f"{where}.master_key_credential: {p}")
    return problems
