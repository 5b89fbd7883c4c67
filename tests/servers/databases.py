"""PostgreSQL, MariaDB and Redis for the data-store tests.

Each fixture uses the service answering on its standard port (127.0.0.1:5432 with trust auth
for ``postgres`` and a database ``test``; 127.0.0.1:3306 as ``root`` without password, database
``test``; 127.0.0.1:6379), else starts a private instance from the installed binaries in a
temporary directory on a free port, and stops it by PID at the end of the session.  Set
``ROTATORD_TEST_PRIVATE_SERVERS=1`` to always start private instances.  Tests isolate
themselves with their own table names and key prefixes; nothing here is ever dropped wholesale,
except the database ``pg_state`` creates for one test.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.servers import free_port, require

__all__ = ["mariadb_url", "postgres_url", "redis_url", "url_file"]

PRIVATE = os.environ.get("ROTATORD_TEST_PRIVATE_SERVERS") == "1"


def url_file(directory: Path, url: str) -> Path:
    """``url`` in a fresh 0600 file under ``directory`` (stores read URLs by reference only)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"url-{os.urandom(4).hex()}"
    path.write_text(url + "\n")
    path.chmod(0o600)
    return path


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _wait(ready: Callable[[], bool], proc: subprocess.Popen[bytes], what: str, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: {log.read_text(errors='replace')[-2000:]}")
        if ready():
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not become ready in {timeout:.0f}s")


def _stop(proc: subprocess.Popen[bytes], sig: signal.Signals = signal.SIGTERM) -> None:
    """Stop one process we started, by its PID."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _group_of(user: str | None) -> int | None:
    """The primary group of ``user``, to drop root for servers that refuse it (PostgreSQL)."""
    return None if user is None else pwd.getpwnam(user).pw_gid


# -- PostgreSQL -----------------------------------------------------------------------------


def _pg_connects(port: int) -> bool:
    import psycopg

    try:
        with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="test", connect_timeout=3):
            return True
    except psycopg.Error:
        return False


def _pg_binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


@contextlib.contextmanager
def _private_postgres(root: Path) -> Iterator[str]:
    import psycopg

    initdb, postgres = _pg_binary("initdb"), _pg_binary("postgres")
    require(bool(initdb and postgres), "PostgreSQL not installed: apt-get install postgresql")
    assert initdb and postgres
    user = None
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            require(False, "PostgreSQL needs a 'postgres' system user to run as when tests run as root")
        user = "postgres"
        # pytest's own temp tree is private to root: use a directory that user can reach.
        root = Path(tempfile.mkdtemp(prefix="rotatord-pg-"))
        shutil.chown(root, user)
    data, log = root / "data", root / "postgres.log"
    subprocess.run(
        [initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"],
        check=True,
        capture_output=True,
        user=user,
        group=_group_of(user),
    )
    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [postgres, "-D", str(data), "-p", str(port), "-k", str(root), "-c", "listen_addresses=127.0.0.1", "-F"],
            stdout=out,
            stderr=subprocess.STDOUT,
            user=user,
            group=_group_of(user),
        )
    try:

        def ready() -> bool:
            try:
                with psycopg.connect(
                    host="127.0.0.1", port=port, user="postgres", dbname="postgres", autocommit=True
                ) as c:
                    c.execute("CREATE DATABASE test")
                return True
            except psycopg.errors.DuplicateDatabase:
                return True
            except psycopg.Error:
                return False

        _wait(ready, proc, "postgres", log)
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/test"
    finally:
        _stop(proc, signal.SIGINT)  # "fast" shutdown: does not wait for clients to leave
        if user is not None:
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A SQLAlchemy URL of a PostgreSQL database where tests may create tables."""
    pytest.importorskip("psycopg")
    if not PRIVATE and _answers(5432) and _pg_connects(5432):
        yield "postgresql+psycopg://postgres@127.0.0.1:5432/test"
        return
    with _private_postgres(tmp_path_factory.mktemp("postgres")) as url:
        yield url


# -- MariaDB --------------------------------------------------------------------------------


def _mysql_connects(port: int, database: str | None = "test") -> bool:
    import pymysql

    try:
        pymysql.connect(
            host="127.0.0.1", port=port, user="root", password="", database=database, connect_timeout=3
        ).close()
        return True
    except pymysql.MySQLError:
        return False


@contextlib.contextmanager
def _private_mariadb(root: Path) -> Iterator[str]:
    import pymysql

    install = shutil.which("mariadb-install-db") or shutil.which("mysql_install_db")
    server = shutil.which("mariadbd") or shutil.which("mysqld") or "/usr/sbin/mariadbd"
    require(bool(install) and os.path.exists(server), "MariaDB not installed: apt-get install mariadb-server")
    assert install
    as_root = ["--user=root"] if os.geteuid() == 0 else []
    data, log = root / "data", root / "mariadb.log"
    subprocess.run(
        [install, "--no-defaults", f"--datadir={data}", "--auth-root-authentication-method=normal", *as_root],
        check=True,
        capture_output=True,
    )
    port = free_port()
    proc = subprocess.Popen(
        [
            server,
            "--no-defaults",
            f"--datadir={data}",
            f"--port={port}",
            "--bind-address=127.0.0.1",
            f"--socket={root / 'mysqld.sock'}",
            f"--pid-file={root / 'mysqld.pid'}",
            f"--log-error={log}",
            "--skip-grant-tables",  # a throwaway instance: root without a password from 127.0.0.1
            "--innodb-flush-log-at-trx-commit=2",
            *as_root,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    log.touch()
    try:
        _wait(lambda: _mysql_connects(port, None), proc, "mariadbd", log)
        connection = pymysql.connect(host="127.0.0.1", port=port, user="root", password="")
        with connection.cursor() as cursor:
            cursor.execute("CREATE DATABASE IF NOT EXISTS test")
        connection.close()
        yield f"mysql+pymysql://root@127.0.0.1:{port}/test"
    finally:
        _stop(proc)


@pytest.fixture(scope="session")
def mariadb_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A SQLAlchemy URL of a MariaDB (or MySQL) database where tests may create tables."""
    pytest.importorskip("pymysql")
    if not PRIVATE and _answers(3306) and _mysql_connects(3306):
        yield "mysql+pymysql://root@127.0.0.1:3306/test"
        return
    with _private_mariadb(tmp_path_factory.mktemp("mariadb")) as url:
        yield url


# -- Redis ----------------------------------------------------------------------------------


def _redis_pings(port: int) -> bool:
    import redis

    try:
        return bool(redis.Redis(host="127.0.0.1", port=port, socket_timeout=3).ping())
    except redis.RedisError:
        return False


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis URL (database 0).  Tests use their own key prefixes."""
    pytest.importorskip("redis")
    if not PRIVATE and _answers(6379) and _redis_pings(6379):
        yield "redis://127.0.0.1:6379/0"
        return
    server = shutil.which("redis-server")
    require(server is not None, "Redis not installed: apt-get install redis-server")
    assert server
    root = tmp_path_factory.mktemp("redis")
    port = free_port()
    log = root / "redis.log"
    command = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(
        [*command, "--dir", str(root), "--logfile", str(log)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    log.touch()
    try:
        _wait(lambda: _redis_pings(port), proc, "redis-server", log)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        _stop(proc)


# -- a fresh PostgreSQL database per test (the state database of several daemon instances) ---


def database_url(server_url: str, name: str, user: str | None = None) -> str:
    url = sa.engine.make_url(server_url).set(database=name)
    if user is not None:
        url = url.set(username=user)
    return url.render_as_string(hide_password=False)


@pytest.fixture
def pg_state(postgres_url: str) -> Iterator[str]:
    """The URL of a database created for this test (and dropped after it, sessions and all)."""
    name = f"rtd_{uuid.uuid4().hex[:16]}"
    admin = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield database_url(postgres_url, name)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
