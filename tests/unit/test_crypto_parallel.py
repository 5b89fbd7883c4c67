"""BatchRotator: re-encryption over worker processes, and the fused identify-and-rotate path.

Worker processes are real (spawned); assertions compare key ids, plaintexts and timestamps, so
a failing test prints no key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from rotatord.crypto.keyring import KeyIdentifier
from rotatord.crypto.parallel import BatchRotator, batch_rotator, default_processes
from rotatord.document import FernetKey, FernetRing
from rotatord.errors import RotationError
from rotatord.sensitive import Sensitive

T0 = datetime(2025, 1, 6, tzinfo=UTC)
STAMP = 1_700_000_000


class Ring:
    def __init__(self) -> None:
        self.material = {kid: Fernet.generate_key() for kid in ("v1", "v2", "v3")}
        self.fernet = {kid: Fernet(m) for kid, m in self.material.items()}
        self.foreign = Fernet(Fernet.generate_key())
        self.ring = FernetRing(
            "bot-db",
            3,
            "v3",
            tuple(
                FernetKey(kid, Sensitive(m.decode()), "primary" if kid == "v3" else "decrypt_only", T0 + timedelta(i))
                for i, (kid, m) in enumerate(self.material.items())
            ),
            T0,
        )

    def token(self, kid: str, plaintext: bytes) -> bytes:
        return self.fernet[kid].encrypt_at_time(plaintext, STAMP)

    def bad_padding(self, kid: str) -> bytes:
        """A token with a valid HMAC under ``kid`` whose plaintext padding is invalid."""
        raw = base64.urlsafe_b64decode(self.material[kid])
        iv = os.urandom(16)
        encryptor = Cipher(algorithms.AES(raw[16:]), modes.CBC(iv)).encryptor()
        body = b"\x80" + STAMP.to_bytes(8, "big") + iv + encryptor.update(b"x" * 15 + b"\x00") + encryptor.finalize()
        return base64.urlsafe_b64encode(body + hmac.new(raw[:16], body, hashlib.sha256).digest())


@pytest.fixture(scope="module")
def keys() -> Ring:
    return Ring()


@pytest.fixture(scope="module")
def pooled(keys: Ring) -> Iterator[BatchRotator]:
    with BatchRotator(keys.ring, 2, min_parallel=1) as rotator:
        yield rotator


def mixed(keys: Ring, count: int) -> tuple[list[bytes], list[bytes | None]]:
    """Tokens under every key plus unreadable ones, and the plaintext each should yield."""
    tokens: list[bytes] = []
    expected: list[bytes | None] = []
    for i in range(count):
        plaintext = f"row-{i}".encode() * (i % 7 + 1)
        kind = i % 5
        if kind < 3:
            tokens.append(keys.token(("v1", "v2", "v3")[kind], plaintext))
            expected.append(plaintext)
        elif kind == 3:
            tokens.append(keys.foreign.encrypt(plaintext))
            expected.append(None)
        else:
            tokens.append(keys.token("v1", plaintext)[:-4])
            expected.append(None)
    return tokens, expected


def test_results_are_in_order_under_the_primary_with_their_timestamps(pooled: BatchRotator, keys: Ring) -> None:
    tokens, expected = mixed(keys, 203)
    results = pooled(tokens)
    assert pooled.started
    assert len(results) == len(tokens)
    for result, plaintext in zip(results, expected, strict=True):
        if plaintext is None:
            assert result is None
        else:
            assert result is not None
            assert keys.fernet["v3"].decrypt(result) == plaintext  # the primary alone reads it
            assert keys.fernet["v3"].extract_timestamp(result) == STAMP


def test_classify_rotate_agrees_with_the_key_identifier(pooled: BatchRotator, keys: Ring) -> None:
    tokens, _ = mixed(keys, 150)
    good = keys.token("v2", b"payload")
    # Every single-character corruption region, and truncations: none may be misclassified.
    tokens += [good[:i] + (b"A" if good[i : i + 1] != b"A" else b"B") + good[i + 1 :] for i in range(0, len(good), 7)]
    tokens += [good[:n] for n in (0, 10, 57, len(good) - 1)]
    tokens += [b"", b"not base64 at all \xff", keys.bad_padding("v1")]
    identify = KeyIdentifier(keys.ring)
    classified = pooled.classify_rotate(tokens, "v3")
    assert [key_id for key_id, _ in classified] == [identify(t) for t in tokens]
    for (key_id, new), token in zip(classified, tokens, strict=True):
        if key_id in (None, "v3") or token == tokens[-1]:
            assert new is None  # unsigned, already under the primary, or undecryptable
        else:
            assert new is not None
            assert keys.fernet["v3"].decrypt(new) == keys.fernet[key_id].decrypt(token)
            assert keys.fernet["v3"].extract_timestamp(new) == STAMP
    assert classified[-1][0] == "v1"  # signed by v1, yet its padding is invalid: not rewritten
    assert pooled([tokens[-1]]) == [None]


def test_small_batches_stay_in_process(keys: Ring) -> None:
    with BatchRotator(keys.ring, 2, min_parallel=50) as rotator:
        tokens, expected = mixed(keys, 10)
        results = rotator(tokens)
        classified = rotator.classify_rotate(tokens, "v3")
        assert not rotator.started
        assert [r is None for r in results] == [e is None for e in expected]
        assert [k for k, _ in classified] == [KeyIdentifier(keys.ring)(t) for t in tokens]
        rotator(mixed(keys, 50)[0])
        assert rotator.started


def test_in_process_classification_is_safe_from_several_threads(keys: Ring) -> None:
    """The store calls the rotator from two threads; the in-process classifier reorders its keys
    as it goes, which must never lose or misplace one."""
    identify = KeyIdentifier(keys.ring)
    batches = [mixed(keys, 20)[0] for _ in range(8)]
    expected = [[identify(t) for t in batch] for batch in batches]
    failures: list[BaseException] = []
    with BatchRotator(keys.ring, 2, min_parallel=1000) as rotator:

        def work() -> None:
            try:
                for _ in range(10):
                    for batch, want in zip(batches, expected, strict=True):
                        assert [k for k, _ in rotator.classify_rotate(batch, "v3")] == want
            except BaseException as exc:  # surfaced below
                failures.append(exc)

        threads = [threading.Thread(target=work) for _ in range(4)]
        interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)  # switch threads as often as possible, to provoke races
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        finally:
            sys.setswitchinterval(interval)
        assert not rotator.started
    assert failures == []


def test_one_process_means_no_pool(keys: Ring) -> None:
    with batch_rotator(keys.ring, processes=1) as rotator:
        tokens, _ = mixed(keys, 500)
        assert sum(r is not None for r in rotator(tokens)) == 300
        assert not rotator.started
    assert default_processes() >= 1


def test_misuse_is_refused(keys: Ring) -> None:
    rotator = BatchRotator(keys.ring, 1)
    with pytest.raises(TypeError):
        rotator(["not bytes"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="primary"):
        rotator.classify_rotate([keys.token("v1", b"x")], "v1")
    rotator.close()
    rotator.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        rotator([keys.token("v1", b"x")])


def test_repr_holds_no_key_material(pooled: BatchRotator, keys: Ring) -> None:
    text = repr(pooled) + str(pooled)
    assert "bot-db" in text
    for material in keys.material.values():
        assert material.decode() not in text
        assert material.decode()[:20] not in text


def test_a_dead_worker_fails_the_batch_and_the_pool_is_rebuilt(keys: Ring) -> None:
    with BatchRotator(keys.ring, 2, min_parallel=1) as rotator:
        tokens, expected = mixed(keys, 40)
        rotator(tokens)
        pids = rotator.worker_pids()
        assert len(pids) == 2
        for pid in pids:  # the workers this test started
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        with pytest.raises(RotationError, match="worker"):
            while time.monotonic() < deadline:  # the death is noticed asynchronously
                rotator(tokens)
                time.sleep(0.05)
        assert not rotator.started
        results = rotator(tokens)
        assert [r is None for r in results] == [e is None for e in expected]


_ORPHAN_SCRIPT = """
import os, signal
from datetime import UTC, datetime
from cryptography.fernet import Fernet
from rotatord.crypto.parallel import BatchRotator
from rotatord.document import FernetKey, FernetRing
from rotatord.sensitive import Sensitive

if __name__ == "__main__":  # spawned workers re-import this file
    now = datetime.now(UTC)
    key = Fernet.generate_key().decode()
    ring = FernetRing("x", 1, "v1", (FernetKey("v1", Sensitive(key), "primary", now),), now)
    rotator = BatchRotator(ring, processes=2, min_parallel=1)
    tokens = [Fernet(key).encrypt(b"x") for _ in range(256)]
    assert all(rotator(tokens))
    print(" ".join(str(pid) for pid in rotator.worker_pids()), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_workers_holding_keys_die_with_a_sigkilled_parent(tmp_path: Path) -> None:
    import subprocess

    script = tmp_path / "orphan.py"
    script.write_text(_ORPHAN_SCRIPT)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == -9, result.stderr
    workers = [int(pid) for pid in result.stdout.split()]
    assert len(workers) == 2

    def alive(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                return b"multiprocessing" in fh.read()
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = [pid for pid in workers if alive(pid)]
    for pid in survivors:  # never leave them behind, even when the assertion fails
        os.kill(pid, signal.SIGKILL)
    assert survivors == [], "worker processes outlived their SIGKILLed parent"


def test_fused_rotation_matches_fernet_for_every_length_and_key_order(keys: Ring) -> None:
    """The fused path keeps AES contexts alive across tokens and batches (it supplies the CBC
    chaining value itself): every plaintext length, keys interleaved at random, batches one
    after another, each result read back by Fernet itself, with its timestamp and a fresh IV."""
    rng = __import__("random").Random(7)
    plaintexts = [os.urandom(n) for n in (*range(0, 70), 1024, 4096, 100_000)]
    with BatchRotator(keys.ring, 1) as rotator:
        for _ in range(3):
            signed_by = [rng.choice(("v1", "v2", "v3")) for _ in plaintexts]
            tokens = [keys.token(kid, p) for kid, p in zip(signed_by, plaintexts, strict=True)]
            bad = keys.bad_padding("v2")
            tokens.insert(rng.randrange(len(tokens)), bad)  # a failure mid-batch
            ivs: set[bytes] = set()
            for (key_id, new), token in zip(rotator.classify_rotate(tokens, "v3"), tokens, strict=True):
                if new is None:
                    assert key_id == "v3" or (token == bad and key_id == "v2")
                    continue
                assert key_id in ("v1", "v2")
                assert keys.fernet["v3"].decrypt(new) == keys.fernet[key_id].decrypt(token)
                assert keys.fernet["v3"].extract_timestamp(new) == STAMP
                ivs.add(base64.urlsafe_b64decode(new)[9:25])
            rotated = sum(kid != "v3" for kid in signed_by)
            assert len(ivs) == rotated  # one fresh IV per re-encrypted token


def test_tokens_fernet_reads_leniently_are_classified_as_fernet_reads_them(keys: Ring) -> None:
    """The fast base64 path is strict; whatever it refuses is decoded again with the standard
    library's lenient rules, as Fernet does: a token with a trailing newline, line breaks, or the
    standard alphabet's ``+``/``/`` is re-encrypted, never quarantined, and reads back the same."""
    base = [keys.token("v1", os.urandom(n)) for n in (40, 300, 1024)]
    lenient = [base[0] + b"\n", b"\r\n".join(base[1][i : i + 76] for i in range(0, len(base[1]), 76))]
    lenient.append(base[2].replace(b"-", b"+").replace(b"_", b"/"))
    refused = [base[0].rstrip(b"="), base[1][:-3] + b"!!!"]
    for token in lenient:
        assert keys.fernet["v1"].decrypt(token)  # Fernet itself reads each one
    with BatchRotator(keys.ring, 1) as rotator:
        classified = rotator.classify_rotate([*lenient, *refused], "v3")
    for (key_id, new), token in zip(classified[: len(lenient)], lenient, strict=True):
        assert key_id == "v1"
        assert new is not None
        assert keys.fernet["v3"].decrypt(new) == keys.fernet["v1"].decrypt(token)
        assert new == base64.urlsafe_b64encode(base64.urlsafe_b64decode(new))  # canonical form
    assert [key_id for key_id, _ in classified[len(lenient) :]] == [KeyIdentifier(keys.ring)(t) for t in refused]
