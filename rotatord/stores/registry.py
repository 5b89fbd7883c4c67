"""The explicit registry of data stores, keyed by the configuration's ``kind``.

Entries are import paths, not classes, so that a configuration without Redis stores never
imports redis: each SDK is imported by its own store module, and only when that kind is used.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Final, cast

from ..config.model import StoreSettings
from ..errors import ConfigError
from ..interfaces import DataStore

__all__ = ["STORES", "label_prefix", "open_store", "store_class"]

#: ``kind`` -> ``"module:Class"``.  A class is constructed as ``cls(label_prefix, settings)``.
STORES: Final[Mapping[str, str]] = {
    "sql": "rotatord.stores.sql:SqlStore",
    "files": "rotatord.stores.files:FilesStore",
    "redis": "rotatord.stores.redis:RedisStore",
}


def store_class(kind: str) -> type[DataStore]:
    """Import the implementation registered for ``kind``.

    Raises ConfigError for an unknown kind, or for a known kind whose optional SDK is missing.
    """
    target = STORES.get(kind)
    if target is None:
        known = ", ".join(sorted(STORES))
        raise ConfigError(f"unknown store kind {kind!r} (expected one of: {known})")
    module_name, _, attribute = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        # Only a missing third-party SDK lands here; a broken rotatord module is a bug and propagates.
        if (exc.name or "").startswith("rotatord"):
            raise
        raise ConfigError(
            f"store kind {kind!r} needs the package {exc.name!r}, which is not installed (install rotatord[{kind}])"
        ) from None
    cls = getattr(module, attribute)
    if not (isinstance(cls, type) and issubclass(cls, DataStore)):
        raise TypeError(f"{target} is not a DataStore subclass")
    return cls


def label_prefix(secret: str, index: int) -> str:
    """How a store's label starts: the secret and the store's place in its ``stores`` list."""
    return f"{secret}.stores[{index}]"


def open_store(secret: str, index: int, settings: StoreSettings) -> DataStore:
    """Construct store number ``index`` of the managed secret ``secret`` from its settings slice.

    Construction neither connects nor reads the URL reference; :meth:`DataStore.check` does.
    """
    try:
        cls = store_class(settings.kind)
    except ConfigError as exc:
        raise ConfigError(f"secrets.{secret}.stores[{index}].kind: {exc}") from None
    # Every registered class takes (label_prefix, settings); the ABC itself declares no constructor.
    factory = cast(Callable[[str, StoreSettings], DataStore], cls)
    return factory(label_prefix(secret, index), settings)
