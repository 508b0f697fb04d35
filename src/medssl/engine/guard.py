"""The step guard: skip steps whose loss or gradients are not finite, stop cleanly on SIGTERM.

After backward, one fused norm over every gradient and the loss are checked together, with the SIGTERM flag,
in a single 2-element tensor: one read-back per step, and under DDP one all-reduce (min) so that every rank
skips the same steps and stops at the same step, even when the signal reaches the ranks at different times
(a rank that skipped while another stepped would desynchronise DDP's gradient all-reduce and hang).
"""

from __future__ import annotations

import logging
import math
import signal
import threading
from pathlib import Path
from typing import Any, NamedTuple

import torch

from medssl.errors import MedsslError

log = logging.getLogger("medssl")

#: Consecutive non-finite losses after which training stops (the last good checkpoint stays intact).
MAX_BAD_STEPS = 10


class TrainingInterrupted(MedsslError):
    """Training stopped on SIGTERM after writing a checkpoint (the CLI exits with code 143)."""

    exit_code = 143


def _finite_gradients(module: torch.nn.Module) -> torch.Tensor:
    """A 0-dim bool tensor (no read-back): are all gradients finite? One fused norm over every gradient, so a
    NaN or Inf anywhere makes it non-finite."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return torch.ones((), dtype=torch.bool)
    return torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum())


class _StopOnSignal:
    """Turns SIGTERM into a flag checked once per step, so the step finishes and a checkpoint is written.

    Signal handlers can only be installed from the main thread; elsewhere (a training loop started from a
    worker thread) SIGTERM keeps its default action.
    """

    def __init__(self, enabled: bool) -> None:
        self.flag = False
        self.signal_name = "SIGTERM"
        self._previous: Any = None
        if enabled and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.flag = True
        self.signal_name = signal.Signals(signum).name

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


class Verdict(NamedTuple):
    """The guard's answer for one step: apply it (``finite``)? stop after it (``stop``)?"""

    finite: bool
    stop: bool


class StepGuard:
    """Per step, one verdict from one collective; after :data:`MAX_BAD_STEPS` bad steps in a row, an error.

    Args:
        fabric: the launched Fabric (its ``world_size`` and ``all_reduce``).
        on_sigterm: catch SIGTERM (``checkpoint.on_sigterm``); restored by :meth:`close`.
        last: the checkpoint named in the error after too many bad steps.
    """

    def __init__(self, fabric: Any, on_sigterm: bool, last: Path) -> None:
        self.fabric = fabric
        self.last = last
        self.bad_steps = 0
        self._signal = _StopOnSignal(enabled=on_sigterm)

    @property
    def signal_name(self) -> str:
        return self._signal.signal_name

    def check(self, loss: torch.Tensor, module: torch.nn.Module, step: int) -> Verdict:
        """Call after backward. Are ``loss`` and every gradient of ``module`` finite on every rank, and has any
        rank been signalled? A non-finite step is logged and counted (the caller skips it).

        Raises:
            MedsslError: the :data:`MAX_BAD_STEPS`-th non-finite step in a row.
        """
        running = torch.tensor(0.0 if self._signal.flag else 1.0, device=loss.device)
        flags = torch.stack([(torch.isfinite(loss.detach()) & _finite_gradients(module)).float(), running])
        if self.fabric.world_size > 1:  # "not stopped" travels as 1, so min = any rank was signalled
            flags = self.fabric.all_reduce(flags, reduce_op="min")
        finite_flag, running_flag = flags.tolist()  # the one read-back of the step
        verdict = Verdict(finite=finite_flag != 0.0, stop=running_flag == 0.0)
        if verdict.finite:
            self.bad_steps = 0
            return verdict
        self.bad_steps += 1
        value = float(loss.detach())
        what = "loss" if not math.isfinite(value) else "gradients"
        log.warning("step %d: non-finite %s (loss %s), step skipped", step, what, value)
        if self.bad_steps >= MAX_BAD_STEPS:
            raise MedsslError(
                f"{self.bad_steps} consecutive non-finite losses or gradients at step {step}; stopped. "
                f"The last good checkpoint is {self.last}. Lower the learning rate, set optim.grad_clip, or check "
                "the data."
            )
        return verdict

    def close(self) -> None:
        """Give SIGTERM its previous handler back."""
        self._signal.restore()
