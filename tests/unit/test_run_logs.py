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


@pytest.fixture
def capped(tmp_path: Path) -> RunLogs:
    return RunLogs(tmp_path / "capped", head_bytes=100, tail_bytes=50)


def numbered(first: int, last: int) -> bytes:
    """Lines of 10 bytes each: l00000012 and a newline."""
    return b"".join(f"l{i:08d}\n".encode() for i in range(first, last))


def test_the_cap_keeps_head_and_tail_and_says_what_it_dropped(capped: RunLogs) -> None:
    capped.start("job-1", "loud")
    output = numbered(0, 1000)  # 10,000 bytes, in polls of uneven size
    for start in range(0, len(output), 777):
        capped.append("job-1", output[start : start + 777])
    assert capped.offset("job-1") == len(output)  # the next poll reads on from the end
    capped.start("job-2", "next")  # the job before is flushed first
    text = combined(capped)
    assert text.startswith(b"==> loud\n" + output[:100])
    assert (
        text.split(b"\n")[11] == b"[kiln: 9850 bytes of this step's output were dropped here; "
        b"the log keeps the first 100 and the last 50 bytes of each step]"
    )
    assert text.endswith(b"]\n" + output[-50:] + b"==> next\n")
    assert capped.tail("job-1", 2) == ["l00000998", "l00000999"]


def test_the_capped_job_stores_only_head_and_two_tail_segments(capped: RunLogs) -> None:
    capped.start("job-1", "loud")
    for _ in range(100):
        capped.append("job-1", b"x" * 33)
    stored = sorted(p.name for p in capped.directory.iterdir() if p.name.startswith("job-1"))
    assert stored == ["job-1.log", "job-1.tail-3200.log", "job-1.tail-3250.log"]
    assert capped.job_path("job-1").stat().st_size == 100
    assert capped.offset("job-1") == 3300


def test_the_run_end_flushes_a_capped_job_once(capped: RunLogs, tmp_path: Path) -> None:
    capped.start("job-1", "loud")
    capped.append("job-1", numbered(0, 30))
    capped.flush_all()
    again = RunLogs(tmp_path / "capped", head_bytes=100, tail_bytes=50)
    again.flush_all()  # a restarted operator ends the run again: nothing is repeated
    text = combined(capped)
    assert text.count(b"[kiln: 150 bytes") == 1
    assert text.endswith(numbered(25, 30))


def test_output_under_the_cap_is_whole(capped: RunLogs) -> None:
    capped.start("job-1", "quiet")
    capped.append("job-1", numbered(0, 10))
    capped.flush_all()
    assert combined(capped) == b"==> quiet\n" + numbered(0, 10)
