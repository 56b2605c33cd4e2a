"""A run's logs on this machine: one file per remote job, and customization.log over all.

A job's local log holds exactly the bytes read from the VM, so its size is the offset to
read from next: polling again after a crash neither loses nor repeats a line.
"""

from __future__ import annotations

from pathlib import Path

LOG_DIR = "logs"
COMBINED = "customization.log"
ORDER = "jobs.tsv"


class RunLogs:
    def __init__(self, run_dir: Path) -> None:
        self.directory = run_dir / LOG_DIR
        self.combined = run_dir / COMBINED

    def job_path(self, job_id: str) -> Path:
        return self.directory / f"{job_id}.log"

    def offset(self, job_id: str) -> int:
        path = self.job_path(job_id)
        return path.stat().st_size if path.exists() else 0

    def start(self, job_id: str, title: str) -> None:
        """Record the job (once) in start order, so the combined log only grows at its end."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if job_id not in self._jobs():
            with (self.directory / ORDER).open("a") as handle:
                handle.write(f"{job_id}\t{title}\n")
        self.job_path(job_id).touch()
        self._rebuild()

    def _jobs(self) -> dict[str, str]:
        order = self.directory / ORDER
        if not order.exists():
            return {}
        lines = order.read_text().splitlines()
        return dict(line.split("\t", 1) for line in lines if "\t" in line)

    def append(self, job_id: str, data: bytes) -> None:
        if not data:
            return
        with self.job_path(job_id).open("ab") as handle:
            handle.write(data)
        self._rebuild()

    def tail(self, job_id: str, lines: int = 20) -> list[str]:
        path = self.job_path(job_id)
        if not path.exists():
            return []
        return path.read_bytes().decode(errors="replace").splitlines()[-lines:]

    def _rebuild(self) -> None:
        parts = []
        jobs = self._jobs()
        last = next(reversed(jobs), None)
        for job_id, title in jobs.items():
            body = self.job_path(job_id).read_bytes() if self.job_path(job_id).exists() else b""
            parts.append(f"==> {title}\n".encode() + body)
            if body and not body.endswith(b"\n") and job_id != last:
                parts.append(b"\n")
        tmp = self.combined.with_name(f".{COMBINED}.tmp")
        tmp.write_bytes(b"".join(parts))
        tmp.replace(self.combined)
