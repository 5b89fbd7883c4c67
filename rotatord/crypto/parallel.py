"""Re-encrypt batches of Fernet tokens on several processes: the stores' ``RotateBatch``.

Re-encryption is CPU-bound (HMAC, AES, base64 on every token) and the GIL keeps it on one core,
so large batches go to worker processes, each with its own pipe (see :class:`_Worker` and the
wire format below).  Each worker receives the ring's key material once, as its start-up
arguments, and builds its own ring; requests carry tokens only, and no key is ever logged or put
in a repr.  Workers are started with ``spawn``: forking a daemon that runs threads could copy a
lock held by another thread, and a fresh interpreter holds nothing but what it is given.  Like
any spawn child, the workers import the program's main module, which must therefore guard its
entry point with ``if __name__ == "__main__":`` (the console script does).

Small batches are re-encrypted in the calling process, where a round trip to the workers would
cost more than it saves.  Every result keeps the token's original timestamp (``MultiFernet.rotate``).

:meth:`BatchRotator.classify_rotate` does a store's whole per-item work in the workers: find the
key that signed each token (as :class:`~rotatord.crypto.keyring.KeyIdentifier` does, from the
HMAC) and re-encrypt the ones not under the primary.  Identifying first and then calling
``MultiFernet.rotate`` decodes every token and checks its HMAC twice, once per step; here the key
whose HMAC matched decrypts the token directly and the primary encrypts, AES-CBC through
``cryptography``'s primitives with contexts built once per key (see :class:`_Key`: building a
``Cipher`` context costs more than the AES work on a 1 KiB token) and PKCS7 checked by hand.
Nothing is decrypted before its HMAC verified (``hmac.compare_digest``), so a malformed token
leaks nothing about why it failed, and no padding oracle exists.  The tokens produced are plain
Fernet tokens (version, original timestamp, fresh random IV, HMAC-SHA256), read by any Fernet.
Base64 goes through pybase64 (SIMD; the standard library's codec cost a third of the crypto
time), with the standard library's lenient decoding behind it for anything not well-formed (see
:func:`_decode`), and a batch's IVs come from one ``os.urandom`` call.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import multiprocessing
import os
import struct
import threading
import time
from array import array
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from multiprocessing.connection import Connection
from types import TracebackType

import pybase64
from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from ..document import FernetRing
from ..errors import RotationError

__all__ = ["BatchRotator", "Classified", "batch_rotator", "default_processes"]

#: Per token: the id of the key that signed it (None: no key of the ring) and the token
#: re-encrypted under the primary (None when it is under the primary already, signed by no key,
#: or signed by a key but not decryptable).
Classified = tuple[str | None, bytes | None]

#: Below this many tokens a batch is re-encrypted in-process (a round trip to the workers costs ~1 ms,
#: about 25 tokens' worth of crypto on the machines this was measured on).
MIN_PARALLEL_BATCH = 64
#: Tasks per process and batch: more than one evens out the processes' finishing times.
CHUNKS_PER_PROCESS = 2

_VERSION = 0x80
_HEADER = 1 + 8 + 16  # version, timestamp, IV
_MAC = 32
_BLOCK = 16
_MIN_TOKEN = _HEADER + _BLOCK + _MAC
_FROM_URLSAFE = bytes.maketrans(b"-_", b"+/")


class _Key:
    """One key of the ring with its cipher state built once: a keyed HMAC to copy, and two AES-CBC
    contexts (one decrypting, one encrypting) that live as long as the process.

    Creating a ``Cipher`` context costs more than AES-CBC over a 1 KiB token, and Fernet makes
    one per call.  A running CBC context needs no reset between messages, because CBC chains on
    the previous *ciphertext* block, and both methods hand it that block themselves:

    * decryption feeds ``IV | C1 ... Cn`` (the token holds them contiguously): the output block
      for IV depends on whatever came before and is dropped; every later block is
      ``D(Ci) xor C(i-1)`` with ``C0 = IV``, which is exactly the plaintext.
    * encryption feeds ``R | P1 ... Pn`` with ``R`` a fresh random block: the first output block,
      ``E(R xor <previous block>)``, is uniformly random whatever came before and becomes the
      token's IV; the next ones are ``E(Pi xor C(i-1))`` with ``C0 = IV``, exactly a CBC
      encryption under that IV.  Encrypting a random nonce under the same key to make the IV is
      one of the two methods NIST SP 800-38A (appendix C) gives for CBC IVs.
    """

    __slots__ = ("_cbc_dec", "_cbc_enc", "mac")

    def __init__(self, raw: bytes) -> None:
        aes = algorithms.AES(raw[16:])
        self.mac = hmac.new(raw[:16], digestmod=hashlib.sha256)
        self._cbc_dec = Cipher(aes, modes.CBC(bytes(_BLOCK))).decryptor()
        self._cbc_enc = Cipher(aes, modes.CBC(bytes(_BLOCK))).encryptor()

    def decrypt(self, iv_and_ciphertext: memoryview) -> bytes:
        """AES-CBC decryption of the blocks after the IV (whole blocks), padding kept."""
        return self._cbc_dec.update(iv_and_ciphertext)[_BLOCK:]

    def encrypt(self, nonce: bytes, padded: bytes) -> bytes:
        """``IV | ciphertext``: AES-CBC encryption of ``padded`` (whole blocks) under a random IV
        derived from the random block ``nonce`` (see the class docstring)."""
        out = self._cbc_enc.update(nonce + padded)
        if len(out) != _BLOCK + len(padded):  # pragma: no cover - whole blocks in, whole blocks out
            raise RuntimeError("AES-CBC returned a partial block")
        return out


class _Classifier:
    """Identify-and-rotate over one ring; built once per process (key material stays inside)."""

    __slots__ = ("_keys", "_order", "_primary", "_primary_index")

    def __init__(self, keys: Sequence[tuple[str, str]], primary_id: str) -> None:
        entries = []
        primary: _Key | None = None
        for key_id, material in keys:
            raw = base64.urlsafe_b64decode(material.encode("ascii"))
            if len(raw) != 32:
                raise ValueError(f"key {key_id!r} is not a Fernet key")
            entries.append(_Key(raw))
            if key_id == primary_id:
                primary = entries[-1]
                self._primary_index = len(entries) - 1
        if primary is None:
            raise ValueError("the primary key is not in the ring")
        self._primary = primary
        self._keys = tuple(entries)
        self._order = list(range(len(entries)))

    def run(self, tokens: Sequence[bytes]) -> tuple[list[int], list[bytes | None]]:
        """Per token the index of its signing key (-1: none) and its re-encryption (see Classified)."""
        indexes: list[int] = []
        results: list[bytes | None] = []
        # One getrandom call for the batch's IV nonces instead of one per token (the same CSPRNG).
        nonces = os.urandom(_BLOCK * len(tokens))
        for at, token in enumerate(tokens):
            index, new = self._one(token, nonces[at * _BLOCK : (at + 1) * _BLOCK])
            indexes.append(index)
            results.append(new)
        return indexes, results

    def _one(self, token: bytes, nonce: bytes) -> tuple[int, bytes | None]:
        data = _decode(token)
        if data is None:
            return -1, None
        size = len(data)
        if size < _MIN_TOKEN or (size - _HEADER - _MAC) % _BLOCK or data[0] != _VERSION:
            return -1, None
        signed = memoryview(data)[:-_MAC]
        mac = data[-_MAC:]
        order = self._order
        for position, index in enumerate(order):
            key = self._keys[index]
            candidate = key.mac.copy()
            candidate.update(signed)
            if not hmac.compare_digest(candidate.digest(), mac):
                continue
            if position:
                # Tokens of a store come in runs under the same key (all old on the first pass,
                # all primary later): trying the last key that matched first saves an HMAC each.
                order.insert(0, order.pop(position))
            if index == self._primary_index:
                return index, None
            padded = key.decrypt(signed[9:])
            # PKCS7, checked only after the HMAC verified (so no padding oracle), as Fernet does.
            # The same padded plaintext is encrypted again: its padding is the same.
            pad = padded[-1]
            if not 1 <= pad <= _BLOCK or padded[-pad:] != bytes((pad,)) * pad:
                return index, None
            return index, self._encrypt(data[1:9], padded, nonce)
        return -1, None

    def _encrypt(self, timestamp: bytes, padded: bytes, nonce: bytes) -> bytes:
        """A Fernet token of the padded plaintext under the primary, with the given timestamp
        bytes; ``nonce`` is a fresh random block (the IV derives from it, see :class:`_Key`)."""
        body = b"\x80" + timestamp + self._primary.encrypt(nonce, padded)
        mac = self._primary.mac.copy()
        mac.update(body)
        return pybase64.urlsafe_b64encode(body + mac.digest())


def _decode(token: bytes) -> bytes | None:
    """The bytes of a token as ``Fernet`` reads them (``base64.urlsafe_b64decode``), None if it
    cannot.  A well-formed token takes pybase64's SIMD path (strict: the alphabet and padding
    only); anything else is decoded again with the standard library's lenient rules (which skip
    characters outside the alphabet), so no token Fernet would read is ever misjudged."""
    if b"+" not in token and b"/" not in token:  # pybase64 would take those too, with a warning
        try:
            return pybase64.b64decode(token, altchars=b"-_", validate=True)
        except (binascii.Error, ValueError):
            pass
    try:
        return binascii.a2b_base64(token.translate(_FROM_URLSAFE))
    except (binascii.Error, ValueError):
        return None


def _exit_with_parent(parent: int) -> None:
    """A worker holds key material: it must not outlive the daemon, even one killed by SIGKILL.

    Its pipe gives it EOF when the parent dies, but only once it waits on the pipe again; a
    thread notices the re-parenting meanwhile and ends the process.  ``parent`` comes from the
    parent itself: a worker still starting when its parent died is re-parented already.
    """

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _rotate_all(ring: MultiFernet, tokens: Sequence[bytes]) -> list[bytes | None]:
    rotate = ring.rotate
    results: list[bytes | None] = []
    append = results.append
    for token in tokens:
        try:
            append(rotate(token))
        except InvalidToken:
            append(None)
    return results


# -- the wire: a request or a reply is one message of raw bytes, never a pickle ------------------
#
#   request: op (1 byte) | n (u32) | n lengths (u32) | the n tokens, concatenated
#   reply:   n (u32) | n key indexes (i16, -1 = none; "rotate" replies send none) |
#            n lengths (u32, 0 = None) | the tokens, concatenated
#
# Pickling a list of 1,000 tokens, pushing it through the executor's shared queue and its feeder
# and manager threads cost the daemon's process more than its database work, and left the
# workers waiting on that process (measured with py-spy: 38 % of a worker's time in crypto).

_OP_STOP = 0
_OP_ROTATE = 1
_OP_CLASSIFY = 2
_HEAD = struct.Struct("<BI")
_COUNT = struct.Struct("<I")


def _pack_tokens(tokens: Sequence[bytes | None]) -> list[bytes]:
    lengths = array("I", [0 if t is None else len(t) for t in tokens])
    return [lengths.tobytes(), b"".join(t for t in tokens if t is not None)]


def _unpack_tokens(view: memoryview, count: int, offset: int, *, empty: bytes | None = None) -> list[bytes | None]:
    """The ``count`` tokens at ``offset``; a length of 0 reads as ``empty``: None in replies (no
    re-encrypted token is ever empty), ``b""`` in requests (an empty stored value is a token too)."""
    lengths = array("I")
    lengths.frombytes(view[offset : offset + 4 * count])
    at = offset + 4 * count
    out: list[bytes | None] = []
    append = out.append
    for size in lengths:
        append(bytes(view[at : at + size]) if size else empty)
        at += size
    return out


def _request(op: int, tokens: Sequence[bytes]) -> bytes:
    return b"".join([_HEAD.pack(op, len(tokens)), *_pack_tokens(tokens)])


def _worker_main(conn: Connection, keys: tuple[tuple[str, str], ...], primary_id: str, parent: int) -> None:
    """A worker: build the ring once, then answer requests in order until the pipe closes."""
    _exit_with_parent(parent)
    ring = MultiFernet([Fernet(material.encode("ascii")) for _, material in keys])
    classifier = _Classifier(keys, primary_id)
    del keys
    while True:
        try:
            message = conn.recv_bytes()
        except (EOFError, OSError):
            return
        view = memoryview(message)
        op, count = _HEAD.unpack_from(view)
        if op == _OP_STOP:
            return
        tokens = [t for t in _unpack_tokens(view, count, _HEAD.size, empty=b"") if t is not None]
        if op == _OP_CLASSIFY:
            indexes, news = classifier.run(tokens)
            reply = [_COUNT.pack(count), array("h", indexes).tobytes(), *_pack_tokens(news)]
        else:
            reply = [_COUNT.pack(count), *_pack_tokens(_rotate_all(ring, tokens))]
        del message, view, tokens
        conn.send_bytes(b"".join(reply))


class _Worker:
    """One worker process and its own duplex pipe.  Requests are answered in the order sent;
    a reader thread hands each reply to the request's future.  A dead worker fails every
    request in flight (and every later one) with RotationError."""

    def __init__(self, keys: tuple[tuple[str, str], ...], primary_id: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        ours, theirs = ctx.Pipe(duplex=True)
        self.process = ctx.Process(
            target=_worker_main, args=(theirs, keys, primary_id, os.getpid()), name="rotatord-crypto", daemon=True
        )
        self.process.start()
        theirs.close()
        self._conn = ours
        self._send_lock = threading.Lock()
        self._pending: deque[Future[bytes]] = deque()
        self.broken = False
        threading.Thread(target=self._read, name="rotatord-crypto-reader", daemon=True).start()

    def submit(self, message: bytes) -> Future[bytes]:
        future: Future[bytes] = Future()
        with self._send_lock:
            if self.broken:
                raise _Died()
            self._pending.append(future)
            try:
                self._conn.send_bytes(message)  # blocks while the worker is busy and the pipe full
            except OSError:
                self.broken = True
                raise _Died() from None
        return future

    def _read(self) -> None:
        while True:
            try:
                reply = self._conn.recv_bytes()
            except (EOFError, OSError):
                break
            self._pending.popleft().set_result(reply)
        with self._send_lock:
            self.broken = True
            while self._pending:
                self._pending.popleft().set_exception(_Died())

    def close(self, timeout: float = 5.0) -> None:
        # Asked to stop, rather than by closing the pipe: the reader thread is blocked reading
        # it, and a descriptor closed under a blocked read stays open until that read returns.
        with self._send_lock:
            self.broken = True
            with contextlib.suppress(OSError):
                self._conn.send_bytes(_HEAD.pack(_OP_STOP, 0))
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout)
        self._conn.close()


class _Died(Exception):
    """A worker process died (or its pipe broke) with requests in flight."""


def default_processes() -> int:
    """The CPUs this process may run on (``sched_getaffinity``), at most 8."""
    try:
        available = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        available = os.cpu_count() or 1
    return max(1, min(8, available))


class BatchRotator:
    """A :data:`~rotatord.interfaces.RotateBatch`: ``rotator(tokens)`` returns one result per
    token, in order, the token re-encrypted under the ring's primary or ``None`` when no key of
    the ring can decrypt it.  Raises TypeError for a token that is not bytes, ValueError after
    :meth:`close`, RotationError when a worker process died (the workers are rebuilt on next use).

    Safe to call from several threads at once.  The workers start on the first batch large
    enough to need them and live until :meth:`close`.  The repr names no key.
    """

    def __init__(self, ring: FernetRing, processes: int | None = None, *, min_parallel: int = MIN_PARALLEL_BATCH):
        ordered = ring.ordered()
        self._key_ids = tuple(key.id for key in ordered)
        self._materials = tuple(key.material for key in ordered)
        self._primary = ring.primary
        self._local = MultiFernet([Fernet(m.reveal().encode("ascii")) for m in self._materials])
        self._local_classifier: _Classifier | None = None
        self._local_lock = threading.Lock()
        self._processes = default_processes() if processes is None else max(1, processes)
        self._min_parallel = max(1, min_parallel)
        self._workers: list[_Worker] | None = None
        self._next = 0
        self._lock = threading.Lock()
        self._closed = False
        self._ring_name = ring.name

    @property
    def processes(self) -> int:
        return self._processes

    @property
    def started(self) -> bool:
        """Whether the worker processes are running."""
        return self._workers is not None

    def worker_pids(self) -> list[int]:
        """The PIDs of the running worker processes (none before the first parallel batch)."""
        workers = self._workers
        return [w.process.pid for w in workers or () if w.process.pid is not None]

    def __repr__(self) -> str:
        return f"BatchRotator(ring={self._ring_name!r}, processes={self._processes}, started={self.started})"

    def _ensure_workers(self) -> list[_Worker]:
        with self._lock:
            if self._closed:
                raise ValueError("BatchRotator is closed")
            if self._workers is None:
                keys = self._reveal()
                self._workers = [_Worker(keys, self._primary) for _ in range(self._processes)]
            return self._workers

    def _reveal(self) -> tuple[tuple[str, str], ...]:
        return tuple((key_id, m.reveal()) for key_id, m in zip(self._key_ids, self._materials, strict=True))

    def _chunks(self, tokens: Sequence[bytes]) -> list[Sequence[bytes]]:
        if self._closed:
            raise ValueError("BatchRotator is closed")
        if not all(isinstance(token, bytes) for token in tokens):
            raise TypeError("tokens must be bytes")
        parts = min(len(tokens), self._processes * CHUNKS_PER_PROCESS)
        size = -(-len(tokens) // parts) if parts else 1
        return [tokens[i : i + size] for i in range(0, len(tokens), size)]

    def _parallel(self, tokens: Sequence[bytes]) -> bool:
        return self._processes >= 2 and len(tokens) >= self._min_parallel

    def __call__(self, tokens: Sequence[bytes]) -> list[bytes | None]:
        chunks = self._chunks(tokens)
        if not self._parallel(tokens):
            return _rotate_all(self._local, tokens)
        results: list[bytes | None] = []
        for reply, chunk in zip(self._map(_OP_ROTATE, chunks), chunks, strict=True):
            view = memoryview(reply)
            (count,) = _COUNT.unpack_from(view)
            if count != len(chunk):  # pragma: no cover - a bug in the wire format
                raise RotationError("a re-encryption worker answered for a different batch")
            results.extend(_unpack_tokens(view, count, _COUNT.size))
        return results

    def classify_rotate(self, tokens: Sequence[bytes], primary_id: str) -> list[Classified]:
        """For each token, the key that signed it and its re-encryption (see :data:`Classified`).

        ``primary_id`` must be the ring's primary (ValueError otherwise): it is the caller's
        statement of which items to skip.  Raises like :meth:`__call__`.
        """
        if primary_id != self._primary:
            raise ValueError("primary_id is not the primary of this rotator's ring")
        chunks = self._chunks(tokens)
        key_ids = self._key_ids
        results: list[Classified] = []
        if not self._parallel(tokens):
            # One classifier per process, and it reorders its keys as it goes: one thread at a time.
            with self._local_lock:
                if self._local_classifier is None:
                    self._local_classifier = _Classifier(self._reveal(), self._primary)
                local_indexes, local_news = self._local_classifier.run(tokens)
            return [(key_ids[i] if i >= 0 else None, new) for i, new in zip(local_indexes, local_news, strict=True)]
        for reply, chunk in zip(self._map(_OP_CLASSIFY, chunks), chunks, strict=True):
            view = memoryview(reply)
            (count,) = _COUNT.unpack_from(view)
            if count != len(chunk):  # pragma: no cover - a bug in the wire format
                raise RotationError("a re-encryption worker answered for a different batch")
            indexes = array("h")
            indexes.frombytes(view[_COUNT.size : _COUNT.size + 2 * count])
            news = _unpack_tokens(view, count, _COUNT.size + 2 * count)
            results.extend((key_ids[i] if i >= 0 else None, new) for i, new in zip(indexes, news, strict=True))
        return results

    def _map(self, op: int, chunks: list[Sequence[bytes]]) -> list[bytes]:
        """Send each chunk to the next worker in turn, then collect the replies in order."""
        workers = self._ensure_workers()
        try:
            with self._lock:
                first, self._next = self._next, self._next + len(chunks)
            futures = [workers[(first + i) % len(workers)].submit(_request(op, c)) for i, c in enumerate(chunks)]
            return [f.result() for f in futures]
        except _Died:
            self._discard(workers)
            raise RotationError("a re-encryption worker process died; the step will be retried") from None

    def _discard(self, workers: list[_Worker]) -> None:
        with self._lock:
            if self._workers is workers:
                self._workers = None
        for worker in workers:
            worker.close(timeout=1.0)

    def close(self) -> None:
        """Stop the worker processes.  Idempotent."""
        with self._lock:
            self._closed = True
            workers, self._workers = self._workers, None
        for worker in workers or ():
            worker.close()

    def __enter__(self) -> BatchRotator:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def batch_rotator(ring: FernetRing, processes: int | None = None) -> BatchRotator:
    """A :class:`BatchRotator` over ``ring`` using ``processes`` workers (default: the CPUs
    available, at most 8; 1 means in-process only).  Call ``close()`` when done."""
    return BatchRotator(ring, processes)
