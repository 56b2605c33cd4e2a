"""The host's live processes as /proc shows them, for tests of what outlives what."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Process:
    pid: int
    ppid: int
    argv: list[str]


def live() -> list[Process]:
    """Every process that runs (zombies, which are dead but not yet reaped, are left out)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] in ("Z", "X"):
            continue
        argv = [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]]
        found.append(Process(int(entry.name), int(fields[1]), argv))
    return found


def descendants(pid: int) -> list[Process]:
    """The live processes pid started, and theirs."""
    processes = live()
    family, found = {pid}, []
    while grown := [p for p in processes if p.ppid in family and p.pid not in family]:
        family |= {p.pid for p in grown}
        found += grown
    return found


def with_argument(argument: str) -> list[int]:
    """Pids of the live processes with this among their arguments."""
    return [p.pid for p in live() if argument in p.argv]
