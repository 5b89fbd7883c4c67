"""``run``, ``init`` and ``check-config``."""

from __future__ import annotations

import argparse

from ..fsutil import ensure_private_dir
from .common import load_checked
from .output import out

__all__ = ["check_config", "init", "run"]


def run(args: argparse.Namespace) -> int:
    from ..daemon.memory import limit_malloc_arenas

    limit_malloc_arenas()  # before any thread starts (see rotatord.daemon.memory)
    path, settings = load_checked(args)
    from ..daemon.service import Daemon
    from ..logs import setup_logging

    setup_logging(settings.daemon.log_level)
    return Daemon(path, settings).run()


def init(args: argparse.Namespace) -> int:
    """Create what the configuration needs and does not have yet; never overwrite anything."""
    from ..backends.file import init_master_key
    from ..engine.journal import Journal  # here, not at the top: check-config needs no database

    path, settings = load_checked(args, require_existing=False)
    daemon = settings.daemon
    ensure_private_dir(daemon.state_dir)
    out(f"state directory  {daemon.state_dir}")
    Journal(daemon.database_url).create()
    out(f"state database   {daemon.database_url}")
    for name, backend in settings.backends.items():
        if backend.kind == "file":
            ensure_private_dir(backend.directory)
            if backend.master_key_file is not None:
                created = init_master_key(backend)
                state = "created" if created else "exists, kept"
                out(f"master key       {backend.master_key_file} ({state}) for backend {name!r}")
            else:
                out(f"master key       credential {backend.master_key_credential!r} for backend {name!r}")
    out(f"ready: rotatord run --config {path}")
    return 0


def check_config(args: argparse.Namespace) -> int:
    path, settings = load_checked(args)
    out(f"{path}: ok ({len(settings.secrets)} secrets, {len(settings.backends)} backends)")
    return 0
