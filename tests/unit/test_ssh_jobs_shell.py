"""The detached-job shell protocol, run with the host's /bin/sh (the VM runs the same text)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from kiln.communicators import ssh


def _sh(command: str, stdin: bytes = b"") -> bytes:
    return subprocess.run(
        ["/bin/sh", "-c", command], input=stdin, capture_output=True, check=True, timeout=30
    ).stdout


def _start(jobs: Path, job_id: str, script: str) -> bytes:
    return _sh(ssh._start_command(str(jobs), job_id, script, elevated=False), script.encode())


def _poll(jobs: Path, job_id: str, offset: int = 0) -> ssh.JobStatus:
    return ssh._parse_poll(_sh(ssh._poll_command(str(jobs), job_id, offset)), offset)


def _wait(jobs: Path, job_id: str) -> ssh.JobStatus:
    deadline = time.monotonic() + 20
    while (status := _poll(jobs, job_id)).running:
        assert time.monotonic() < deadline, "job did not finish"
        time.sleep(0.1)
    return status


def test_job_runs_detached_and_records_exit_code(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs"
    _start(jobs, "j1", "echo out; echo err >&2; sleep 1; exit 7")
    assert _poll(jobs, "j1").running
    status = _wait(jobs, "j1")
    assert (status.exit_code, status.new_log) == (7, b"out\nerr\n")
    assert _poll(jobs, "j1", 4).new_log == b"err\n"
    assert (jobs / "j1" / "exit_code").read_text() == "7\n"
    assert oct(jobs.stat().st_mode & 0o777) == "0o700"


def test_start_is_idempotent(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs"
    assert _start(jobs, "j", "echo first") == b"KILN new\n"  # start_job logs it once
    _wait(jobs, "j")
    assert _start(jobs, "j", "echo second; exit 1") == b""
    time.sleep(0.5)
    assert _wait(jobs, "j").new_log == b"first\n"
    assert _wait(jobs, "j").exit_code == 0
    assert [p.name for p in jobs.iterdir()] == ["j"]


def test_shebang_script_runs_with_its_interpreter(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs"
    _start(jobs, "py", "#!/usr/bin/env python3\nprint(6 * 7)\n")
    assert _wait(jobs, "py").new_log == b"42\n"


def test_killed_job_is_reported_lost(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs"
    _start(jobs, "k", "sleep 30")
    pidfile = jobs / "k" / "started" / "pid"
    deadline = time.monotonic() + 10
    while not pidfile.exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    runner = int(pidfile.read_text())
    os.killpg(os.getpgid(runner), signal.SIGKILL)
    time.sleep(0.3)
    status = _poll(jobs, "k")
    assert (status.running, status.exit_code) == (False, None)


def test_unknown_job(tmp_path: Path) -> None:
    with pytest.raises(ssh.JobNotFound):
        _poll(tmp_path, "nope")
