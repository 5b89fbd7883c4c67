"""Read a rotatord document from HashiCorp Vault or OpenBao (KV version 2).  Needs ``hvac``.

What a bot does::

    from rotatord.client.vault import VaultReader

    reader = VaultReader("https://vault.internal:8200", "rotatord/bots/support-bot/db-key",
                         token_file="/run/support-bot/vault-token")
    ring = reader.read()                 # a rotatord.document.FernetRing, one consistent KV version

``path`` is the full path inside the mount, the daemon's ``path_prefix`` included.  A read-only
policy on ``<mount>/data/<path>`` is all the token needs (contrib/vault/rotatord-bot-readonly.hcl).
Errors are rotatord's: BackendUnavailable (transient: sealed, unreachable, timeouts),
PermissionDenied, NotManaged / DocumentInvalid (not a rotatord document), ConfigError (no token,
wrong mount), BackendError (nothing published at the path yet).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from types import TracebackType

from ..backends.vault import TokenAuth, VaultKV
from ..document import Document
from ..errors import BackendError, ConfigError
from ..interfaces import Versioned

__all__ = ["VaultReader"]


def _env_token() -> str:
    token = os.environ.get("VAULT_TOKEN", "").strip()
    if not token:
        raise ConfigError("no Vault token: pass token= or token_file=, or set $VAULT_TOKEN")
    return token


def _file_token(path: Path) -> str:
    """The token in ``path``.  Group-readable is accepted (Vault Agent's file sink writes 0640);
    a world-readable token file is refused."""
    try:
        mode = path.stat().st_mode
        if mode & stat.S_IRWXO:
            raise ConfigError(
                f"token file {path} is accessible by others (mode {stat.S_IMODE(mode):04o}); chmod o-rwx it"
            )
        token = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"token file {path}: cannot read it ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"token file {path}: not UTF-8 text") from None
    if not token:
        raise ConfigError(f"token file {path} is empty")
    return token


class VaultReader:
    """Reads one secret document.  Thread-safe; keep one per secret and call :meth:`read` again
    to see a rotation (the caller decides how often, e.g. a cache with a TTL).

    The token is ``token``, else the content of ``token_file`` (re-read after "permission
    denied", so a token renewed by Vault Agent is picked up), else ``$VAULT_TOKEN``.
    ``verify`` is True, False, or the path of a CA bundle.
    """

    def __init__(
        self,
        address: str,
        path: str,
        *,
        mount: str = "secret",
        token: str | None = None,
        token_file: str | os.PathLike[str] | None = None,
        namespace: str | None = None,
        verify: bool | str = True,
        timeout: float = 5.0,
        retries: int = 2,
    ) -> None:
        if token is not None and token_file is not None:
            raise ValueError("pass token or token_file, not both")
        self.path = path.strip("/")
        if not self.path:
            raise ValueError("path must name a secret inside the mount")
        if token is not None:
            auth = TokenAuth.fixed(token)
        elif token_file is not None:
            file = Path(token_file)
            auth = TokenAuth(lambda: _file_token(file))
        else:
            auth = TokenAuth(_env_token)
        self._kv = VaultKV(
            address, mount, auth=auth, namespace=namespace, verify=verify, timeout=timeout, retries=retries,
            label=f"vault {address.rstrip('/')}",
        )  # fmt: skip

    def __repr__(self) -> str:
        return f"VaultReader(address={self._kv.address!r}, mount={self._kv.mount!r}, path={self.path!r})"

    def read(self) -> Document:
        """The current document.  One read: the ring is consistent."""
        return self.read_versioned().document

    def read_versioned(self, version: int | None = None) -> Versioned:
        """The current document (or KV version ``version``, e.g. the one a webhook names) with
        its KV version number."""
        got = self._kv.read(self.path, version)
        if got is None:
            which = "" if version is None else f" version {version}"
            raise BackendError(
                f"{self._kv.label}: nothing at {self._kv.mount}/data/{self.path}{which} "
                "(not published yet, pruned, or a wrong path)"
            )
        return got

    def close(self) -> None:
        self._kv.close()

    def __enter__(self) -> VaultReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
