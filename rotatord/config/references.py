"""Secret-bearing values are only ever referenced: by file, or by a systemd credential name."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..errors import ConfigError
from ..fsutil import check_private_file
from .model import Settings

__all__ = ["check_references", "credential_path", "hook_command_problem", "private_file_problem", "read_credential"]


def credential_path(name: str) -> Path:
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        raise ConfigError(
            f"credential {name!r}: $CREDENTIALS_DIRECTORY is not set (use LoadCredential= in the unit, or a *_file key)"
        )
    return Path(directory) / name


def _in_credentials_dir(path: Path) -> bool:
    """systemd restricts $CREDENTIALS_DIRECTORY to the unit's user itself; on tmpfs it grants that
    user read access by an ACL, so the mode shows group bits that mean nothing here."""
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return False
    try:
        return path.resolve().is_relative_to(Path(directory).resolve())
    except OSError:
        return False


def private_file_problem(path: Path) -> str | None:
    """Like fsutil.check_private_file, trusting systemd's credentials directory."""
    if _in_credentials_dir(path):
        return None if path.is_file() else f"{path} does not exist"
    return check_private_file(path)


def hook_command_problem(program: str) -> str | None:
    """Why ``program`` cannot be run as a hook, or None.  A hook runs with the daemon's rights
    (and may receive key material), so a program others may rewrite is refused."""
    path = Path(program)
    try:
        st = path.stat()
    except FileNotFoundError:
        return f"{program} does not exist"
    except OSError as exc:
        return f"cannot inspect {program} ({exc.strerror})"
    if not stat.S_ISREG(st.st_mode):
        return f"{program} is not a regular file"
    if not os.access(path, os.X_OK):
        return f"{program} is not executable (chmod 755 it)"
    if st.st_mode & 0o022:
        return f"{program} is writable by group or others (mode {st.st_mode & 0o777:04o}); chmod 755 it"
    return None


def read_credential(file: Path | None, credential: str | None, what: str) -> bytes:
    """Read a secret by reference; refuse files other users can read.  Errors name ``what``."""
    path = file if file is not None else credential_path(credential or "")
    problem = private_file_problem(path)
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
    holds_refs = any(ref.is_set for b in settings.backends.values() for ref in b.credential_refs()) or any(
        ref.is_set for s in settings.secrets for store in s.stores for ref in store.credential_refs()
    )
    try:
        mode = config_file.stat().st_mode
    except OSError:
        mode = 0
    if _in_credentials_dir(config_file):
        mode = 0
    if mode & 0o022:
        problems.append(f"{config_file}: writable by group or others (mode {mode & 0o777:04o}); chmod 600 it")
    elif holds_refs and mode & 0o044:
        problems.append(
            f"{config_file}: readable by group or others (mode {mode & 0o777:04o}) "
            "while it references credentials; chmod 600 it"
        )
    for name, backend in settings.backends.items():
        for ref in backend.credential_refs():
            where = f"backends.{name}.{ref.name}"
            if ref.file is not None:
                # rotatord init creates a missing master key; other credentials come from the operator.
                creatable = backend.kind == "file" and ref.name == "master_key"
                if ref.file.exists() or require_existing or not creatable:
                    p = private_file_problem(ref.file)
                    if p:
                        hint = " (run 'rotatord init')" if creatable and "does not exist" in p else ""
                        problems.append(f"{where}_file: {p}{hint}")
            elif ref.credential is not None:
                try:
                    p = private_file_problem(credential_path(ref.credential))
                except ConfigError as exc:
                    p = str(exc)
                if p:
                    problems.append(f"{where}_credential: {p}")
        ca_bundle = getattr(backend, "ca_bundle", None)
        if ca_bundle is not None and not ca_bundle.is_file():
            problems.append(f"backends.{name}.ca_bundle: {ca_bundle} does not exist")
    for idx, secret in enumerate(settings.secrets):
        for sidx, store in enumerate(secret.stores):
            for ref in store.credential_refs():
                where = f"secrets[{idx}].stores[{sidx}].{ref.name}"
                path = ref.file
                if path is None and ref.credential is not None:
                    try:
                        path = credential_path(ref.credential)
                    except ConfigError as exc:
                        problems.append(f"{where}_credential: {exc}")
                        continue
                if path is not None:
                    p = private_file_problem(path)
                    if p:
                        suffix = "_file" if ref.file is not None else "_credential"
                        problems.append(f"{where}{suffix}: {p}")
        for hidx, hook in enumerate(secret.hooks):
            p = hook_command_problem(hook.command[0])
            if p:
                problems.append(f"secrets[{idx}].hooks[{hidx}].command (secret {secret.name!r}): {p}")
    for hidx, hook in enumerate(settings.hooks):
        p = hook_command_problem(hook.command[0])
        if p:
            problems.append(f"hooks[{hidx}].command: {p}")
    return problems
