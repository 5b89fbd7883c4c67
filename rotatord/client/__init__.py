"""What a bot imports: its key ring and tokens, read from the backend rotatord publishes to.

::

    from rotatord.client import FileReader, Keyring

    ring = Keyring(FileReader("/var/lib/rotatord/secrets", "bots/support-bot/db-key",
                              master_key_file="/etc/rotatord/master.key"))
    token = ring.encrypt(b"hello")        # under the current primary key
    ring.decrypt(token)                   # under any key still in the ring

``TokenSet(reader, on_revoked_use=RevokedUseReporter(url))`` tells the daemon when a revoked
token is still presented.  A bot told by rotatord's webhooks when to re-read answers each request with
``WebhookHandler(...).handle(body, headers)``; ``verify_webhook`` checks one request alone.

Importing this package loads the stdlib, ``cryptography`` and rotatord's stdlib-only modules,
never the daemon, its scheduler or its stores.  ``VaultReader`` and ``AwsReader`` are imported
on first access, so hvac and boto3 are needed only by bots that use them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ..errors import BackendError, DecryptError, DocumentInvalid
from .core import DocumentReader
from .file import FileReader
from .keyring import Keyring
from .reports import RevokedUse, RevokedUseReporter
from .tokens import SigningSecrets, TokenCheck, TokenSet
from .webhooks import WebhookEvent, WebhookHandler, WebhookVerificationError, verify_webhook

if TYPE_CHECKING:
    from .aws import AwsReader
    from .vault import VaultReader

__all__ = [
    "AwsReader",
    "BackendError",
    "DecryptError",
    "DocumentInvalid",
    "DocumentReader",
    "FileReader",
    "Keyring",
    "RevokedUse",
    "RevokedUseReporter",
    "SigningSecrets",
    "TokenCheck",
    "TokenSet",
    "VaultReader",
    "WebhookEvent",
    "WebhookHandler",
    "WebhookVerificationError",
    "verify_webhook",
]

# Readers whose module imports an SDK: resolved on first attribute access (PEP 562).
_LAZY = {"VaultReader": ".vault", "AwsReader": ".aws"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later accesses skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
