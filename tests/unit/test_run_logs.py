"""A run's local logs: per-job files, offsets, and customization.log that only grows."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.pipeline.logs import RunLogs


@pytest.fixture
def logs(tmp_path: Path) -> RunLogs:
    return RunLogs(tmp_path / "run")


def combined(logs: RunLogs) -> bytes:
    return logs.combined.read_bytes()


def test_combined_only_grows_and_marks_output_that_comes_late(logs: RunLogs) -> None:
    logs.start("job-b", "customize[0] Shell: first")
    logs.append("job-b", b"hello\n")
    logs.start("job-a", "customize[1] File: second")
    logs.append("job-a", b"copied\n")
    logs.append("job-b", b"late\n")
    assert combined(logs) == (
        b"==> customize[0] Shell: first\nhello\n==> customize[1] File: second\ncopied\n"
        b"==> customize[0] Shell: first (continued)\nlate\n"
    )


def test_a_crash_between_the_two_logs_is_repaired_without_loss_or_repeat(
    logs: RunLogs,
) -> None:
    logs.start("job-1", "one")
    logs.append("job-1", b"a\n")
    with logs.job_path("job-1").open("ab") as handle:  # the operator died here
        handle.write(b"b\n")
    assert logs.offset("job-1") == 4  # the next poll reads on from the job's own log
    logs.append("job-1", b"c\n")
    assert combined(logs) == b"==> one\na\nb\nc\n"


def test_tail_reads_the_end_of_a_large_log(logs: RunLogs) -> None:
    logs.start("job-1", "one")
    logs.append("job-1", b"x" * (3 * 1024 * 1024) + b"\nsecond to last\nlast\n")
    assert logs.tail("job-1", 2) == ["second to last", "last"]


def test_starting_a_job_twice_records_it_once(logs: RunLogs) -> None:
    logs.start("job-1", "one")
    logs.append("job-1", b"a\n")
    logs.start("job-1", "one (resumed)")
    assert combined(logs) == b"==> one\na\n"
    assert logs.job_path("job-1").read_bytes() == b"a\n"


def test_started_job_without_output_has_a_header(logs: RunLogs) -> None:
    logs.start("job-1", "quiet step")
    assert combined(logs) == b"==> quiet step\n"
    assert logs.offset("job-1") == 0


def test_offset_equals_bytes_appended(logs: RunLogs) -> None:
    assert logs.offset("never-started") == 0
    logs.start("job-1", "one")
    total = 0
    for chunk in (b"abc", b"", b"de\nf", "é\n".encode()):
        logs.append("job-1", chunk)
        total += len(chunk)
        assert logs.offset("job-1") == total
    assert logs.job_path("job-1").read_bytes() == "abcde\nfé\n".encode()


def test_appending_to_the_current_job_only_grows_the_end(logs: RunLogs) -> None:
    logs.start("job-1", "one")
    logs.append("job-1", b"partial line without newline")
    logs.start("job-2", "two")
    logs.append("job-2", b"x")
    before = combined(logs)
    for chunk in (b"yz", b"\nmore\n", b"tail"):
        logs.append("job-2", chunk)
        after = combined(logs)
        assert after.startswith(before)
        assert after[len(before) :] == chunk
        before = after


def test_an_unterminated_job_is_separated_from_the_next_header(logs: RunLogs) -> None:
    logs.start("job-1", "one")
    logs.append("job-1", b"no newline")
    logs.start("job-2", "two")
    assert combined(logs) == b"==> one\nno newline\n==> two\n"


def test_no_temporary_file_is_left(logs: RunLogs, tmp_path: Path) -> None:
    logs.start("job-1", "one")
    logs.append("job-1", b"x\n")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["customization.log", "logs"]


def test_state_survives_a_new_instance(logs: RunLogs, tmp_path: Path) -> None:
    logs.start("job-1", "one")
    logs.append("job-1", b"a\n")
    again = RunLogs(tmp_path / "run")
    assert again.offset("job-1") == 2
    again.start("job-2", "two")
    again.append("job-2", b"b\n")
    assert combined(again) == b"==> one\na\n==> two\nb\n"


def test_tail_returns_the_last_lines(logs: RunLogs) -> None:
    logs.start("job-1", "one")
    logs.append("job-1", b"".join(f"line {i}\n".encode() for i in range(50)))
    assert logs.tail("job-1", 3) == ["line 47", "line 48", "line 49"]
    assert logs.tail("job-1") == [f"line {i}" for i in range(30, 50)]
    assert logs.tail("job-1", 100)[0] == "line 0"


def test_tail_of_an_unknown_job_is_empty(logs: RunLogs) -> None:
    assert logs.tail("missing") == []


def test_tail_replaces_undecodable_bytes(logs: RunLogs) -> None:
    logs.start("job-1", "one")
    logs.append("job-1", b"ok\n\xff\xfe bad\n")
    assert logs.tail("job-1") == ["ok", "\ufffd\ufffd bad"]
