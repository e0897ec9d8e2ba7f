"""Progress for batch runs: a rich bar on a terminal, JSON log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("workers.batch")


class Progress:
    def __init__(self, mode: str, files: int, total_bytes: int):
        self.files, self.started = files, time.monotonic()
        self.rows = self.done_files = 0
        self._last_log = 0.0
        self.bar = None
        if mode == "bar" or (mode == "auto" and sys.stderr.isatty()):
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("[bold]{task.fields[files]}"),
                BarColumn(),
                DownloadColumn(),
                TextColumn("{task.fields[rows]:,} rows  {task.fields[rate]:,.0f} rows/s"),
                TimeRemainingColumn(),
                transient=False,
            )
            self.task = self.bar.add_task("score", total=total_bytes or None, files=f"0/{files} files", rows=0, rate=0)
            self.bar.start()

    @property
    def rate(self) -> float:
        return self.rows / max(time.monotonic() - self.started, 1e-9)

    def advance(self, rows: int, nbytes: int = 0) -> None:
        self.rows += rows
        if self.bar is not None:
            self.bar.update(self.task, advance=nbytes, rows=self.rows, rate=self.rate)
        elif time.monotonic() - self._last_log > 10:
            self._last_log = time.monotonic()
            log.info("progress",
                     extra={"rows": self.rows, "files_done": self.done_files, "rows_per_s": round(self.rate)})

    def file_done(self) -> None:
        self.done_files += 1
        if self.bar is not None:
            self.bar.update(self.task, files=f"{self.done_files}/{self.files} files")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
