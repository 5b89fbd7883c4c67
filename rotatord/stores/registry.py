"""The explicit registry of data stores, keyed by the configuration's ``kind``.

Entries are import paths, not classes, so that a configuration without Redis stores never
imports redis: each SDK is imported by its own store module, and only when that kind is used.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Final, cast

from ..config.model import StoreSettings
from ..errors import ConfigError
from ..interfaces import DataStore
from ..registry import import_registered

__all__ = ["STORES", "label_prefix", "open_store", "store_class"]

#: ``kind`` -> ``"module:Class"``.  A class is constructed as ``cls(label_prefix, settings)``.
STORES: Final[Mapping[str, str]] = {
    "sql": "rotatord.stores.sql:SqlStore",
    "files": "rotatord.stores.files:FilesStore",
    "redis": "rotatord.stores.redis:RedisStore",
}


def store_class(kind: str) -> type[DataStore]:
    """Import the implementation registered for ``kind`` (ConfigError if unknown or its SDK is missing)."""
    return cast(type[DataStore], import_registered(STORES, kind, DataStore, "store"))


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
