"""The hash-chained audit log: appends, tamper detection, concurrency, no material in the file."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import stat
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from rotatord.audit import GENESIS, AuditLog, AuditReport, _reverse_lines, verify_file
from rotatord.errors import AuditError
from rotatord.fsutil import atomic_write
from rotatord.sensitive import MASK, Sensitive
from tests.unit.test_logs import api_token, fernet_key, whsec


class MemoryHead:
    """The head as the lead keeps it in the state database, here in memory."""

    def __init__(self) -> None:
        self.value: tuple[int, str] | None = None
        self.saves = 0

    def load(self) -> tuple[int, str] | None:
        return self.value

    def save(self, seq: int, digest: str) -> None:
        self.value = (seq, digest)
        self.saves += 1


class FileHead:
    """A head shared by several processes, kept in a small JSON file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> tuple[int, str] | None:
        try:
            seq, digest = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        return int(seq), str(digest)

    def save(self, seq: int, digest: str) -> None:
        atomic_write(self.path, json.dumps([seq, digest]).encode())


class StepClock:
    def __init__(self) -> None:
        self.current = datetime(2025, 1, 1, 3, 0, tzinfo=UTC)

    def now(self) -> datetime:
        self.current += timedelta(seconds=1)
        return self.current


def fill(path: Path, head: MemoryHead | None, count: int) -> AuditLog:
    log = AuditLog(path, head, clock=StepClock())
    for i in range(count):
        log.append("rotation.staged", actor="schedule", secret=f"bot-{i}", version=i, phase="staged")
    return log


def read_lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def write_lines(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(lines))


def problems_text(report: AuditReport) -> str:
    return "\n".join(report.problems)


def test_fifty_appends_form_a_valid_chain(tmp_path: Path) -> None:
    head = MemoryHead()
    path = tmp_path / "audit.log"
    log = fill(path, head, 50)
    report = log.verify()
    assert report == AuditReport(ok=True, records=50, problems=[])
    raw = [line.rstrip(b"\n") for line in read_lines(path)]
    records = [json.loads(line) for line in raw]
    assert [r["seq"] for r in records] == list(range(1, 51))
    assert records[0]["prev"] == GENESIS
    for before, record in zip(raw, records[1:], strict=False):
        assert record["prev"] == hashlib.sha256(before).hexdigest()
    assert records[0]["ts"] == "2025-01-01T03:00:01.000Z"
    assert records[0]["actor"] == "schedule"
    assert raw[0] == json.dumps(records[0], sort_keys=True, separators=(",", ":")).encode()
    assert head.value == (50, hashlib.sha256(raw[-1]).hexdigest())
    assert verify_file(path, head).ok


def test_append_returns_the_record_as_written(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.log", MemoryHead(), clock=StepClock())
    record = log.append("rotation.promoted", actor="cli:uid=1000", secret="s", version=2)
    assert record == json.loads((tmp_path / "audit.log").read_bytes())
    assert record["seq"] == 1
    assert record["event"] == "rotation.promoted"


def test_file_is_created_private(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    old = os.umask(0)
    try:
        fill(path, None, 1)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_editing_a_record_breaks_the_chain_at_the_next_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = fill(path, MemoryHead(), 50)
    lines = read_lines(path)
    lines[9] = lines[9].replace(b'"secret":"bot-9"', b'"secret":"bot-X"')
    write_lines(path, lines)
    report = log.verify()
    assert not report.ok
    assert report.problems == [report.problems[0]]
    assert report.problems[0].startswith("line 11: chain broken")
    assert "line 10" in report.problems[0]


def test_editing_the_last_record_is_caught_by_the_head(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    head = MemoryHead()
    fill(path, head, 50)
    lines = read_lines(path)
    lines[-1] = lines[-1].replace(b'"phase":"staged"', b'"phase":"retired"')
    write_lines(path, lines)
    report = verify_file(path, head)
    assert not report.ok
    assert report.problems[0].startswith("line 50:")
    assert "head" in report.problems[0]
    # Without a head only the chain is checked, and the chain of an edited last record holds.
    assert verify_file(path, None).ok


def test_deleting_a_record_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = fill(path, MemoryHead(), 50)
    lines = read_lines(path)
    del lines[19]
    write_lines(path, lines)
    report = log.verify()
    assert not report.ok
    assert report.records == 49
    assert any(p.startswith("line 20:") and "seq 21 where 20" in p for p in report.problems)


def test_truncating_the_tail_is_reported_with_a_head(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    head = MemoryHead()
    fill(path, head, 50)
    write_lines(path, read_lines(path)[:-3])
    report = verify_file(path, head)
    assert not report.ok
    assert "truncated" in problems_text(report)
    assert "seq 47" in problems_text(report)
    assert verify_file(path, None).ok  # undetectable without the head


def test_appending_after_truncation_keeps_the_gap_visible(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    head = MemoryHead()
    log = fill(path, head, 10)
    write_lines(path, read_lines(path)[:-3])
    record = log.append("rotation.retired", actor="schedule")
    assert record["seq"] == 11
    report = log.verify()
    assert not report.ok
    assert any(p.startswith("line 8:") and "seq 11 where 8" in p for p in report.problems)


def test_removing_the_file_is_reported_with_a_head(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    head = MemoryHead()
    fill(path, head, 3)
    path.unlink()
    assert "removed" in problems_text(verify_file(path, head))
    assert verify_file(path, None) == AuditReport(ok=True, records=0, problems=[])


def test_torn_last_line_is_reported_and_the_next_append_stays_whole(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    head = MemoryHead()
    log = fill(path, head, 5)
    half = b'{"actor":"schedule","event":"rotation.st'
    with path.open("ab") as fh:
        fh.write(half)
    report = log.verify()
    assert not report.ok
    assert report.problems == ["line 6: torn record (no line end)"]
    assert report.records == 5
    record = log.append("rotation.promoted", actor="schedule")
    assert record["seq"] == 6
    lines = read_lines(path)
    assert lines[5] == half + b"\n"
    assert json.loads(lines[6])["seq"] == 6
    # The torn write stays on record as a line that is no audit record; the chain holds around it.
    assert log.verify().problems == ["line 6: not a JSON audit record"]


def test_non_json_line_in_the_middle_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = fill(path, None, 5)
    lines = read_lines(path)
    lines.insert(2, b"hello there\n")
    write_lines(path, lines)
    assert log.verify().problems == ["line 3: not a JSON audit record"]


def test_a_head_lagging_by_one_is_fine(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    head = MemoryHead()
    fill(path, head, 5)
    # A crash between the append and head.save: the file is one record ahead of the head.
    AuditLog(path, None).append("rotation.staged", actor="schedule")
    assert head.value is not None and head.value[0] == 5
    assert verify_file(path, head) == AuditReport(ok=True, records=6, problems=[])
    record = AuditLog(path, head).append("rotation.promoted", actor="schedule")
    assert record["seq"] == 7
    assert head.value[0] == 7
    assert verify_file(path, head).ok


def test_appends_from_four_threads_keep_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    head = MemoryHead()
    log = AuditLog(path, head)

    def work(n: int) -> None:
        for i in range(25):
            log.append("thread", actor=f"thread-{n}", i=i)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert log.verify() == AuditReport(ok=True, records=100, problems=[])
    assert head.saves == 100


def _append_worker(path: str, head_path: str, actor: str, count: int) -> None:
    log = AuditLog(Path(path), FileHead(Path(head_path)))
    for i in range(count):
        log.append("process", actor=actor, i=i)


def test_appends_from_two_processes_keep_one_chain(tmp_path: Path) -> None:
    path, head_path = tmp_path / "audit.log", tmp_path / "head.json"
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(target=_append_worker, args=(str(path), str(head_path), f"proc-{n}", 40)) for n in range(2)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
        assert w.exitcode == 0
    head = FileHead(head_path)
    assert verify_file(path, head) == AuditReport(ok=True, records=80, problems=[])
    actors = [json.loads(line)["actor"] for line in read_lines(path)]
    assert actors.count("proc-0") == actors.count("proc-1") == 40
    assert head.load() == (80, hashlib.sha256(read_lines(path)[-1].rstrip(b"\n")).hexdigest())


def test_material_in_fields_never_lands(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    key, token, secret = fernet_key(), api_token(), whsec()
    wrapped = Sensitive("hunter2-" + os.urandom(8).hex())
    record = AuditLog(path, MemoryHead()).append(
        "rotation.failed",
        actor="cli:uid=1000",
        reason=f"backend said {key} and {token}",
        nested={"keys": [key, secret]},
        value=wrapped,
        raw=wrapped.reveal(),
    )
    content = path.read_text()
    for value in (key, token, secret, wrapped.reveal()):
        assert value not in content
        assert value not in json.dumps(record)
    assert record["reason"] == f"backend said {MASK} and {MASK}"
    assert record["nested"] == {"keys": [MASK, MASK]}
    assert record["value"] == f"Sensitive({MASK!r})"
    assert verify_file(path, None).ok


def test_reserved_field_names_and_empty_events_are_refused(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.log")
    with pytest.raises(ValueError, match="seq"):
        log.append("x", seq=5)
    with pytest.raises(ValueError, match="event"):
        log.append("")
    assert not (tmp_path / "audit.log").exists()


def test_io_failure_raises_audit_error(tmp_path: Path) -> None:
    with pytest.raises(AuditError, match="cannot open the audit log"):
        AuditLog(tmp_path / "missing-dir" / "audit.log").append("x", actor="schedule")


def test_reverse_lines_reads_from_the_end_across_blocks(tmp_path: Path) -> None:
    path = tmp_path / "lines"
    content = b"first line\nsecond\n\nfourth is a longer line\nfragment"
    path.write_bytes(content)
    fd = os.open(path, os.O_RDONLY)
    try:
        for block in (1, 3, 7, 64):
            got = list(_reverse_lines(fd, len(content), block))
            assert got == [b"fragment", b"fourth is a longer line", b"", b"second", b"first line"]
        assert list(_reverse_lines(fd, 0)) == [b""]
    finally:
        os.close(fd)
