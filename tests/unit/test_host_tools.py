"""Host tools (qemu-img, mke2fs, mmdebstrap...) that the operator runs die with it, even
when it is SIGKILLed, and at their timeout, together with whatever they started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from kiln.providers.local.disks import ToolError, run_tool
from processes import with_argument

# The operator's way: a tool runs in one of the asyncio loop's worker threads.
OPERATOR = """
import asyncio, sys
from kiln.providers.local.disks import run_tool
asyncio.run(asyncio.to_thread(run_tool, sys.argv[1:]))
"""


def _tool_tree(marker: str) -> list[str]:
    """A tool that starts a child of its own, both long: each `sleep <marker>`."""
    return ["sh", "-c", f"sleep {marker} & sleep {marker}; wait"]


def _wait(condition: object, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@pytest.fixture
def marker() -> str:
    return f"{7000 + uuid.uuid4().int % 1000}.{os.getpid()}"


def test_a_tool_and_its_children_die_with_a_sigkilled_operator(marker: str) -> None:
    operator = subprocess.Popen([sys.executable, "-c", OPERATOR, *_tool_tree(marker)])
    try:
        _wait(lambda: len(with_argument(marker)) == 2, "the tool and its child started", 30)
        operator.kill()  # SIGKILL: nothing of the operator runs after this
        operator.wait(10)
        _wait(lambda: not with_argument(marker), f"left running: {with_argument(marker)}", 5)
    finally:
        for pid in with_argument(marker):
            os.kill(pid, signal.SIGKILL)
        operator.kill()


def test_a_tool_past_its_timeout_is_killed_with_its_children(marker: str) -> None:
    with pytest.raises(ToolError, match="killed after 1s"):
        run_tool(_tool_tree(marker), timeout=1)
    _wait(lambda: not with_argument(marker), f"left running: {with_argument(marker)}", 5)


def test_a_tool_reports_its_exit_code_and_stderr() -> None:
    assert run_tool(["sh", "-c", "echo out"]) == "out\n"
    with pytest.raises(ToolError, match="exited 3: bad thing"):
        run_tool(["sh", "-c", "echo bad thing >&2; exit 3"])
    with pytest.raises(ToolError, match="no-such-tool-kiln is not installed"):
        run_tool(["no-such-tool-kiln", "--help"])
