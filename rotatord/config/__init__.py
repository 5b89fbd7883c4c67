"""Configuration: one TOML file plus ``ROTATORD_`` overrides, parsed once into frozen settings."""

from .load import DEFAULT_PATH, config_path, load_settings
from .model import (
    ConsumerSettings,
    DaemonSettings,
    FileBackendSettings,
    SecretSettings,
    Settings,
)
from .references import check_references, read_credential

__all__ = [
    "DEFAULT_PATH",
    "ConsumerSettings",
    "DaemonSettings",
    "FileBackendSettings",
    "SecretSettings",
    "Settings",
    "check_references",
    "config_path",
    "load_settings",
    "read_credential",
]
