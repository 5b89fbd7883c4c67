"""Webhook fan-out: one event to 1,000 consumers on loopback, each answering after 20 ms.

The receivers run in a child process (client and receivers share the machine's cores): a
minimal HTTP/1.1 keep-alive server (asyncio, ~30 lines) listening on 1,001 ports.  The sender
is the real :class:`rotatord.notify.worker.OutboxWorker` on a real SQLite state database (WAL,
``synchronous=FULL``), driven by its run loop as in the daemon: the outbox rows are queued as
the engine queues them, then the clock runs from the start of the loop until every row is
recorded ``delivered`` in the database (so ``acknowledged()`` sees it).  That includes claiming
the rows, reading each consumer's signing secret, signing each request (HMAC-SHA256, its own
secret per consumer), the SSRF check, the HTTP exchange and recording every attempt.

Scenarios, interleaved round by round so a neighbour's load skews them alike:

- 1 receiver host: 1,000 consumer URLs on one host:port (a path each): connections are reused,
  as for bots behind one ingress;
- the same plus one consumer that never answers (timeout 5 s): the clock stops when the 1,000
  are recorded while the hanging request is still in flight;
- a port per consumer: 1,000 fresh TCP connections, as for 1,000 separately hosted bots;
- the floor for both layouts: bare aiohttp POSTs to the same URLs, no signing, no database.

Run: ``python -m bench.webhooks [--consumers 1000] [--delay 0.02] [--rounds 5]``.
Nothing here asserts a timing; the asserts check that the deliveries really happened.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from multiprocessing.connection import Connection
from pathlib import Path

from rotatord.config.model import ConsumerSettings, NotifySettings
from rotatord.crypto.generators import WebhookSecretGenerator
from rotatord.engine.journal import Journal
from rotatord.interfaces import Event
from rotatord.notify.worker import OutboxWorker
from rotatord.timeutil import utcnow

from .results import Result, markdown_table

__all__ = ["run"]

BENCH = "webhooks"
TARGET_SECONDS = 0.5
HANG_TIMEOUT = timedelta(seconds=5)


# -- the receivers (child process) ------------------------------------------------------------


class _Receiver(asyncio.Protocol):
    """A minimal HTTP/1.1 keep-alive receiver: reads each request whole (headers and
    ``content-length`` body), answers 204 after ``delay``, or never for ``/hang``.  Kept this
    small so the receivers' share of the two cores stays small and the number measures rotatord."""

    delay = 0.02

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = self.buffer[:end].decode("latin-1").lower().split("\r\n")
            length = next((int(h.split(":", 1)[1]) for h in head[1:] if h.startswith("content-length:")), 0)
            if len(self.buffer) < end + 4 + length:
                return
            self.buffer = self.buffer[end + 4 + length :]
            if head[0].split(" ")[1] != "/hang":
                asyncio.get_running_loop().call_later(self.delay, self._answer)

    def _answer(self) -> None:
        if not self.transport.is_closing():
            self.transport.write(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n")


def _serve(conn: Connection, ports: int, delay: float) -> None:
    asyncio.run(_serve_async(conn, ports, delay))


async def _serve_async(conn: Connection, count: int, delay: float) -> None:
    _Receiver.delay = delay
    loop = asyncio.get_running_loop()
    servers = [await loop.create_server(_Receiver, "127.0.0.1", 0, backlog=1024) for _ in range(count)]
    conn.send([int(server.sockets[0].getsockname()[1]) for server in servers])
    await asyncio.Event().wait()  # stopped by the parent, by PID


class Receivers:
    """The child process serving ``count`` ports; stopped by its PID."""

    def __init__(self, count: int, delay: float) -> None:
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, count, delay), daemon=True)
        self.process.start()
        if not parent.poll(60):
            self.stop()
            raise RuntimeError("the receivers did not start")
        self.ports: list[int] = parent.recv()

    def stop(self) -> None:
        self.process.terminate()  # SIGTERM to this child's PID only
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


# -- the sender -------------------------------------------------------------------------------


def _worker(root: Path, urls: list[str], concurrency: int, hang_url: str | None) -> tuple[OutboxWorker, Journal, int]:
    """A worker on a fresh state database with one key.staged row per consumer, queued."""
    journal = Journal(f"sqlite:///{root / 'state.db'}")
    journal.create()
    now = utcnow()
    rid = journal.start(
        secret="bench-db",
        kind="fernet",
        version=2,
        phase="staged",
        trigger="bench",
        emergency=False,
        reason=None,
        now=now,
    ).id
    consumers = {
        f"bot-{i:04d}": ConsumerSettings(url=url, signing_secret="bench-webhook", required=True)
        for i, url in enumerate(urls)
    }
    if hang_url:
        consumers["hanging"] = ConsumerSettings(url=hang_url, signing_secret="bench-webhook", timeout=HANG_TIMEOUT)
    generator = WebhookSecretGenerator()
    secrets = {name: [generator.generate().reveal()] for name in consumers}
    notify = NotifySettings(allow=("127.0.0.1/32",), concurrency=concurrency)
    worker = OutboxWorker(journal, consumers, notify, lambda name: secrets[name])
    event = Event(
        type="key.staged",
        secret="bench-db",
        rotation_id=rid,
        version=2,
        phase="staged",
        backend="vault",
        path="bench/db-key",
        backend_version="2",
        occurred_at=now,
    )
    journal.queue_events([(name, event) for name in consumers], now)
    return worker, journal, rid


@contextmanager
def _scratch() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="rotatord-bench-webhooks-"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _fanout(urls: list[str], concurrency: int, hang_url: str | None = None) -> tuple[float, float]:
    """The daemon's run loop on a fresh outbox: wall seconds until every row but the hanging
    one is recorded delivered (``pending_count`` polled every 10 ms: one indexed COUNT), and the
    CPU seconds this process spent meanwhile (event loop and database thread)."""
    left = 1 if hang_url else 0
    with _scratch() as root:
        worker, journal, rid = _worker(root, urls, concurrency, hang_url)

        async def scenario() -> tuple[float, float]:
            stop, wake = asyncio.Event(), asyncio.Event()
            start, cpu = time.perf_counter(), time.process_time()
            loop = asyncio.create_task(worker.run(stop, wake))
            try:
                while await asyncio.to_thread(worker.pending_count) > left:
                    if time.perf_counter() - start > 60:
                        raise RuntimeError("the fan-out did not finish in 60 s")
                    await asyncio.sleep(0.01)
                elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
                assert worker.acknowledged(rid, "key.staged")
                # A hanging consumer is still in flight, never recorded: it delayed no one.
                assert elapsed < HANG_TIMEOUT.total_seconds()
                return elapsed, cpu
            finally:
                stop.set()
                await loop

        result = asyncio.run(scenario())
        assert worker.pending_count() == left
        journal.close()
        return result


def _bare_aiohttp(urls: list[str], concurrency: int) -> tuple[float, float]:
    """The floor: plain aiohttp POSTs of a small body to the same URLs; no signing, no database."""

    async def go() -> float:
        import aiohttp

        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
            slots = asyncio.Semaphore(concurrency)

            async def one(url: str) -> int:
                async with slots, session.post(url, data=b"{}") as response:
                    await response.read()
                    return response.status

            start = time.perf_counter()
            statuses = await asyncio.gather(*(one(u) for u in urls))
            elapsed = time.perf_counter() - start
        assert statuses.count(204) == len(urls)
        return elapsed

    cpu = time.process_time()
    elapsed = asyncio.run(go())
    return elapsed, time.process_time() - cpu


def _median(samples: list[float], unit: str = "s") -> tuple[float, str]:
    return statistics.median(samples), f"min {min(samples):.3f} {unit}, max {max(samples):.3f} {unit}"


def run(consumers: int = 1000, delay: float = 0.02, rounds: int = 5, concurrency: int = 200) -> list[Result]:
    """Rounds interleave the scenarios, so a neighbour's load skews them alike."""
    receivers = Receivers(consumers + 1, delay)
    ports = receivers.ports
    shared = [f"http://127.0.0.1:{ports[0]}/hook/{i}" for i in range(consumers)]
    distinct = [f"http://127.0.0.1:{port}/hook" for port in ports[:consumers]]
    hang_url = f"http://127.0.0.1:{ports[consumers]}/hang"
    wall: dict[str, list[float]] = {k: [] for k in ("shared", "hang", "bare shared", "distinct", "bare distinct")}
    cpu: dict[str, list[float]] = {k: [] for k in ("shared", "bare shared")}
    try:
        _fanout(shared[:50], concurrency)  # warm-up: imports, code paths
        for _ in range(rounds):
            for key, (elapsed, used) in (
                ("shared", _fanout(shared, concurrency)),
                ("bare shared", _bare_aiohttp(shared, concurrency)),
                ("distinct", _fanout(distinct, concurrency)),
                ("bare distinct", _bare_aiohttp(distinct, concurrency)),
            ):
                wall[key].append(elapsed)
                if key in cpu:
                    cpu[key].append(used)
            wall["hang"].append(_fanout(shared, concurrency, hang_url)[0])
    finally:
        receivers.stop()
    common = f"{consumers} consumers, {delay * 1000:g} ms answers, concurrency {concurrency}, median of {rounds}"
    rows = [
        ("shared", "fan-out: 1 receiver host, a path per consumer", TARGET_SECONDS),
        ("hang", "same + 1 consumer hanging (5 s timeout)", TARGET_SECONDS),
        ("bare shared", "floor: bare aiohttp, same URLs (no signing, no DB)", None),
        ("distinct", "fan-out: a port per consumer (no connection reuse)", None),
        ("bare distinct", "floor: bare aiohttp, same URLs (no signing, no DB)", None),
    ]
    results = []
    for key, metric, limit in rows:
        value, spread = _median(wall[key])
        results.append(Result(BENCH, metric, value, "s", limit, note=f"{common}; {spread}"))
    for key, metric in (("shared", "CPU of the sender, 1 receiver host"), ("bare shared", "CPU of bare aiohttp, same")):
        value, spread = _median(cpu[key], "s")
        results.append(Result(BENCH, metric, value, "s", note=f"this process, all threads; {spread}"))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.webhooks", description=__doc__.splitlines()[0])
    parser.add_argument("--consumers", type=int, default=1000)
    parser.add_argument("--delay", type=float, default=0.02, help="receiver answer delay, seconds (default 0.02)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=200, help="notify.concurrency (default 200, the default)")
    args = parser.parse_args(argv)
    print(markdown_table(run(args.consumers, args.delay, args.rounds, args.concurrency)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
