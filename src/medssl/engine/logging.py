"""metrics.csv writer and the progress displays (rich bar on a terminal, plain lines otherwise).

One mechanism for every long step: :class:`Progress` (pretraining: loss, lr, img/s, ETA) and :class:`TaskProgress`
(a counted task: feature extraction, the label fraction x seed grid of a protocol, the evaluations of ``compare``,
``embed``). On a terminal each is a rich bar with ETA; bars opened while another is live share its display (one
line each), as rich allows a single live display. Elsewhere (a pipe, a log file, CI) :class:`TaskProgress` prints
plain lines -- at most one every ``MEDSSL_PROGRESS_EVERY`` seconds (default 10) and the last -- to stderr, so
stdout keeps the results.
"""

from __future__ import annotations

import csv
import math
import os
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
            self._bar = _live_bar(self.stream)
            self._task = self._bar.add_task("pretrain", total=total_steps, completed=start_step, info="")

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
            _release_bar(self._task)
            self._bar = None


_LIVE: dict[str, Any] = {"bar": None, "tasks": 0}


def _live_bar(stream: TextIO) -> Any:
    """The live rich progress display (started on first use, shared by every bar open at the same time)."""
    if _LIVE["bar"] is None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        _LIVE["bar"] = RichProgress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"), console=Console(file=stream), transient=False,
        )
        _LIVE["bar"].start()
    _LIVE["tasks"] += 1
    return _LIVE["bar"]


def _release_bar(task: Any) -> None:
    """Close one bar's line; the display stops with the last."""
    bar = _LIVE["bar"]
    if bar is None:
        return
    _LIVE["tasks"] -= 1
    if _LIVE["tasks"] <= 0:
        bar.stop()
        _LIVE["bar"], _LIVE["tasks"] = None, 0
    elif task is not None:
        bar.remove_task(task)


def progress_every() -> float:
    """Seconds between plain progress lines: ``$MEDSSL_PROGRESS_EVERY`` (default 10; 0 = a line per update)."""
    try:
        value = float(os.environ.get("MEDSSL_PROGRESS_EVERY", "10"))
    except ValueError:
        return 10.0
    return value if math.isfinite(value) and value >= 0 else 10.0


class TaskProgress:
    """Progress of a counted task: a rich bar with ETA on a TTY, plain periodic lines otherwise.

    Use as a context manager (the display closes on errors too)::

        with TaskProgress("features train", total=len(idx), unit="images", enabled=progress) as bar:
            for batch in loader:
                ...
                bar.advance(len(batch))

    Args:
        description: what is counted (the bar's label / the start of each plain line).
        total: the count at completion.
        enabled: ``False`` shows nothing (``--quiet``, library calls).
        stream: where to write (default stderr).
        unit: the counted things, for plain lines.
        every: seconds between plain lines (default :func:`progress_every`); the last line always prints.
    """

    def __init__(self, description: str, total: int, *, enabled: bool = True, stream: TextIO | None = None,
                 unit: str = "", every: float | None = None) -> None:
        self.description, self.total, self.unit = description, max(int(total), 0), unit
        self.enabled = enabled and self.total > 0
        self.stream = stream or sys.stderr
        self.every = progress_every() if every is None else every
        self.done = 0
        self._start = self._last_line = time.perf_counter()
        self._bar: Any = None
        self._task: Any = None
        if self.enabled and self.stream.isatty():
            self._bar = _live_bar(self.stream)
            self._task = self._bar.add_task(description, total=self.total, info="")

    def __enter__(self) -> TaskProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def advance(self, n: int = 1, info: str = "") -> None:
        """``n`` more done (``info``: a short note shown after the bar / at the end of the line)."""
        if not self.enabled:
            return
        self.done = min(self.done + int(n), self.total)
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, info=info)
            return
        now = time.perf_counter()
        if self.done < self.total and now - self._last_line < self.every:
            return
        self._last_line = now
        elapsed = now - self._start
        rate = self.done / elapsed if elapsed > 0 else float("inf")
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        unit = f" {self.unit}" if self.unit else ""
        extra = f"  {info}" if info else ""
        print(f"{self.description}: {self.done}/{self.total}{unit} ({100 * self.done / self.total:.0f}%)  "
              f"elapsed {_fmt_eta(elapsed)}  eta {_fmt_eta(eta)}{extra}", file=self.stream, flush=True)

    def close(self) -> None:
        """Remove the bar (the plain-line form has nothing to close)."""
        if self._bar is not None:
            _release_bar(self._task)
            self._bar = None
