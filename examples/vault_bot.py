"""Example bot: records encrypted in SQLite under the Fernet key ring rotatord keeps in OpenBao.

Run it against a local ``bao server -dev`` and a rotatord configured for it (examples/README.md)::

    python examples/vault_bot.py --address http://127.0.0.1:8200 --mount secret \\
        --path rotatord/bots/demo-bot/db-key --db /tmp/demo-bot.db

Every few seconds it stores a record and decrypts all of them, and it follows rotations without
a restart:

- it re-reads the ring every ``--ttl`` seconds, and at once when a record does not decrypt (the
  record may be under a key staged after its last read, by another instance of the bot);
- after a promotion it moves its records to the new primary key (:meth:`Bot.rewrap`), well
  inside the grace period, so nothing is left under a key when rotatord retires it.  Once the
  secret has a ``sql`` data store configured, rotatord does this itself, and its census holds
  the retirement back until the table is clean.

The bot needs read access to one path only (contrib/vault/rotatord-bot-readonly.hcl).
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from cryptography.fernet import InvalidToken, MultiFernet

from rotatord.client.vault import VaultReader
from rotatord.crypto.keyring import KeyIdentifier, multifernet
from rotatord.document import Document, FernetRing
from rotatord.errors import RotatordError

SCHEMA = "CREATE TABLE IF NOT EXISTS records (id INTEGER PRIMARY KEY AUTOINCREMENT, body BLOB NOT NULL)"


class Reader(Protocol):
    """Where the ring comes from: VaultReader here; any rotatord.client reader works."""

    def read(self) -> Document: ...


def open_db(path: str | os.PathLike[str]) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None)  # autocommit: each statement stands alone
    db.execute(SCHEMA)
    return db


class Bot:
    """Stores text encrypted under the ring's primary key; reads it back under any key of the ring."""

    def __init__(
        self, reader: Reader, db: sqlite3.Connection, *, ttl: float = 30.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.reader = reader
        self.db = db
        self.ttl = ttl
        self.clock = clock
        self.refresh()

    def refresh(self) -> FernetRing:
        """Read the ring now (one read: the primary and the keys are consistent)."""
        ring = self.reader.read()
        if not isinstance(ring, FernetRing):
            raise TypeError(f"{ring.name!r} is a {ring.kind} secret, not a fernet key ring")
        self.ring = ring
        self.fernet: MultiFernet = multifernet(ring)
        self.identify = KeyIdentifier(ring).identify
        self.read_at = self.clock()
        return ring

    def _current(self) -> MultiFernet:
        if self.clock() - self.read_at >= self.ttl:
            self.refresh()
        return self.fernet

    def store(self, text: str) -> int:
        token = self._current().encrypt(text.encode())
        cursor = self.db.execute("INSERT INTO records (body) VALUES (?)", (token,))
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def load(self, record_id: int) -> str:
        row = self.db.execute("SELECT body FROM records WHERE id = ?", (record_id,)).fetchone()
        if row is None:
            raise KeyError(record_id)
        token = bytes(row[0])
        try:
            return self._current().decrypt(token).decode()
        except InvalidToken:
            # Perhaps under a key staged after our last read: read the ring once more, then try again.
            return multifernet(self.refresh()).decrypt(token).decode()

    def load_all(self) -> dict[int, str]:
        ids = [int(r[0]) for r in self.db.execute("SELECT id FROM records ORDER BY id")]
        return {record_id: self.load(record_id) for record_id in ids}

    def rewrap(self) -> int:
        """Re-encrypt every record not under the primary key; returns how many moved.

        Compare-and-swap per row: a record another instance changed meanwhile is left alone.
        """
        self._current()
        moved = 0
        for record_id, body in self.db.execute("SELECT id, body FROM records").fetchall():
            token = bytes(body)
            if self.identify(token) == self.ring.primary:
                continue
            new = self.fernet.rotate(token)
            cursor = self.db.execute("UPDATE records SET body = ? WHERE id = ? AND body = ?", (new, record_id, token))
            moved += cursor.rowcount
        return moved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default=os.environ.get("VAULT_ADDR", "http://127.0.0.1:8200"))
    parser.add_argument("--mount", default="secret")
    parser.add_argument("--path", required=True, help="the secret's path in the mount, path_prefix included")
    parser.add_argument("--token-file", help="default: $VAULT_TOKEN")
    parser.add_argument("--db", default="demo-bot.db")
    parser.add_argument("--interval", type=float, default=5.0)
    parser.add_argument("--ttl", type=float, default=30.0)
    args = parser.parse_args(argv)
    reader = VaultReader(args.address, args.path, mount=args.mount, token_file=args.token_file)
    try:
        bot = Bot(reader, open_db(Path(args.db)), ttl=args.ttl)
        count = 0
        while True:
            count += 1
            moved = bot.rewrap()
            bot.store(f"record {count} written at {time.strftime('%H:%M:%S')}")
            records = bot.load_all()
            keys = ",".join(k.id for k in bot.ring.ordered())
            print(f"ring {bot.ring.version} (keys {keys}): {len(records)} records readable, {moved} moved", flush=True)
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0
    except RotatordError as exc:
        print(f"vault_bot: {exc}", file=sys.stderr)
        return 1
    finally:
        reader.close()


if __name__ == "__main__":
    sys.exit(main())
