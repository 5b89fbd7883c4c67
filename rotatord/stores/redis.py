"""Redis keys matching a pattern, walked with SCAN: string values, or named fields of hashes.

The only module of rotatord that imports ``redis``; its exceptions stop here.

SCAN's cursor is the checkpoint, so a restart resumes where the walk stopped.  SCAN may return a
key twice; the second visit finds it under the primary and skips it.  Every write is a
compare-and-swap in a Lua script, one call per batch (``GET``/``HGET`` equals the value read,
then ``SET ... KEEPTTL``/``HSET``), so a value a bot changed meanwhile is never overwritten and a
key's expiry survives its re-encryption.  A script runs atomically: a batch of 500 keys holds
the server for about a millisecond.  A matching key of the wrong type stops the step with a StoreError
naming it, before anything of its batch is written.  A cursor only means something on the
server that issued it: after a failover the resumed walk may miss keys, which the final sweep
and the census before retirement catch.  Redis Cluster is not supported (SCAN is per node).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import redis
from redis.exceptions import RedisError, ResponseError

from ..config.model import RedisStoreSettings
from ..config.references import read_credential
from ..errors import StoreError
from ..interfaces import Census, DataStore, Identify, Progress, ReencryptReport, RotateBatch
from ..sensitive import Sensitive, redact
from .batch import Batch, Pacer, count_census, decode_checkpoint, run_reencrypt

__all__ = ["RedisStore"]

#: (key, field or None for a string key, the value read).
Handle = tuple[bytes, bytes | None, bytes]

#: One call per batch: for each key, SET the new value (keeping the TTL) only if GET still returns
#: the value read.  pcall: a key whose type changed meanwhile is a conflict, not an abort.
SET_IF_UNCHANGED = """
local written = 0
for i, key in ipairs(KEYS) do
  if redis.pcall('GET', key) == ARGV[2 * i - 1] then
    redis.call('SET', key, ARGV[2 * i], 'KEEPTTL')
    written = written + 1
  end
end
return written
"""
#: The same for hash fields: ARGV holds (field, old, new) per key.
HSET_IF_UNCHANGED = """
local written = 0
for i, key in ipairs(KEYS) do
  local field = ARGV[3 * i - 2]
  if redis.pcall('HGET', key, field) == ARGV[3 * i - 1] then
    redis.call('HSET', key, field, ARGV[3 * i])
    written = written + 1
  end
end
return written
"""
#: SCAN calls gathered into one batch at most, so a sparse pattern still checkpoints regularly.
SCANS_PER_BATCH = 16
#: The end of the walk, as a checkpoint cursor (SCAN's own cursor 0 means both start and end).
DONE = -1


def _bytes(key: bytes | str) -> bytes:
    # decode_responses=False: always bytes; the client's types allow str.
    return key if isinstance(key, bytes) else key.encode("utf-8")


def _name(key: bytes) -> str:
    return key.decode("utf-8", "backslashreplace")


class RedisStore(DataStore):
    """String keys, or hash fields, matching ``settings.pattern``."""

    kind = "redis"

    def __init__(
        self,
        label_prefix: str,
        settings: RedisStoreSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._settings = settings
        fields = f"[{','.join(settings.hash_fields)}]" if settings.hash_fields else ""
        self._label = f"{label_prefix}:redis:{settings.pattern}{fields}"
        self._fields = tuple(f.encode("utf-8") for f in settings.hash_fields)
        self._clock = clock
        self._sleep = sleep
        self._client: redis.Redis | None = None

    @property
    def label(self) -> str:
        return self._label

    def __repr__(self) -> str:
        return f"RedisStore({self._label!r})"

    @contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        try:
            yield
        except RedisError as exc:
            detail = redact(str(exc).splitlines()[0] if str(exc) else "")[:300]
            raise StoreError(f"{self._label}: {doing}: {type(exc).__name__}: {detail}") from None

    def _open(self) -> redis.Redis:
        if self._client is not None:
            return self._client
        raw = read_credential(self._settings.url_file, self._settings.url_credential, f"{self._label}: url")
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise StoreError(f"{self._label}: the url file is not UTF-8 text") from None
        Sensitive(text)  # registered for redaction
        try:
            client = redis.Redis.from_url(text, socket_timeout=30, socket_connect_timeout=10, decode_responses=False)
        except ValueError:
            raise StoreError(f"{self._label}: the url is not a Redis URL (redis://, rediss:// or unix://)") from None
        password = client.connection_pool.connection_kwargs.get("password")
        if password:
            Sensitive(str(password))
        self._client = client
        return client

    def check(self) -> None:
        client = self._open()
        with self._errors("cannot connect"):
            client.ping()
            version = str(client.info("server").get("redis_version", "0"))
        if not self._fields and tuple(int(p) for p in version.split(".")[:1]) < (6,):
            raise StoreError(f"{self._label}: Redis {version} lacks SET KEEPTTL (needs 6.0 or later)")
        # Catch a wrong-typed key early; the walk checks every key again before writing.
        with self._errors("cannot scan"):
            _, keys = client.scan(0, match=self._settings.pattern, count=self._settings.batch_size)
        self._values(client, [_bytes(k) for k in keys])

    # -- reading ----------------------------------------------------------------------------

    def _values(self, client: redis.Redis, keys: list[bytes]) -> list[Any]:
        """The value of each key (strings: MGET; hashes: HMGET of the fields, pipelined).

        Raises StoreError for a key of another type: MGET answers nil for those, so each nil
        is looked at again with TYPE (``none``: deleted meanwhile, not an item).
        """
        if not keys:
            return []
        with self._errors("cannot read"):
            if not self._fields:
                values: list[Any] = list(client.mget(keys))
                missing = [key for key, value in zip(keys, values, strict=True) if value is None]
                if missing:
                    pipe = client.pipeline(transaction=False)
                    for key in missing:
                        pipe.type(key)
                    for key, kind in zip(missing, pipe.execute(), strict=True):
                        self._check_type(key, kind, "string")
                return values
            pipe = client.pipeline(transaction=False)
            for key in keys:
                pipe.hmget(key, list(self._fields))
            values = pipe.execute(raise_on_error=False)
            for key, value in zip(keys, values, strict=True):
                if isinstance(value, ResponseError):
                    if "WRONGTYPE" not in str(value):
                        raise value
                    self._check_type(key, client.type(key), "hash")
        return values

    def _check_type(self, key: bytes, kind: Any, wanted: str) -> None:
        name = kind.decode() if isinstance(kind, bytes) else str(kind)
        if name not in ("none", wanted):
            raise StoreError(
                f"{self._label}: key {_name(key)!r} holds a {name}, not a {wanted} "
                f"(narrow the pattern {self._settings.pattern!r})"
            )

    def _batches(self, cursor: int) -> Iterator[Batch[Handle]]:
        client = self._open()
        while cursor != DONE:
            keys: list[bytes] = []
            for _ in range(SCANS_PER_BATCH):
                with self._errors("cannot scan"):
                    nxt, found = client.scan(cursor, match=self._settings.pattern, count=self._settings.batch_size)
                keys.extend(_bytes(k) for k in found)
                cursor = DONE if int(nxt) == 0 else int(nxt)
                if cursor == DONE or len(keys) >= self._settings.batch_size:
                    break
            handles: list[Handle] = []
            tokens: list[bytes] = []
            for key, value in zip(keys, self._values(client, keys), strict=True):
                if self._fields:
                    for field, token in zip(self._fields, value, strict=True):
                        if token is not None:
                            handles.append((key, field, token))
                            tokens.append(token)
                elif value is not None:  # None: deleted since SCAN saw it
                    handles.append((key, None, value))
                    tokens.append(value)
            yield Batch(handles, tokens, cursor)

    # -- writing ----------------------------------------------------------------------------

    def _write(self, handles: list[Handle], news: list[bytes]) -> int:
        client = self._open()
        strings: tuple[list[bytes], list[bytes]] = ([], [])
        fields: tuple[list[bytes], list[bytes]] = ([], [])
        for (key, field, old), new in zip(handles, news, strict=True):
            if field is None:
                strings[0].append(key)
                strings[1].extend((old, new))
            else:
                fields[0].append(key)
                fields[1].extend((field, old, new))
        written = 0
        with self._errors("cannot write"):
            for script, (keys, args) in ((SET_IF_UNCHANGED, strings), (HSET_IF_UNCHANGED, fields)):
                if keys:
                    written += int(client.register_script(script)(keys=keys, args=args))
        return written

    def _locate(self, handle: Handle) -> str:
        key, field, _ = handle
        return _name(key) if field is None else f"{_name(key)}[{_name(field)}]"

    # -- DataStore --------------------------------------------------------------------------

    def _pacer(self) -> Pacer | None:
        rate = self._settings.rate_limit
        return Pacer(rate, self._clock, self._sleep) if rate else None

    def census(self, identify: Identify) -> Census:
        return count_census(self._label, (b.tokens for b in self._batches(0)), identify, self._pacer())

    def reencrypt(
        self,
        rotate: RotateBatch,
        identify: Identify,
        primary_id: str,
        checkpoint: str | None,
        progress: Progress,
    ) -> ReencryptReport:
        cursor, totals = decode_checkpoint(self._label, checkpoint)
        if cursor is None:
            cursor = 0
        if not isinstance(cursor, int) or isinstance(cursor, bool) or cursor < DONE:
            raise StoreError(f"{self._label}: the checkpoint is not one this store wrote")
        return run_reencrypt(
            label=self._label,
            batches=self._batches(cursor),
            write=self._write,
            locate=self._locate,
            rotate=rotate,
            identify=identify,
            primary_id=primary_id,
            progress=progress,
            totals=totals,
            pacer=self._pacer(),
            write_behind=True,
        )

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
