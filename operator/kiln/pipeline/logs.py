"""A run's logs on this machine: one file per remote job, and customization.log over all.

A job's local log holds the bytes read from the VM, so the number of bytes stored (plus
what the cap dropped) is the offset to read from next: polling again after a crash
neither loses nor repeats a line.

The cap: a job keeps its first HEAD_BYTES of output and its last TAIL_BYTES; what lies
between is dropped and the combined log says how many bytes and where. The head is a
job's `<job>.log`; past it, output goes to tail segments `<job>.tail-<offset>.log` (the
offset of their first byte) of TAIL_BYTES each, of which the newest two are kept, so
the offset still follows from the files alone. The head reaches customization.log as it
comes; the kept tail when the job is flushed: when another job starts and when the run
ends (flush_all).

All files only ever grow (appends, never a rewrite; an old tail segment is deleted
whole). The combined log's progress per job is kept in a small index; a crash between
appending to a job's log and to the combined log is repaired on the next append or flush
by copying what the combined log lacks from the job's files (read by seeking, not whole).
Output of a job that comes after another job started goes under a "(continued)" header.
These are blocking file calls: async code runs them in a thread (see the `a*` methods).
"""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path

from pydantic import BaseModel

LOG_DIR = "logs"
COMBINED = "customization.log"
INDEX = "combined.json"
TAIL_READ_BYTES = 64 * 1024  # what tail() reads for a failed step's last lines
HEAD_BYTES = 16 * 1024 * 1024  # each job keeps its first 16 MiB of output ...
TAIL_BYTES = 16 * 1024 * 1024  # ... and its last 16 MiB


class CombinedIndex(BaseModel):
    """How far the combined log has each job: job_id -> (title, bytes of its output
    copied or reported dropped)."""

    jobs: dict[str, tuple[str, int]] = {}
    last: str | None = None  # the job whose output the combined log ends with


class RunLogs:
    def __init__(
        self, run_dir: Path, head_bytes: int = HEAD_BYTES, tail_bytes: int = TAIL_BYTES
    ) -> None:
        self.directory = run_dir / LOG_DIR
        self.combined = run_dir / COMBINED
        self.head_bytes = head_bytes
        self.tail_bytes = tail_bytes
        self._index_path = self.directory / INDEX

    def job_path(self, job_id: str) -> Path:
        """The job's head: its first head_bytes of output."""
        return self.directory / f"{job_id}.log"

    def _segments(self, job_id: str) -> list[tuple[int, Path]]:
        """The job's tail segments, oldest first, by the offset of their first byte."""
        pattern = re.compile(rf"{re.escape(job_id)}\.tail-(\d+)\.log")
        found = []
        if self.directory.exists():
            for path in self.directory.iterdir():
                if match := pattern.fullmatch(path.name):
                    found.append((int(match.group(1)), path))
        return sorted(found)

    def offset(self, job_id: str) -> int:
        """How many bytes of the job's output were read (stored or dropped by the cap)."""
        segments = self._segments(job_id)
        if segments:
            start, path = segments[-1]
            return start + path.stat().st_size
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
        """Record the job (once) and its header in the combined log; the jobs before it
        are flushed first (their kept tail goes before this header)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.job_path(job_id).touch()
        index = self._index()
        if job_id in index.jobs:
            return
        for other in list(index.jobs):
            self._flush(index, other)
        self._header(title)
        index.jobs[job_id] = (title, 0)
        index.last = job_id
        self._save(index)

    def append(self, job_id: str, data: bytes) -> None:
        position = self.offset(job_id)
        while data:
            if position < self.head_bytes:
                path, room = self.job_path(job_id), self.head_bytes - position
            else:
                path, room = self._segment_for(job_id, position)
            chunk, data = data[:room], data[room:]
            with path.open("ab") as handle:
                handle.write(chunk)
            position += len(chunk)
        self._sync(job_id)

    def _segment_for(self, job_id: str, position: int) -> tuple[Path, int]:
        """The tail segment that takes output at position, and its room; a new one when the
        newest is full (only the newest two are kept)."""
        segments = self._segments(job_id)
        if segments:
            start, path = segments[-1]
            if position - start < self.tail_bytes:
                return path, self.tail_bytes - (position - start)
        for _, old in segments[:-1]:
            old.unlink(missing_ok=True)
        return self.directory / f"{job_id}.tail-{position}.log", self.tail_bytes

    def _read(self, job_id: str, start: int, end: int) -> bytes:
        """The job's output in [start, end), from its head and its kept tail segments."""
        parts = [(0, self.job_path(job_id)), *self._segments(job_id)]
        out = bytearray()
        for first, path in parts:
            low = max(start, first)
            if low >= end or not path.exists():
                continue
            with path.open("rb") as handle:
                handle.seek(low - first)
                out += handle.read(end - low)
        return bytes(out)

    def _lowest_kept(self, job_id: str) -> int:
        """The first byte still stored past the head (the head itself if no segment)."""
        segments = self._segments(job_id)
        return segments[0][0] if segments else 0

    def _copy(self, index: CombinedIndex, job_id: str, data: bytes, copied: int) -> None:
        title, _ = index.jobs[job_id]
        if index.last != job_id:
            self._header(f"{title} (continued)")
        self._write_combined(data)
        index.jobs[job_id] = (title, copied)
        index.last = job_id

    def _sync(self, job_id: str) -> None:
        """Copy to the combined log what it lacks of the job's head."""
        index = self._index()
        if job_id not in index.jobs:
            return
        _, copied = index.jobs[job_id]
        end = min(self.offset(job_id), self.head_bytes)
        if end <= copied:
            return
        self._copy(index, job_id, self._read(job_id, copied, end), end)
        self._save(index)

    def _flush(self, index: CombinedIndex, job_id: str) -> None:
        """Bring the combined log up to the job's end: what it lacks of the head, a marker
        of what the cap dropped, then the kept tail."""
        _, copied = index.jobs[job_id]
        size = self.offset(job_id)
        if size <= copied:
            return
        head_end = min(size, self.head_bytes)
        data = self._read(job_id, copied, head_end) if copied < head_end else b""
        copied = max(copied, head_end)
        keep_from = max(copied, size - self.tail_bytes, self._lowest_kept(job_id))
        if keep_from > copied:
            newline = "" if not data or data.endswith(b"\n") else "\n"
            marker = (
                f"{newline}[kiln: {keep_from - copied} bytes of this step's output were dropped "
                f"here; the log keeps the first {self.head_bytes} and the last "
                f"{self.tail_bytes} bytes of each step]\n"
            )
            data += marker.encode()
        self._copy(index, job_id, data + self._read(job_id, keep_from, size), size)

    def flush_all(self) -> None:
        """Every job's kept tail into the combined log (the run is ending)."""
        index = self._index()
        for job_id in list(index.jobs):
            self._flush(index, job_id)
        if index.jobs:
            self._save(index)

    def tail(self, job_id: str, lines: int = 20) -> list[str]:
        """The job's last lines, read from the end of its output (at most TAIL_READ_BYTES)."""
        if not self.job_path(job_id).exists():
            return []
        size = self.offset(job_id)
        start = max(0, size - TAIL_READ_BYTES)
        if size > self.head_bytes:  # not into the part the cap dropped
            start = max(start, self._lowest_kept(job_id))
        text = self._read(job_id, start, size).decode(errors="replace").splitlines()
        if start > 0 and text:
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

    async def aflush_all(self) -> None:
        await asyncio.to_thread(self.flush_all)
