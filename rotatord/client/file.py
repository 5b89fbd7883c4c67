"""``FileReader``: read a secret document from rotatord's embedded ``file`` backend.

The file backend encrypts every version under a master key, so a bot reading it needs that key
(a 0600 file, or a systemd credential) and must run as a user allowed into the store directory.
The backend module (and pydantic, for its settings) is imported when a FileReader is made, not
when :mod:`rotatord.client` is imported.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..document import Document
from ..errors import BackendError, ConfigError

if TYPE_CHECKING:
    from ..backends.file import FileBackend

__all__ = ["FileReader"]


class FileReader:
    """Reads the current document at ``path`` in the file backend rooted at ``directory``.

    Give exactly one of ``master_key_file`` and ``master_key_credential`` (a name under
    ``$CREDENTIALS_DIRECTORY``), as in the daemon's ``[backends.<name>]`` section.  Raises
    ConfigError for an invalid path or key reference; :meth:`read` raises the backend's errors.
    """

    def __init__(
        self,
        directory: str | Path,
        path: str,
        *,
        master_key_file: str | Path | None = None,
        master_key_credential: str | None = None,
    ) -> None:
        if (master_key_file is None) == (master_key_credential is None):
            raise ConfigError("FileReader: give exactly one of master_key_file, master_key_credential")
        # Imported here so that importing rotatord.client loads neither pydantic nor the backend.
        from pydantic import ValidationError

        from ..backends.file import FileBackend, path_problem
        from ..config.model import FileBackendSettings

        problem = path_problem(path) if isinstance(path, str) else "is not a string"
        if problem:
            raise ConfigError(f"FileReader: path {path!r} {problem}")
        try:
            settings = FileBackendSettings(
                kind="file",
                directory=Path(directory).absolute(),
                master_key_file=None if master_key_file is None else Path(master_key_file).absolute(),
                master_key_credential=master_key_credential,
            )
        except ValidationError as exc:
            fields = ", ".join(".".join(str(p) for p in err["loc"]) for err in exc.errors())
            raise ConfigError(f"FileReader: invalid {fields}") from None
        self.directory = settings.directory
        self.path = path
        self._backend: FileBackend = FileBackend("client", settings)

    def read(self) -> Document:
        """The current document.  Raises BackendError when nothing has been published at the
        path yet, and the backend's errors (DocumentInvalid, PermissionDenied, ConfigError for
        an unusable master key, ...) otherwise."""
        current = self._backend.read(self.path)
        if current is None:
            raise BackendError(f"file backend {str(self.directory)!r}: nothing published at {self.path!r} yet")
        return current.document

    def close(self) -> None:
        """Forget the master key held in memory; a later read loads it again."""
        self._backend.close()

    def __repr__(self) -> str:
        return f"FileReader(directory={str(self.directory)!r}, path={self.path!r})"
