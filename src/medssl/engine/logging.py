"""metrics.csv writer and the progress display (rich bar on a terminal, plain lines otherwise)."""

from __future__ import annotations

import csv
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from medssl.errors import StorageError
from medssl.fileio import describe_os_error


class MetricsCSV:
    """Append rows to ``metrics.csv``; the header grows when a new column appears.

    On resume the file is truncated to rows with ``step <= resume_step`` so the log has no duplicated or
    orphaned steps. A disk that refuses a write (full, read-only) is a :class:`~medssl.errors.StorageError`
    naming the file.
    """

    BASE = ("step", "epoch", "loss", "lr", "images_per_s")

    def __init__(self, path: str | Path, resume_step: int | None = None) -> None:
        self.path = Path(path)
        self.columns: list[str] = list(self.BASE)
        self.rows: list[dict[str, Any]] = []
        if resume_step is not None and self.path.is_file():
            with self.path.open(newline="") as f:
                reader = csv.DictReader(f)
                for col in reader.fieldnames or []:
                    if col not in self.columns:
                        self.columns.append(col)
                self.rows = [r for r in reader if r.get("step") and int(float(r["step"])) <= resume_step]
        self._rewrite()

    def _rewrite(self) -> None:
        tmp = self.path.with_suffix(".csv.tmp")
        try:
            with tmp.open("w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
                w.writeheader()
                w.writerows(self.rows)
            tmp.replace(self.path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise StorageError(f"cannot write {self.path}: {describe_os_error(e)}") from None

    def log(self, row: dict[str, Any]) -> None:
        """Append one row (values formatted compactly)."""
        row = {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}
        new = [k for k in row if k not in self.columns]
        self.rows.append(row)
        if new:
            self.columns += new
            self._rewrite()
            return
        try:
            with self.path.open("a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore").writerow(row)
        except OSError as e:
            raise StorageError(f"cannot write {self.path}: {describe_os_error(e)}") from None


def _fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"


class Progress:
    """Progress of a run: loss, lr, img/s, ETA. A live bar on a TTY, one plain line per log step otherwise."""

    def __init__(self, total_steps: int, start_step: int = 0, enabled: bool = True,
                 stream: TextIO | None = None) -> None:
        self.total = total_steps
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.tty = enabled and self.stream.isatty()
        self._bar = None
        self._start_time = time.perf_counter()
        self._start_step = start_step
        if self.tty:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("[bold]pretrain"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
            )
            self._task = self._bar.add_task("pretrain", total=total_steps, completed=start_step, info="")
            self._bar.start()

    def update(self, step: int, epoch: int, loss: float, lr: float, images_per_s: float) -> None:
        """Report the state after ``step`` optimiser steps."""
        if not self.enabled:
            return
        done = step - self._start_step
        elapsed = time.perf_counter() - self._start_time
        eta = elapsed / done * (self.total - step) if done > 0 else float("inf")
        info = f"loss {loss:.4f}  lr {lr:.3g}  {images_per_s:.1f} img/s"
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=info)
        else:
            print(f"step {step}/{self.total}  epoch {epoch}  {info}  eta {_fmt_eta(eta)}", file=self.stream,
                  flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
