"""A run's logs on this machine: one file per remote job, and customization.log over all.

A job's local log holds exactly the bytes read from the VM, so its size is the offset to
read from next: polling again after a crash neither loses nor repeats a line.

Both files only ever grow (appends, never a rewrite). The combined log's progress per
job is kept in a small index; a crash between appending to a job's log and to the
combined log is repaired on the next append by copying what the combined log lacks from
the job's log (read by seeking, not whole). Output of a job that comes after another job
started goes under a "(continued)" header. These are blocking file calls: async code
runs them in a thread (see the `a*` methods).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from pydantic import BaseModel

LOG_DIR = "logs"
COMBINED = "customization.log"
INDEX = "combined.json"
TAIL_BYTES = 64 * 1024


class CombinedIndex(BaseModel):
    """How far the combined log has each job: job_id -> (title, bytes copied)."""

    jobs: dict[str, tuple[str, int]] = {}
    last: str | None = None  # the job whose output the combined log ends with


class RunLogs:
    def __init__(self, run_dir: Path) -> None:
        self.directory = run_dir / LOG_DIR
        self.combined = run_dir / COMBINED
        self._index_path = self.directory / INDEX

    def job_path(self, job_id: str) -> Path:
        return self.directory / f"{job_id}.log"

    def offset(self, job_id: str) -> int:
        path = self.job_path(job_id)
        return path.stat().st_size if path.exists() else 0

    def _index(self) -> CombinedIndex:
        try:
            return CombinedIndex.model_validate_json(self._index_path.read_bytes())
        except (OSError, ValueError):
            return CombinedIndex()

    def _save(self, index: CombinedIndex) -> None:
        tmp = self._index_path.with_name(f".{INDEX}.tmp")
        tmp.write_text(index.model_dump_json())
        tmp.replace(self._index_path)

    def _write_combined(self, data: bytes) -> None:
        with self.combined.open("ab") as handle:
            handle.write(data)

    def _ends_with_newline(self) -> bool:
        try:
            with self.combined.open("rb") as handle:
                handle.seek(-1, os.SEEK_END)
                return handle.read(1) == b"\n"
        except OSError:  # empty or missing
            return True

    def _header(self, title: str) -> None:
        separator = b"" if self._ends_with_newline() else b"\n"
        self._write_combined(separator + f"==> {title}\n".encode())

    def start(self, job_id: str, title: str) -> None:
        """Record the job (once) and its header in the combined log."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.job_path(job_id).touch()
        index = self._index()
        if job_id in index.jobs:
            return
        self._header(title)
        index.jobs[job_id] = (title, 0)
        index.last = job_id
        self._save(index)

    def append(self, job_id: str, data: bytes) -> None:
        if data:
            with self.job_path(job_id).open("ab") as handle:
                handle.write(data)
        self._sync(job_id)

    def _sync(self, job_id: str) -> None:
        """Copy to the combined log what it lacks of the job's log."""
        index = self._index()
        if job_id not in index.jobs:
            return
        title, copied = index.jobs[job_id]
        size = self.offset(job_id)
        if size <= copied:
            return
        if index.last != job_id:
            self._header(f"{title} (continued)")
        with self.job_path(job_id).open("rb") as handle:
            handle.seek(copied)
            self._write_combined(handle.read(size - copied))
        index.jobs[job_id] = (title, size)
        index.last = job_id
        self._save(index)

    def tail(self, job_id: str, lines: int = 20) -> list[str]:
        """The job's last lines, read from the end of its log (at most TAIL_BYTES)."""
        path = self.job_path(job_id)
        if not path.exists():
            return []
        with path.open("rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            handle.seek(max(0, size - TAIL_BYTES))
            chunk = handle.read()
        text = chunk.decode(errors="replace").splitlines()
        if size > TAIL_BYTES and text:
            text = text[1:]  # the first line read is likely cut
        return text[-lines:]

    # The same, off the event loop.

    async def astart(self, job_id: str, title: str) -> None:
        await asyncio.to_thread(self.start, job_id, title)

    async def aappend(self, job_id: str, data: bytes) -> None:
        await asyncio.to_thread(self.append, job_id, data)

    async def atail(self, job_id: str, lines: int = 20) -> list[str]:
        return await asyncio.to_thread(self.tail, job_id, lines)

    async def aread(self, job_id: str) -> str:
        """A job's whole log as text (for logs known to be small)."""
        path = self.job_path(job_id)
        return await asyncio.to_thread(path.read_text, "utf-8", "replace")

    async def aoffset(self, job_id: str) -> int:
        return await asyncio.to_thread(self.offset, job_id)
