"""The explicit registry of secret backends, keyed by the configuration's ``kind``.

Entries are import paths, not classes, so that opening a ``file`` backend never imports hvac or
boto3: each SDK is imported by its own backend module, and only when that kind is configured.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Final, cast

from ..config.model import BackendSettings
from ..errors import ConfigError
from ..interfaces import Backend

__all__ = ["BACKENDS", "backend_class", "open_backend"]

#: ``kind`` -> ``"module:Class"``.  A class is constructed as ``cls(name, settings)``.
BACKENDS: Final[Mapping[str, str]] = {
    "file": "rotatord.backends.file:FileBackend",
    "vault": "rotatord.backends.vault:VaultBackend",
    "aws": "rotatord.backends.aws:AwsBackend",
}


def backend_class(kind: str) -> type[Backend]:
    """Import the implementation registered for ``kind``.

    Raises ConfigError for an unknown kind, or for a known kind whose optional SDK is missing.
    """
    target = BACKENDS.get(kind)
    if target is None:
        known = ", ".join(sorted(BACKENDS))
        raise ConfigError(f"unknown backend kind {kind!r} (expected one of: {known})")
    module_name, _, attribute = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        # Only a missing third-party SDK lands here; a broken rotatord module is a bug and propagates.
        if (exc.name or "").startswith("rotatord"):
            raise
        raise ConfigError(
            f"backend kind {kind!r} needs the package {exc.name!r}, which is not installed (install rotatord[{kind}])"
        ) from None
    cls = getattr(module, attribute)
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise TypeError(f"{target} is not a Backend subclass")
    return cls


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
