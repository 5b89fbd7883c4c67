"""``AwsReader``: read a secret document from AWS Secrets Manager, as a bot does.

It reads the ``AWSCURRENT`` version by naming that stage explicitly (a stage-less read can be
stale on moto right after rotatord moves the label) and validates the document.  Credentials
come from botocore's default chain (environment, shared files, instance or task role), from
``profile``, or from a botocore ``session`` the caller built.  The read-only IAM policy it needs
is ``contrib/aws/rotatord-bot-readonly-policy.json`` (GetSecretValue and DescribeSecret on the
one secret).  Importing this module imports botocore; :mod:`rotatord.client` imports it only
when ``AwsReader`` is first used.
"""

from __future__ import annotations

from typing import Any

from ..backends.aws import SecretsManagerKV
from ..document import Document
from ..errors import BackendError

__all__ = ["AwsReader"]


class AwsReader:
    """Reads the current document of the secret ``secret_id`` (its name or ARN).

    ``secret_id`` is the full name, prefix included (``<path_prefix>/<path>`` of the daemon's
    configuration).  Transient failures (throttling, 5xx, timeouts, connection errors) are
    retried ``retries`` times inside :meth:`read` before BackendUnavailable is raised.
    """

    def __init__(
        self,
        secret_id: str,
        *,
        region: str,
        endpoint_url: str | None = None,
        profile: str | None = None,
        timeout: float = 5.0,
        retries: int = 2,
        session: Any = None,
    ) -> None:
        if not isinstance(secret_id, str) or not secret_id:
            raise ValueError("AwsReader: secret_id must be a non-empty string")
        self.secret_id = secret_id
        self.region = region
        self._kv = SecretsManagerKV(
            region=region,
            endpoint_url=endpoint_url,
            profile=profile,
            session=session,
            timeout=timeout,
            retries=retries,
            label="aws",
        )

    def read(self) -> Document:
        """The AWSCURRENT document.  Raises BackendError when the secret does not exist or has no
        current version yet, and the backend's errors otherwise (BackendUnavailable,
        PermissionDenied, NotManaged for a value that is not a rotatord document,
        DocumentInvalid for one that fails the schema)."""
        current = self._kv.retrying(lambda: self._kv.read(self.secret_id), f"read {self.secret_id}")
        if current is None:
            raise BackendError(f"aws: secret {self.secret_id!r} does not exist or has no AWSCURRENT version yet")
        return current.document

    def read_version(self, version_id: str) -> Document:
        """One version by VersionId, e.g. the ``backend_version`` a rotatord webhook names.
        Raises BackendError when AWS no longer keeps it."""
        found = self._kv.retrying(lambda: self._kv.read_version(self.secret_id, version_id), f"read {self.secret_id}")
        if found is None:
            raise BackendError(f"aws: secret {self.secret_id!r} has no version {version_id!r}")
        return found.document

    def close(self) -> None:
        """Close the HTTP connections; a later read opens new ones."""
        self._kv.close()

    def __repr__(self) -> str:
        return f"AwsReader(secret_id={self.secret_id!r}, region={self.region!r})"
