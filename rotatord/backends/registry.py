"""The explicit registry of secret backends, keyed by the configuration's ``kind``.

Entries are import paths, not classes, so that opening a ``file`` backend never imports hvac or
boto3: each SDK is imported by its own backend module, and only when that kind is configured.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Final, cast

from ..config.model import BackendSettings
from ..errors import ConfigError
from ..interfaces import Backend
from ..registry import import_registered

__all__ = ["BACKENDS", "backend_class", "open_backend"]

#: ``kind`` -> ``"module:Class"``.  A class is constructed as ``cls(name, settings)``.
BACKENDS: Final[Mapping[str, str]] = {
    "file": "rotatord.backends.file:FileBackend",
    "vault": "rotatord.backends.vault:VaultBackend",
    "aws": "rotatord.backends.aws:AwsBackend",
}


def backend_class(kind: str) -> type[Backend]:
    """Import the implementation registered for ``kind`` (ConfigError if unknown or its SDK is missing)."""
    return cast(type[Backend], import_registered(BACKENDS, kind, Backend, "backend"))


def open_backend(name: str, settings: BackendSettings) -> Backend:
    """Construct the backend configured as ``[backends.<name>]`` from its own settings slice.

    Construction does not connect or read keys; call :meth:`Backend.check` to verify it.
    """
    try:
        cls = backend_class(settings.kind)
    except ConfigError as exc:
        raise ConfigError(f"backends.{name}.kind: {exc}") from None
    # Every registered class takes (name, settings); the ABC itself declares no constructor.
    factory = cast(Callable[[str, BackendSettings], Backend], cls)
    return factory(name, settings)
