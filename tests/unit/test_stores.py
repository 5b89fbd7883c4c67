"""Store pieces that need no server: the registry, the rate limit, checkpoints, the files store's
walk and rewrites, SQLite-only key types.  The contract suite covers behaviour shared by all."""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import stat
import tempfile
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, get_args

import pytest
from cryptography.fernet import Fernet

from rotatord.config.model import FilesStoreSettings, SqlStoreSettings, StoreSettings
from rotatord.crypto.keyring import KeyIdentifier
from rotatord.document import FernetKey, FernetRing
from rotatord.errors import ConfigError, StoreError
from rotatord.interfaces import DataStore, Progress, ReencryptReport
from rotatord.sensitive import Sensitive
from rotatord.stores import files
from rotatord.stores.batch import Pacer, TokenBucket, Totals, decode_checkpoint, encode_checkpoint
from rotatord.stores.files import MAX_RESTORE_ROUNDS, MAX_TOKEN_FILE, TEMP_PREFIX, FilesStore, GlobPattern
from rotatord.stores.registry import STORES, label_prefix, open_store, store_class
from rotatord.stores.sql import SqlStore

T0 = datetime(2025, 1, 6, tzinfo=UTC)
STAMP = 1_700_000_000


class Recorder(Progress):
    def __init__(self, stop_after: int | None = None) -> None:
        self.stop_after = stop_after
        self.checkpoints: list[str] = []
        self.quarantined: list[tuple[str, str]] = []

    def checkpoint(self, checkpoint: str, totals: ReencryptReport) -> None:
        self.checkpoints.append(checkpoint)

    def quarantine(self, locator: str, reason: str) -> None:
        self.quarantined.append((locator, reason))

    def should_stop(self) -> bool:
        return self.stop_after is not None and len(self.checkpoints) >= self.stop_after


MATERIAL = {"v1": Fernet.generate_key(), "v2": Fernet.generate_key()}


@pytest.fixture(scope="module")
def keys() -> dict[str, Fernet]:
    return {key_id: Fernet(material) for key_id, material in MATERIAL.items()}


@pytest.fixture(scope="module")
def ring() -> FernetRing:
    return FernetRing(
        "bot-db",
        2,
        "v2",
        (
            FernetKey("v1", Sensitive(MATERIAL["v1"].decode()), "decrypt_only", T0 - timedelta(days=30)),
            FernetKey("v2", Sensitive(MATERIAL["v2"].decode()), "primary", T0),
        ),
        T0,
    )


def rotate_with(ring: FernetRing) -> Any:
    from rotatord.crypto.parallel import BatchRotator

    return BatchRotator(ring, 1)


# -- registry -------------------------------------------------------------------------------


def test_registry_covers_every_configured_kind() -> None:
    union = get_args(get_args(StoreSettings)[0])
    kinds = {get_args(member.model_fields["kind"].annotation)[0] for member in union}
    assert set(STORES) == kinds
    for kind in kinds:
        assert issubclass(store_class(kind), DataStore)
        assert store_class(kind).kind == kind
    with pytest.raises(ConfigError, match="unknown store kind 'nfs'"):
        store_class("nfs")


def test_open_store_labels_by_secret_and_index_without_reading_the_url(tmp_path: Path) -> None:
    settings = SqlStoreSettings(
        kind="sql", url_file=tmp_path / "missing-url", table="messages", key=("id",), columns=("body", "title")
    )
    store = open_store("support-bot-db", 2, settings)  # the missing URL file is not read yet
    assert isinstance(store, SqlStore)
    assert store.label == f"{label_prefix('support-bot-db', 2)}:sql:messages(body,title)"
    assert store.label.startswith("support-bot-db.stores[2]")
    with pytest.raises(ConfigError, match="url"):
        store.check()
    files = open_store("x", 0, FilesStoreSettings(kind="files", directory=tmp_path, pattern="*.tok"))
    assert isinstance(files, FilesStore)
    assert files.label == f"x.stores[0]:files:{tmp_path}/*.tok"


# -- rate limit and checkpoints -------------------------------------------------------------


def test_token_bucket_averages_to_the_rate() -> None:
    bucket = TokenBucket(100.0, now=0.0)
    assert bucket.reserve(60, 0.0) == 0.0
    assert bucket.reserve(40, 0.0) == 0.0  # a full second's burst
    assert bucket.reserve(50, 0.0) == pytest.approx(0.5)
    assert bucket.reserve(50, 0.5) == pytest.approx(0.5)  # the debt was paid by the wait
    assert bucket.reserve(10, 10.0) == 0.0  # refilled, but never beyond one second's worth
    assert bucket.reserve(95, 10.0) == pytest.approx(0.05)
    with pytest.raises(ValueError):
        TokenBucket(0, now=0.0)


def test_pacer_sleeps_in_slices_and_gives_way_to_a_stop() -> None:
    now = [0.0]
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        now[0] += seconds

    pacer = Pacer(2.0, clock=lambda: now[0], sleep=sleep)
    assert pacer.wait(2)
    assert pacer.wait(4)
    assert sum(sleeps) == pytest.approx(2.0)
    assert max(sleeps) <= Pacer.SLICE
    stopping = iter([False, False, True])
    assert not pacer.wait(10, lambda: next(stopping))
    assert sum(sleeps) == pytest.approx(2.5)  # gave up after two slices


def test_checkpoints_carry_position_and_totals() -> None:
    totals = Totals(scanned=10, rewritten=7, skipped=2, conflicts=1, quarantined=0)
    text = encode_checkpoint([3, "b"], totals)
    assert decode_checkpoint("s", text) == ([3, "b"], totals)
    assert decode_checkpoint("s", None) == (None, Totals())
    for bad in ("", "{}", '{"v":1,"at":null,"n":[1,2]}', '{"v":2,"at":null,"n":[0,0,0,0,0]}', "[1]"):
        with pytest.raises(StoreError, match=r"^s: "):
            decode_checkpoint("s", bad)


# -- files: glob ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "path", "matches"),
    [
        ("*.tok", "a.tok", True),
        ("*.tok", "sub/a.tok", False),
        ("*.tok", ".hidden.tok", False),
        (".*.tok", ".hidden.tok", True),
        ("**/*.tok", "a.tok", True),
        ("**/*.tok", "x/y/z/a.tok", True),
        ("**/*.tok", ".git/a.tok", False),
        ("**/*", "deep/er/file", True),
        ("sub/*/t?.tok", "sub/x/t1.tok", True),
        ("sub/*/t?.tok", "sub/x/t12.tok", False),
        ("sub/*/t?.tok", "other/x/t1.tok", False),
        ("[ab]*.tok", "b1.tok", True),
        ("[ab]*.tok", "c1.tok", False),
        ("tokens/**", "tokens/a/b", True),
    ],
)
def test_glob_pattern_follows_glob_conventions(pattern: str, path: str, matches: bool) -> None:
    assert GlobPattern(pattern).matches(path) is matches


@pytest.mark.parametrize("pattern", ["/etc/*", "../*", "a//b", "a/./b"])
def test_glob_pattern_refuses_escaping_patterns(pattern: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        GlobPattern(pattern)
    store = FilesStore("t", FilesStoreSettings(kind="files", directory=tmp_path, pattern=pattern))
    with pytest.raises(StoreError, match="pattern must be relative"):
        store.check()


# -- files: walk and rewrite ----------------------------------------------------------------


def files_store(directory: Path, pattern: str = "**/*.tok", batch_size: int = 3) -> FilesStore:
    return FilesStore(
        "t", FilesStoreSettings(kind="files", directory=directory, pattern=pattern, batch_size=batch_size)
    )


def test_files_keep_newline_convention_mode_and_owner(
    tmp_path: Path, keys: dict[str, Fernet], ring: FernetRing
) -> None:
    contents = {
        "lf.tok": keys["v1"].encrypt_at_time(b"lf", STAMP) + b"\n",
        "crlf.tok": keys["v1"].encrypt_at_time(b"crlf", STAMP) + b"\r\n",
        "bare.tok": keys["v1"].encrypt_at_time(b"bare", STAMP),
    }
    for name, data in contents.items():
        (tmp_path / name).write_bytes(data)
    os.chmod(tmp_path / "lf.tok", 0o640)
    owner = (65534, 65534) if os.geteuid() == 0 else (os.getuid(), os.getgid())
    os.chown(tmp_path / "lf.tok", *owner)
    with rotate_with(ring) as rotate:
        report = files_store(tmp_path).reencrypt(rotate, KeyIdentifier(ring), "v2", None, Recorder())
    assert report.rewritten == 3
    for name, suffix in (("lf.tok", b"\n"), ("crlf.tok", b"\r\n"), ("bare.tok", b"")):
        data = (tmp_path / name).read_bytes()
        body = data[: len(data) - len(suffix)]
        assert data.endswith(suffix)
        assert not body.endswith(b"\n")
        assert keys["v2"].decrypt(body) == name.split(".")[0].encode()
    st = (tmp_path / "lf.tok").stat()
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert (st.st_uid, st.st_gid) == owner
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".rotatord-")]  # no temp file left


def test_files_follow_links_to_files_and_skip_what_is_not_a_file(
    tmp_path: Path, keys: dict[str, Fernet], ring: FernetRing
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "real.tok").write_bytes(keys["v1"].encrypt(b"via link"))
    root = tmp_path / "store"
    (root / "sub").mkdir(parents=True)
    (root / "link.tok").symlink_to(outside / "real.tok")
    (root / "dirlink").symlink_to(outside, target_is_directory=True)  # not descended into
    (root / "dangling.tok").symlink_to(tmp_path / "nowhere")
    os.mkfifo(root / "sub" / "fifo.tok")  # opening it would block: must be skipped
    (root / ".rotatord-left.tmp.tok").write_bytes(b"garbage")  # a temp file of ours: ignored
    identify = KeyIdentifier(ring)
    census = files_store(root).census(identify)
    assert (census.by_key, census.unreadable) == ({"v1": 1}, 0)
    done = threading.Event()
    with rotate_with(ring) as rotate:

        def run() -> None:
            files_store(root).reencrypt(rotate, identify, "v2", None, Recorder())
            done.set()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        worker.join(timeout=30)
    assert done.is_set()
    assert (root / "link.tok").is_symlink()
    assert keys["v2"].decrypt((outside / "real.tok").read_bytes()) == b"via link"


def test_files_resume_in_sorted_order_across_directories(
    tmp_path: Path, keys: dict[str, Fernet], ring: FernetRing
) -> None:
    names = ["a.tok", "b/a.tok", "b/c/a.tok", "b/c/b.tok", "b/d.tok", "ba.tok", "c/z.tok"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(keys["v1"].encrypt(name.encode()))
    identify = KeyIdentifier(ring)
    done: list[str] = []
    checkpoint = None
    with rotate_with(ring) as rotate:
        for _ in range(len(names)):
            progress = Recorder(stop_after=1)
            report = files_store(tmp_path, batch_size=2).reencrypt(rotate, identify, "v2", checkpoint, progress)
            if not progress.checkpoints:
                break
            checkpoint = progress.checkpoints[-1]
            done = [n for n in names if identify((tmp_path / n).read_bytes()) == "v2"]
            assert done == names[: len(done)]  # strictly in walk order, batch by batch
    assert done == names
    assert report.rewritten == len(names)


def test_files_too_large_to_be_a_token_are_quarantined_unread(
    tmp_path: Path, keys: dict[str, Fernet], ring: FernetRing
) -> None:
    big = tmp_path / "big.tok"
    big.write_bytes(b"A" * (MAX_TOKEN_FILE + 10))
    (tmp_path / "ok.tok").write_bytes(keys["v1"].encrypt(b"ok"))
    progress = Recorder()
    with rotate_with(ring) as rotate:
        report = files_store(tmp_path).reencrypt(rotate, KeyIdentifier(ring), "v2", None, progress)
    assert (report.rewritten, report.quarantined) == (1, 1)
    assert progress.quarantined[0][0] == str(big)
    assert big.stat().st_size == MAX_TOKEN_FILE + 10


def test_files_a_replaced_file_is_a_conflict(tmp_path: Path, keys: dict[str, Fernet], ring: FernetRing) -> None:
    target = tmp_path / "one.tok"
    target.write_bytes(keys["v1"].encrypt(b"before"))
    bot = keys["v1"].encrypt(b"bot")
    with rotate_with(ring) as inner:

        def rotate(tokens: Any) -> list[bytes | None]:
            (tmp_path / "new").write_bytes(bot)
            os.replace(tmp_path / "new", target)  # the bot writes after the store read the file
            return list(inner(tokens))

        report = files_store(tmp_path).reencrypt(rotate, KeyIdentifier(ring), "v2", None, Recorder())
    assert (report.rewritten, report.conflicts) == (0, 1)
    assert target.read_bytes() == bot


# -- files: compare-and-swap by exchange ----------------------------------------------------
# A "bot" writes for real (os.replace of another file onto the target, or a deletion) at a chosen
# point: the store's own exchange is wrapped so the bot acts just before or just after a given call.


def temp_files(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if p.name.startswith(TEMP_PREFIX)]


def bot_write(target: Path, data: bytes, mode: int = 0o600) -> int:
    """Write ``data`` by rename, as a bot should; the new file's inode."""
    new = target.with_name(f"bot-{os.urandom(4).hex()}")
    new.write_bytes(data)
    os.chmod(new, mode)
    inode = new.stat().st_ino
    os.replace(new, target)
    return inode


@pytest.fixture
def exchanging(tmp_path: Path) -> None:
    """Skip where this filesystem cannot exchange names: the store would use its fallback."""
    a, b = tmp_path / "probe-a", tmp_path / "probe-b"
    a.write_bytes(b"a")
    b.write_bytes(b"b")
    try:
        files._exchange(a, b)
    except OSError as exc:
        if exc.errno in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            pytest.skip(f"no RENAME_EXCHANGE here ({exc.strerror})")
        raise
    assert (a.read_bytes(), b.read_bytes()) == (b"b", b"a")
    a.unlink()
    b.unlink()


def around_exchange(
    monkeypatch: pytest.MonkeyPatch,
    before: dict[int, Any] | None = None,
    after: dict[int, Any] | None = None,
) -> list[int]:
    """Wrap the real exchange: ``before[n]``/``after[n]`` run around its n-th call (from 1).
    Returns the list of call numbers made."""
    real = files._exchange
    calls: list[int] = []

    def exchange(first: Path, second: Path) -> None:
        calls.append(len(calls) + 1)
        if before and len(calls) in before:
            before[len(calls)]()
        real(first, second)
        if after and len(calls) in after:
            after[len(calls)]()

    monkeypatch.setattr(files, "_exchange", exchange)
    return calls


def one_token_file(tmp_path: Path, keys: dict[str, Fernet], mode: int = 0o640) -> Path:
    target = tmp_path / "one.tok"
    target.write_bytes(keys["v1"].encrypt(b"before") + b"\n")
    os.chmod(target, mode)
    return target


def reencrypt_one(tmp_path: Path, ring: FernetRing) -> ReencryptReport:
    with rotate_with(ring) as rotate:
        return files_store(tmp_path).reencrypt(rotate, KeyIdentifier(ring), "v2", None, Recorder())


@pytest.mark.usefixtures("exchanging")
def test_files_the_original_comes_out_of_the_exchange_and_is_deleted(
    tmp_path: Path, keys: dict[str, Fernet], ring: FernetRing, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = one_token_file(tmp_path, keys)
    calls = around_exchange(monkeypatch)
    report = reencrypt_one(tmp_path, ring)
    assert (report.rewritten, report.conflicts, calls) == (1, 0, [1])
    assert keys["v2"].decrypt(target.read_bytes().rstrip(b"\n")) == b"before"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert not temp_files(tmp_path)


@pytest.mark.usefixtures("exchanging")
def test_files_a_bot_write_just_before_the_exchange_is_put_back(
    tmp_path: Path, keys: dict[str, Fernet], ring: FernetRing, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = one_token_file(tmp_path, keys)
    bot = keys["v1"].encrypt(b"bot") + b"\n"
    inodes: list[int] = []
    calls = around_exchange(monkeypatch, before={1: lambda: inodes.append(bot_write(target, bot, 0o604))})
    report = reencrypt_one(tmp_path, ring)
    assert (report.rewritten, report.conflicts, calls) == (0, 1, [1, 2])
    assert target.read_bytes() == bot
    st = target.stat()
    assert (st.st_ino, stat.S_IMODE(st.st_mode)) == (inodes[0], 0o604)  # the bot's very file
    assert not temp_files(tmp_path)


@pytest.mark.usefixtures("exchanging")
def test_files_a_bot_write_during_the_putting_back_is_the_one_kept(
    tmp_path: Path, keys: dict[str, Fernet], ring: FernetRing, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = one_token_file(tmp_path, keys)
    first, second = keys["v1"].encrypt(b"bot 1") + b"\n", keys["v1"].encrypt(b"bot 2") + b"\n"
    inodes: list[int] = []
    calls = around_exchange(
        monkeypatch,
        before={
            1: lambda: inodes.append(bot_write(target, first)),
            2: lambda: inodes.append(bot_write(target, second)),  # lands on our file, just put in place
        },
    )
    report = reencrypt_one(tmp_path, ring)
    # 1 swaps ours in (bot 1 out), 2 puts bot 1 back (bot 2 out), 3 puts bot 2 back (bot 1 out).
    assert (report.rewritten, report.conflicts, calls) == (0, 1, [1, 2, 3])
    assert target.read_bytes() == second
    assert target.stat().st_ino == inodes[1]
    assert not temp_files(tmp_path)


@pytest.mark.usefixtures("exchanging")
def test_files_a_bot_write_just_after_a_clean_exchange_stays(
    tmp_path: Path, keys: dict[str, Fernet], ring: FernetRing, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = one_token_file(tmp_path, keys)
    bot = keys["v1"].encrypt(b"bot") + b"\n"
    calls = around_exchange(monkeypatch, after={1: lambda: bot_write(target, bot)})
    report = reencrypt_one(tmp_path, ring)
    assert (report.rewritten, report.conflicts, calls) == (1, 0, [1])  # ours landed first, the bot's after
    assert target.read_bytes() == bot
    assert not temp_files(tmp_path)


@pytest.mark.usefixtures("exchanging")
def test_files_a_target_deleted_before_the_exchange_stays_deleted(
    tmp_path: Path, keys: dict[str, Fernet], ring: FernetRing, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = one_token_file(tmp_path, keys)
    calls = around_exchange(monkeypatch, before={1: target.unlink})
    report = reencrypt_one(tmp_path, ring)
    assert (report.rewritten, report.conflicts, calls) == (0, 1, [1])
    assert not target.exists()
    assert not temp_files(tmp_path)


@pytest.mark.usefixtures("exchanging")
def test_files_a_target_deleted_while_putting_back_stays_deleted(
    tmp_path: Path, keys: dict[str, Fernet], ring: FernetRing, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = one_token_file(tmp_path, keys)
    bot = keys["v1"].encrypt(b"bot") + b"\n"
    calls = around_exchange(monkeypatch, before={1: lambda: bot_write(target, bot), 2: target.unlink})
    report = reencrypt_one(tmp_path, ring)
    assert (report.rewritten, report.conflicts, calls) == (0, 1, [1, 2])
    assert not target.exists()
    assert not temp_files(tmp_path)


@pytest.mark.usefixtures("exchanging")
@pytest.mark.parametrize("kind", ["directory", "fifo", "symlink"])
def test_files_a_non_file_swapped_in_is_put_back(
    kind: str, tmp_path: Path, keys: dict[str, Fernet], ring: FernetRing, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = one_token_file(tmp_path, keys)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b"not a token")

    def swap_in() -> None:
        target.unlink()
        {"directory": target.mkdir, "fifo": lambda: os.mkfifo(target), "symlink": lambda: target.symlink_to(elsewhere)}[
            kind
        ]()

    calls = around_exchange(monkeypatch, before={1: swap_in})
    report = reencrypt_one(tmp_path, ring)
    assert (report.rewritten, report.conflicts, calls) == (0, 1, [1, 2])
    st = target.lstat()
    assert {"directory": stat.S_ISDIR, "fifo": stat.S_ISFIFO, "symlink": stat.S_ISLNK}[kind](st.st_mode)
    assert elsewhere.read_bytes() == b"not a token"
    assert not temp_files(tmp_path)


@pytest.mark.usefixtures("exchanging")
def test_files_changing_too_fast_is_an_error_that_keeps_the_newest_write(
    tmp_path: Path, keys: dict[str, Fernet], ring: FernetRing, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = one_token_file(tmp_path, keys)
    written: list[bytes] = []

    def write_again() -> None:
        written.append(f"bot {len(written)}".encode())
        bot_write(target, written[-1])

    around_exchange(monkeypatch, before={n: write_again for n in range(1, MAX_RESTORE_ROUNDS + 2)})
    with pytest.raises(StoreError, match="changing too fast") as raised:
        reencrypt_one(tmp_path, ring)
    assert len(written) == MAX_RESTORE_ROUNDS + 1
    (left,) = temp_files(tmp_path)
    assert str(target) in str(raised.value)
    assert str(left) in str(raised.value)
    assert left.read_bytes() == written[-1]  # the newest write is kept, the target has the one before
    assert target.read_bytes() == written[-2]


def files_messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What the files store logged."""
    return [r.getMessage() for r in caplog.records if r.name == files.__name__]


def test_files_without_exchange_fall_back_and_warn_once(
    tmp_path: Path,
    keys: dict[str, Fernet],
    ring: FernetRing,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(files, "_renameat2", None)  # as where libc has no renameat2
    calls = around_exchange(monkeypatch)
    tokens = {f"{n}.tok": keys["v1"].encrypt(f"token {n}".encode()) for n in range(5)}
    for name, token in tokens.items():
        (tmp_path / name).write_bytes(token)
    bot = keys["v1"].encrypt(b"bot")
    with rotate_with(ring) as inner, caplog.at_level(logging.WARNING, logger=files.__name__):

        def rotate(tokens: Any) -> list[bytes | None]:
            bot_write(tmp_path / "0.tok", bot)  # a write well before the comparison is still caught
            return list(inner(tokens))

        report = files_store(tmp_path, batch_size=2).reencrypt(rotate, KeyIdentifier(ring), "v2", None, Recorder())
    assert (report.rewritten, report.conflicts) == (4, 1)
    assert calls == [1]  # tried once, then remembered for the filesystem
    assert (tmp_path / "0.tok").read_bytes() == bot
    for n in range(1, 5):
        assert keys["v2"].decrypt((tmp_path / f"{n}.tok").read_bytes()) == f"token {n}".encode()
    warnings = files_messages(caplog)
    assert len(warnings) == 1
    assert "small window" in warnings[0]
    assert str(tmp_path) in warnings[0]
    assert not any(token.decode() in warnings[0] for token in [*tokens.values(), bot])
    assert not temp_files(tmp_path)


def test_files_without_exchange_warn_once_per_store_across_filesystems(
    tmp_path: Path,
    keys: dict[str, Fernet],
    ring: FernetRing,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on a filesystem other than the test's")
    monkeypatch.setattr(files, "_renameat2", None)
    calls = around_exchange(monkeypatch)
    (tmp_path / "here.tok").write_bytes(keys["v1"].encrypt(b"here"))
    with tempfile.TemporaryDirectory(dir=shm) as other:
        (Path(other) / "there.tok").write_bytes(keys["v1"].encrypt(b"there"))
        (tmp_path / "there.tok").symlink_to(Path(other) / "there.tok")
        with caplog.at_level(logging.WARNING, logger=files.__name__):
            report = reencrypt_one(tmp_path, ring)
        assert keys["v2"].decrypt((Path(other) / "there.tok").read_bytes()) == b"there"
    assert report.rewritten == 2
    assert calls == [1, 2]  # one try per filesystem
    assert len(files_messages(caplog)) == 1  # one warning per store


def test_files_a_pass_names_leftover_temporary_files(
    tmp_path: Path,
    keys: dict[str, Fernet],
    ring: FernetRing,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    (tmp_path / "a.tok").write_bytes(keys["v1"].encrypt(b"a"))
    (tmp_path / "sub").mkdir()
    stranded = keys["v2"].encrypt(b"a bot's write that was being put back")
    leftovers = [tmp_path / ".rotatord-x1.tmp", tmp_path / "sub" / ".rotatord-x2.tmp"]
    for path in leftovers:
        path.write_bytes(stranded)
    with caplog.at_level(logging.WARNING, logger=files.__name__):
        reencrypt_one(tmp_path, ring)
    assert not files_messages(caplog)  # just written: in progress
    monkeypatch.setattr(files, "LEFTOVER_AGE", 0.0)
    (tmp_path / "b.tok").write_bytes(keys["v1"].encrypt(b"b"))
    with caplog.at_level(logging.WARNING, logger=files.__name__):
        report = reencrypt_one(tmp_path, ring)
    assert report.scanned == 2  # the leftovers are not items
    (warning,) = files_messages(caplog)
    assert "2 temporary file(s)" in warning
    assert all(str(path) in warning for path in leftovers)
    assert stranded.decode() not in warning
    assert all(path.read_bytes() == stranded for path in leftovers)  # left for the operator, untouched


def test_files_the_leftover_warning_names_a_few_and_counts_all(
    tmp_path: Path, ring: FernetRing, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(files, "LEFTOVER_AGE", 0.0)
    for n in range(5):
        (tmp_path / f".rotatord-{n}.tmp").write_bytes(b"x")
    with caplog.at_level(logging.WARNING, logger=files.__name__):
        reencrypt_one(tmp_path, ring)
    (warning,) = files_messages(caplog)
    assert "5 temporary file(s)" in warning
    assert "and 2 more" in warning
    assert sum(f".rotatord-{n}.tmp" in warning for n in range(5)) == files.LEFTOVERS_NAMED


# -- SQLite-only key types ------------------------------------------------------------------


def test_sql_keys_of_other_types_resume_exactly(tmp_path: Path, keys: dict[str, Fernet], ring: FernetRing) -> None:
    db = tmp_path / "bots.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE m (at DATETIME NOT NULL, tag BLOB NOT NULL, body TEXT, PRIMARY KEY (at, tag))")
    rows = [
        ((T0 + timedelta(minutes=i // 2)).strftime("%Y-%m-%d %H:%M:%S.%f"), bytes([i]), keys["v1"].encrypt(b"%d" % i))
        for i in range(9)
    ]
    conn.executemany("INSERT INTO m VALUES (?, ?, ?)", [(a, t, b.decode()) for a, t, b in rows])
    conn.commit()
    conn.close()
    url = tmp_path / "url"
    url.write_text(f"sqlite:///{db}")
    url.chmod(0o600)
    settings = SqlStoreSettings(
        kind="sql", url_file=url, table="m", key=("at", "tag"), columns=("body",), batch_size=2, rate_limit=None
    )
    checkpoint = None
    with rotate_with(ring) as rotate:
        for _ in range(10):
            progress = Recorder(stop_after=1)
            report = SqlStore("t", settings).reencrypt(rotate, KeyIdentifier(ring), "v2", checkpoint, progress)
            if not progress.checkpoints:
                break
            checkpoint = progress.checkpoints[-1]
    assert (report.rewritten, report.conflicts) == (9, 0)
    conn = sqlite3.connect(db)
    bodies = [r[0] for r in conn.execute("SELECT body FROM m ORDER BY at, tag")]
    conn.close()
    assert [keys["v2"].decrypt(b.encode()) for b in bodies] == [b"%d" % i for i in range(9)]
    assert SqlStore("t", settings).estimate() == 9


def test_sql_sqlite_wal_is_checkpointed_by_the_store_and_stays_small(
    tmp_path: Path, keys: dict[str, Fernet], ring: FernetRing
) -> None:
    """The store's connections leave checkpoints to its own thread (``wal_autocheckpoint=0``):
    after a run every WAL frame is back in the database, and the WAL never held much more than
    two batches although ten times that was rewritten.  The bot's connection keeps its setting."""
    db = tmp_path / "bots.db"
    bot = sqlite3.connect(db)
    bot.execute("PRAGMA journal_mode=WAL")
    bot.execute("CREATE TABLE m (id INTEGER PRIMARY KEY, body TEXT)")
    body = keys["v1"].encrypt(os.urandom(1024)).decode()
    bot.executemany("INSERT INTO m VALUES (?, ?)", [(i, body) for i in range(2000)])
    bot.commit()
    bot.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    url = tmp_path / "url"
    url.write_text(f"sqlite:///{db}")
    url.chmod(0o600)
    settings = SqlStoreSettings(kind="sql", url_file=url, table="m", key=("id",), columns=("body",), batch_size=100)
    store = SqlStore("t", settings)
    sizes: list[int] = []

    class Watching(Recorder):
        def checkpoint(self, checkpoint: str, totals: ReencryptReport) -> None:
            super().checkpoint(checkpoint, totals)
            sizes.append(os.path.getsize(f"{db}-wal"))

    with rotate_with(ring) as rotate:
        report = store.reencrypt(rotate, KeyIdentifier(ring), "v2", None, Watching())
    assert report.rewritten == 2000
    batch_bytes = 100 * 1600  # a batch's rows, with room for page overhead
    assert 0 < max(sizes) < 4 * batch_bytes  # 2000 rows rewritten: about 20 batches' worth
    _, frames, backfilled = sqlite3.connect(db).execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    assert frames == backfilled  # nothing left in the WAL only
    assert not [t for t in threading.enumerate() if t.name.startswith("rotatord-wal-checkpoint")]  # none idle
    assert bot.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 1000  # the bot's own setting
    store.close()
    bot.close()


def test_sql_a_checkpoint_holding_sqlalchemy_values_resumes_exactly(
    tmp_path: Path, keys: dict[str, Fernet], ring: FernetRing
) -> None:
    """Checkpoints written before pages were read through the driver's cursor hold a DATETIME
    key as SQLAlchemy returned it (``{"iso": ...}``, a datetime); resuming converts it to the
    stored text, so exactly the rows after it are processed."""
    db = tmp_path / "bots.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE m (at DATETIME NOT NULL PRIMARY KEY, body TEXT)")
    stamps = [T0.replace(tzinfo=None) + timedelta(minutes=i) for i in range(6)]
    conn.executemany(
        "INSERT INTO m VALUES (?, ?)",
        [(at.strftime("%Y-%m-%d %H:%M:%S.%f"), keys["v1"].encrypt(b"%d" % i).decode()) for i, at in enumerate(stamps)],
    )
    conn.commit()
    conn.close()
    url = tmp_path / "url"
    url.write_text(f"sqlite:///{db}")
    url.chmod(0o600)
    settings = SqlStoreSettings(kind="sql", url_file=url, table="m", key=("at",), columns=("body",), batch_size=2)
    legacy = encode_checkpoint([{"iso": stamps[2].isoformat()}], Totals(scanned=3, rewritten=3))
    with rotate_with(ring) as rotate:
        report = SqlStore("t", settings).reencrypt(rotate, KeyIdentifier(ring), "v2", legacy, Recorder())
    assert (report.scanned, report.rewritten) == (6, 6)  # 3 before the checkpoint, 3 after it
    conn = sqlite3.connect(db)
    bodies = [r[0].encode() for r in conn.execute("SELECT body FROM m ORDER BY at")]
    conn.close()
    assert [KeyIdentifier(ring)(b) for b in bodies] == ["v1"] * 3 + ["v2"] * 3
