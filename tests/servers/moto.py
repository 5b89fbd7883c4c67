"""moto in server mode: a real HTTP server speaking the Secrets Manager API, on 127.0.0.1.

``moto_server`` (session scope) starts ``moto_server -H 127.0.0.1 -p PORT`` as its own process
(own session, so a signal meant for it reaches nothing else), waits until it answers, and stops
it by PID at the end.  Tests isolate themselves by secret name (a fresh prefix each), so the
server is shared; :meth:`MotoServer.reset` wipes it where a test needs an empty account.
:func:`start_moto` starts a private one (the IAM tests switch on authentication, which is global
to a moto process).

Every client made here carries dummy credentials of its own: nothing reads ``~/.aws``.
moto's stage-less reads are stale after a label move, so tests, like rotatord, always name
``VersionStage`` or ``VersionId``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.servers import free_port, require

if TYPE_CHECKING:
    from rotatord.config.model import AwsBackendSettings
    from rotatord.interfaces import Backend

__all__ = [
    "DUMMY_KEY",
    "REGION",
    "MotoServer",
    "aws_settings",
    "assert_sane_labels",
    "aws_store",
    "describe_stages",
    "moto_server",
    "start_moto",
    "write_credentials",
]

REGION = "us-east-1"
DUMMY_KEY = ("testing", "testing")
_READY_DEADLINE = 15.0

logging.getLogger("werkzeug").setLevel(logging.WARNING)


def _command(port: int) -> list[str] | None:
    """How to start moto's server from this venv, or None when it is not installed."""
    if importlib.util.find_spec("moto") is None or importlib.util.find_spec("flask") is None:
        return None
    script = Path(sys.executable).parent / "moto_server"
    base = [str(script)] if script.exists() else [sys.executable, "-m", "moto.server"]
    return [*base, "-H", "127.0.0.1", "-p", str(port)]


@dataclass
class MotoServer:
    """One running moto server process."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    _paused: bool = field(default=False, repr=False)
    _clients: dict[tuple[str, tuple[str, str]], Any] = field(default_factory=dict, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def api(self, path: str, body: bytes = b"") -> bytes:
        """POST to moto's own control API (``/moto-api/...``)."""
        url = f"{self.url}/moto-api/{path}"  # always http://127.0.0.1:<port>/..., built here
        request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "text/plain"})  # noqa: S310
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
            data: bytes = response.read()
            return data

    def reset(self) -> None:
        """Forget every resource (all secrets, IAM users, ...)."""
        self.api("reset")

    def enforce_iam(self, enabled: bool) -> None:
        """Check signatures and IAM policies on every later request (moto's ``reset-auth``)."""
        self.api("reset-auth", b"0" if enabled else b"inf")

    def pause(self) -> None:
        """SIGSTOP the server: connections are still accepted by the kernel, never answered."""
        os.kill(self.pid, signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)
        self._paused = False

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self.pause()
        try:
            yield
        finally:
            if self._paused:
                self.resume()

    def client(self, service: str = "secretsmanager", key: tuple[str, str] = DUMMY_KEY) -> Any:
        """A botocore client for ``service`` on this server, with explicit credentials (made once:
        creating one loads the endpoint data, about 0.1 s)."""
        import botocore.config
        import botocore.session

        cached = self._clients.get((service, key))
        if cached is None:
            session = botocore.session.Session()
            session.set_credentials(*key)
            config = botocore.config.Config(retries={"total_max_attempts": 1}, connect_timeout=5, read_timeout=10)
            cached = session.create_client(service, region_name=REGION, endpoint_url=self.url, config=config)
            self._clients[(service, key)] = cached
        return cached

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            if self._paused:
                os.kill(self.pid, signal.SIGCONT)
            os.kill(self.pid, signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(self.pid, signal.SIGKILL)
            self.process.wait(10)


@contextlib.contextmanager
def start_moto(log_dir: Path) -> Iterator[MotoServer]:
    """Start a moto server on a free port; stop it (by PID) on exit.  Skips when moto is missing."""
    port = free_port()
    command = _command(port)
    if command is None:
        require(False, "moto server not found: pip install 'moto[server]'")
        raise AssertionError("unreachable")  # require() skipped or failed
    log_path = log_dir / f"moto-{port}.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    server = MotoServer(process, port, log_path)
    try:
        deadline = time.monotonic() + _READY_DEADLINE
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"moto server exited with {process.returncode}; see {log_path}")
            try:
                server.reset()
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto server not ready after {_READY_DEADLINE}s; see {log_path}") from None
                time.sleep(0.05)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """The shared moto server of this test session."""
    with start_moto(tmp_path_factory.mktemp("moto")) as server:
        yield server


def write_credentials(path: Path, key: tuple[str, str] = DUMMY_KEY, profile: str = "default") -> Path:
    """An AWS shared-credentials file at 0600, as an operator would provision one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(f"[{profile}]\naws_access_key_id = {key[0]}\naws_secret_access_key = {key[1]}\n")
    return path


def aws_settings(server: MotoServer, tmp_path: Path, **overrides: Any) -> AwsBackendSettings:
    """Settings for an ``aws`` backend on ``server``: a fresh path prefix, dummy credentials in a
    0600 file, short timeouts so a paused server fails fast."""
    from rotatord.config.model import AwsBackendSettings

    values: dict[str, Any] = {
        "kind": "aws",
        "region": REGION,
        "endpoint_url": server.url,
        "credentials_file": write_credentials(tmp_path / "aws" / f"credentials-{uuid.uuid4().hex[:8]}"),
        "path_prefix": f"test-{uuid.uuid4().hex[:10]}",
        "timeout": timedelta(seconds=5),
        "transient_retries": 1,
    }
    values.update(overrides)
    return AwsBackendSettings(**values)


@contextlib.contextmanager
def aws_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Backend]]:
    """The contract suite's factory: AwsBackend objects on the shared moto server."""
    from rotatord.backends.registry import open_backend

    server: MotoServer = request.getfixturevalue("moto_server")
    settings = aws_settings(server, tmp_path)
    yield lambda: open_backend("contract", settings)


def describe_stages(server: MotoServer, name: str) -> dict[str, list[str]]:
    """``VersionIdsToStages`` of a secret, straight from the server."""
    stages: dict[str, list[str]] = server.client().describe_secret(SecretId=name)["VersionIdsToStages"]
    return stages


def assert_sane_labels(server: MotoServer, name: str) -> None:
    """Exactly one AWSCURRENT, at most one AWSPENDING and at most one AWSPREVIOUS."""
    labels = [label for stages in describe_stages(server, name).values() for label in stages]
    assert labels.count("AWSCURRENT") == 1, json.dumps(labels)
    assert labels.count("AWSPENDING") <= 1, json.dumps(labels)
    assert labels.count("AWSPREVIOUS") <= 1, json.dumps(labels)
