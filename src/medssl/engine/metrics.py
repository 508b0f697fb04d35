"""The metrics window: what happened since the last ``metrics.csv`` row, and the row itself.

Between log steps the loss and the method's logs are summed on the device (0-dim tensors are not read back,
so a GPU step does not wait for the host). On a log step (every ``train.log_every_n_steps`` and the last
step) the mean loss is averaged over ranks (one all-reduce), images/s is measured over the window
(``steps × global batch / seconds``), and one row goes to ``metrics.csv`` and the progress display.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch
import torch.nn.functional as F

from medssl import distributed as dist_utils
from medssl.engine.alarm import ALARM_COLUMN, L2_RANK_SUFFIX, CollapseAlarm, watched
from medssl.engine.logging import MetricsCSV, Progress
from medssl.engine.tracking import Trackers

log = logging.getLogger("medssl")


def _collapse_update(embeddings: dict[str, torch.Tensor], step: int, total_steps: int, every: int,
                     pending: dict[str, Any], alarm: CollapseAlarm | None = None,
                     trackers: Trackers | None = None) -> dict[str, Any]:
    """Collapse columns for the next metrics.csv row: present (empty) from the first row on, filled every
    ``every`` steps and at the last step from this step's embeddings (gathered across ranks). With an ``alarm``,
    each diagnostic also updates it and fills the ``collapse_alarm`` column (1 = fired / still collapsed);
    ``trackers`` get the spectra of the gathered embeddings as images."""
    if not every or not embeddings:
        return pending
    from medssl.eval.collapse import collapse_columns, collapse_logs

    cols = {c: pending.get(c, "") for c in collapse_columns(list(embeddings))}
    alarmed = [n for n in embeddings if watched(n)] if alarm is not None and alarm.enabled else []
    for n in alarmed:
        cols[f"{n}{L2_RANK_SUFFIX}"] = pending.get(f"{n}{L2_RANK_SUFFIX}", "")
    if alarmed:
        cols[ALARM_COLUMN] = pending.get(ALARM_COLUMN, "")
    if step % every == 0 or step == total_steps:
        gathered = {k: dist_utils.gather(v.detach(), with_grad=False) for k, v in embeddings.items()}
        stats = collapse_logs(gathered)
        for n in alarmed:  # the rank of what the loss sees: the L2-normalised embeddings
            stats[f"{n}{L2_RANK_SUFFIX}"] = collapse_logs({n: F.normalize(gathered[n].float(), dim=1)})[f"{n}_eff_rank"]
        cols.update(stats)
        if trackers:
            trackers.log_spectra(gathered, step)
        if alarm is not None:
            shapes = {k: (int(v.shape[0]), int(v.shape[1])) for k, v in gathered.items()}
            verdict = alarm.update(step, stats, shapes)
            if verdict is not None:
                cols[ALARM_COLUMN] = int(verdict)
    return cols


class MetricsWindow:
    """Accumulates steps between metrics rows and writes the row on log steps.

    Args:
        fabric: the launched Fabric (device, ``all_reduce``).
        csv: the ``metrics.csv`` writer (global rank 0), else ``None``.
        bar: the progress display.
        global_batch: images per optimiser step over all ranks.
        total_steps: the run's length (the last step always logs).
        log_every: ``train.log_every_n_steps``.
        collapse_every: ``train.collapse_every_n_steps`` (0 = off).
        start_step: the step the run starts (or resumes) at.
        alarm: the collapse alarm (:mod:`medssl.engine.alarm`) fed by each collapse diagnostic, or ``None``.
        trackers: the other ``log.backends`` (TensorBoard ...; global rank 0), else ``None``.
    """

    def __init__(self, fabric: Any, csv: MetricsCSV | None, bar: Progress, *, global_batch: int, total_steps: int,
                 log_every: int, collapse_every: int, start_step: int,
                 alarm: CollapseAlarm | None = None, trackers: Trackers | None = None) -> None:
        self.fabric, self.csv, self.bar, self.trackers = fabric, csv, bar, trackers
        self.global_batch, self.total_steps = global_batch, total_steps
        self.log_every, self.collapse_every = log_every, collapse_every
        self.loss_sum = torch.zeros((), device=fabric.device)
        self.count = 0
        self.logs: dict[str, Any] = {}  # float or 0-dim tensor sums; tensors are read back only on log steps
        self.collapse_row: dict[str, Any] = {}
        self.alarm = alarm
        self.t_last, self.step_last = time.perf_counter(), start_step

    def add(self, out: Any, step: int) -> None:
        """Add one applied step's :class:`~medssl.methods.base.StepOutput` (``step`` = steps completed)."""
        self.loss_sum += out.loss.detach().float()
        self.count += 1
        for k, v in out.logs.items():
            self.logs[k] = self.logs.get(k, 0.0) + (v.detach().float() if torch.is_tensor(v) else float(v))
        self.collapse_row = _collapse_update(out.embeddings, step, self.total_steps, self.collapse_every,
                                             self.collapse_row, self.alarm, self.trackers)

    def maybe_log(self, step: int, epoch: int, lrs: dict[str, float], *, force: bool = False) -> None:
        """On a log step: the row (``step, epoch, loss, lr, images_per_s``, ``lr_<set>`` with several parameter
        sets, the method's logs averaged over the window, collapse columns), the progress line, a reset."""
        if not force and step % self.log_every != 0 and step != self.total_steps:
            return
        if force and self.count == 0:  # the row of this step is written already
            return
        n = max(self.count, 1)
        mean_loss = float(self.fabric.all_reduce(self.loss_sum / n, reduce_op="mean"))
        now = time.perf_counter()
        ips = (step - self.step_last) * self.global_batch / max(now - self.t_last, 1e-9)
        lr_now = next(iter(lrs.values()))
        if self.csv is not None:
            row = {"step": step, "epoch": epoch, "loss": mean_loss, "lr": lr_now, "images_per_s": ips}
            if len(lrs) > 1:
                row.update({f"lr_{name}": lr for name, lr in lrs.items()})
            row.update({k: float(v) / n for k, v in self.logs.items()})
            row.update(self.collapse_row)
            self.csv.log(row)
            if self.trackers:
                self.trackers.log_metrics(row, step)
        self.bar.update(step, epoch, mean_loss, lr_now, ips)
        if not math.isfinite(mean_loss):
            log.warning("non-finite mean loss at step %d", step)
        self.loss_sum.zero_()
        self.count = 0
        self.logs, self.collapse_row = {}, {}
        self.t_last, self.step_last = now, step

    def close(self) -> None:
        """Stop the progress display; flush and close the trackers."""
        self.bar.close()
        if self.trackers:
            self.trackers.close()
