"""Explicit registries keyed by the configuration's ``kind`` (backends, data stores).

Entries are ``"module:Class"`` strings, imported only when that kind is configured, so an SDK
(hvac, boto3, redis, ...) is never imported by a configuration that does not use it.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping

from .errors import ConfigError

__all__ = ["import_registered"]


def import_registered(registry: Mapping[str, str], kind: str, base: type[object], what: str) -> type[object]:
    """Import the class registered for ``kind``; ``what`` names the family in messages.

    Raises ConfigError for an unknown kind, or for a known kind whose optional SDK is missing.
    """
    target = registry.get(kind)
    if target is None:
        known = ", ".join(sorted(registry))
        raise ConfigError(f"unknown {what} kind {kind!r} (expected one of: {known})")
    module_name, _, attribute = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        # Only a missing third-party SDK lands here; a broken rotatord module is a bug and propagates.
        if (exc.name or "").startswith("rotatord"):
            raise
        raise ConfigError(
            f"{what} kind {kind!r} needs the package {exc.name!r}, which is not installed (install rotatord[{kind}])"
        ) from None
    cls = getattr(module, attribute)
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise TypeError(f"{target} is not a {base.__name__} subclass")
    return cls
