"""What every command needs: the configuration, validated, and the daemon's socket."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import Settings, check_references, config_path, load_settings
from ..errors import ConfigError

__all__ = ["load", "load_checked"]


def load(args: argparse.Namespace) -> tuple[Path, Settings]:
    path = config_path(args.config)
    return path, load_settings(path)


def load_checked(args: argparse.Namespace, *, require_existing: bool = True) -> tuple[Path, Settings]:
    """Load and validate everything, including the files the configuration references."""
    path, settings = load(args)
    problems = check_references(settings, path, require_existing=require_existing)
    if problems:
        raise ConfigError(problems)
    return path, settings
