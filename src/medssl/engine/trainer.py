"""The training loop on Lightning Fabric: CPU, one GPU, DDP across GPUs and nodes, bf16 autocast.

The trainer is method-agnostic. :func:`pretrain` puts the named parts together — the run directory and its
lock (:mod:`~medssl.engine.rundir`), the data (:mod:`~medssl.engine.loader`), the method
(:func:`build_method`), one optimiser + schedule per parameter set (:mod:`~medssl.engine.optim`), the
resumable state (:mod:`~medssl.engine.state`) — and :class:`Trainer` loops ``loss = method(batch).loss;
backward; guard; step; method.after_optimizer_step``, with the step guard (:mod:`~medssl.engine.guard`),
the metrics window (:mod:`~medssl.engine.metrics`) and checkpoints (:mod:`~medssl.engine.checkpoint`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from medssl import distributed as dist_utils
from medssl.config import PretrainConfig, TrainConfig
from medssl.engine.alarm import CollapseAlarm, TrainingCollapsed
from medssl.engine.checkpoint import rng_state, save_and_rotate
from medssl.engine.guard import StepGuard, TrainingInterrupted
from medssl.engine.loader import TrainData, build_loader, open_data, pretrain_indices
from medssl.engine.logging import MetricsCSV, Progress
from medssl.engine.metrics import MetricsWindow
from medssl.engine.optim import Optimizers, build_optimizers
from medssl.engine.rundir import RunDir
from medssl.engine.sampler import check_loader_resume
from medssl.engine.state import TrainState, load_start
from medssl.engine.tracking import Trackers, check_backends
from medssl.errors import ConfigError
from medssl.methods import DataInfo, Method, get_method
from medssl.methods import build_method as build_registered_method

log = logging.getLogger("medssl")

__all__ = ["Trainer", "TrainingInterrupted", "build_method", "pretrain", "pretrain_indices", "resolve_defaults"]


def _quiet_lightning() -> None:
    for name in ("lightning.fabric", "lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*Seed set to.*")


def make_fabric(t: TrainConfig) -> Any:
    """A Fabric for ``train.devices × train.num_nodes`` (DDP above one) at ``train.precision``.

    Raises:
        ConfigError: Lightning cannot set up the devices (e.g. ``accelerator=cuda`` without a GPU).
    """
    from lightning.fabric import Fabric
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    precision = "32-true" if t.precision in ("32", "32-true") else t.precision
    if precision == "bf16-mixed" and t.accelerator in ("auto", "cpu") and not torch.cuda.is_available():
        log.warning("bf16-mixed on CPU: autocast runs, but expect no speed-up")
    strategy = "ddp" if (t.devices > 1 or t.num_nodes > 1) else "auto"
    try:
        return Fabric(accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=strategy,
                      precision=precision)
    except (ValueError, RuntimeError, MisconfigurationException) as e:
        raise ConfigError(
            f"cannot set up devices={t.devices} accelerator={t.accelerator} precision={t.precision}: {e}"
        ) from None


@contextlib.contextmanager
def _deterministic(enabled: bool) -> Iterator[None]:
    """``train.deterministic``: torch's deterministic algorithms for the body, the previous setting after."""
    was = torch.are_deterministic_algorithms_enabled()
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was)


def resolve_defaults(cfg: PretrainConfig, dataset: Any, method_cls: type[Method]) -> None:
    """Fill the defaults that depend on the data and the method, so ``config.yaml`` records the values used:
    ``data.image_size`` (the dataset's native size) and ``optim.lr`` (:func:`default_lr`)."""
    if cfg.data.image_size is None:
        cfg.data.image_size = int(dataset.image_size)
    if cfg.optim.lr is None:
        cfg.optim.lr = default_lr(method_cls, cfg.train)


def default_lr(method_cls: type[Method], train: TrainConfig) -> float:
    """The method's ``default_lr``, scaled linearly with the global batch when the method names the batch it is
    for (``lr_reference_batch``; MoCo v2: 0.06 at 128, the rule of lightly's CIFAR-10 benchmarks)."""
    lr = float(method_cls.default_lr)
    ref = getattr(method_cls, "lr_reference_batch", None)
    if ref:
        lr *= train.batch_size * train.devices * train.num_nodes / ref
    return lr


def build_method(cfg: PretrainConfig, info: DataInfo, fabric: Any, *, init_weights: bool = True) -> Method:
    """The registered method ``cfg.method_name`` for data ``info`` (its per-method defaults resolved into ``cfg``
    by :func:`medssl.methods.build_method`, before ``config.yaml`` is written), initialised on Fabric's device, in
    channels-last memory format with ``train.channels_last`` (the weights decide every conv's output format).
    ``init_weights=False`` skips ``model.init_from`` (a resumed run's weights come from its checkpoint)."""
    with fabric.init_module():
        method = build_registered_method(cfg, info, init_weights=init_weights)
    if cfg.train.channels_last:
        method = method.to(memory_format=torch.channels_last if info.spatial_dims == 2 else torch.channels_last_3d)
    return method


def _write_visuals(method: Method, batch: dict[str, torch.Tensor], step: int, root: Path,
                   seed: int) -> Path | None:
    """Ask the method for its reconstruction panels and write ``root/reconstructions/step_XXXXXX.png``.

    Runs under ``no_grad`` in ``eval()`` mode, with the global RNG forked and seeded with ``seed`` (the same
    masks and views at every call; training randomness untouched). A failing figure is logged, not raised:
    a picture must not cost a run.
    """
    devices = sorted({v.device.index or 0 for v in batch.values() if v.is_cuda})
    was_training = method.training
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed)
            method.eval()
            panels = method.visualize(batch, step)
            if not panels:
                return None
            from medssl.eval.reconstruction import save_reconstruction_grid

            return save_reconstruction_grid(panels, root / "reconstructions" / f"step_{step:06d}.png",
                                            title=f"{method.name} step {step}")
    except Exception as e:  # any failure of a figure is only logged
        log.warning("step %d: reconstruction figure failed (%s: %s)", step, type(e).__name__, e)
        return None
    finally:
        method.train(was_training)


class Trainer:
    """The loop over prepared parts: forward, backward, guard, optimiser step, hooks, checkpoints.

    Args:
        fabric: the launched Fabric.
        cfg: the resolved config.
        run: the (locked) run directory.
        data: the loader and the run's length.
        model: Fabric's wrapper of ``state.method``.
        optim: the optimisers and schedules.
        state: the resumable state (at step 0 or the resumed step).
        progress: show progress (bar on a TTY, plain lines otherwise).
        resumed: the run continues an earlier one (``metrics.csv`` is truncated to the resumed step).
    """

    def __init__(self, fabric: Any, cfg: PretrainConfig, run: RunDir, data: TrainData, model: Any,
                 optim: Optimizers, state: TrainState, *, progress: bool, resumed: bool) -> None:
        self.fabric, self.cfg, self.run, self.data = fabric, cfg, run, data
        self.model, self.optim, self.state, self.method = model, optim, state, state.method
        csv = MetricsCSV(run.metrics, resume_step=state.step if resumed else None) if fabric.is_global_zero else None
        self.trackers = (Trackers(cfg.log.backends, run.root, project=cfg.log.project,
                                  resume_step=state.step if resumed else None) if fabric.is_global_zero else None)
        if self.trackers and not resumed:
            self.trackers.log_hyperparams(cfg.to_dict())
        bar = Progress(data.total_steps, start_step=state.step, enabled=progress and fabric.is_global_zero)
        t = cfg.train
        self.alarm = CollapseAlarm(rank_fraction=t.collapse_alarm_rank, min_std=t.collapse_alarm_std,
                                   patience=t.collapse_alarm_patience)
        self.window = MetricsWindow(fabric, csv, bar, global_batch=data.global_batch, total_steps=data.total_steps,
                                    log_every=t.log_every_n_steps, collapse_every=t.collapse_every_n_steps,
                                    start_step=state.step, alarm=self.alarm, trackers=self.trackers)
        self.guard = StepGuard(fabric, cfg.checkpoint.on_sigterm, run.last)

    def fit(self) -> None:
        """Train until ``data.total_steps``, then write the final checkpoint."""
        self.model.train()
        try:
            while self.state.step < self.data.total_steps:
                epoch, start_batch = divmod(self.state.step, self.data.steps_per_epoch)
                self.data.sampler.set_epoch(epoch, start_batch)
                for batch in self.data.loader:
                    if self._step(batch, epoch):
                        break
        finally:
            self.guard.close()
            self.window.close()
        self.save_checkpoint()

    def _step(self, batch: dict[str, torch.Tensor], epoch: int) -> bool:
        """One batch: forward, backward (always: every rank joins DDP's all-reduce), the guard's verdict, then
        the optimiser step or a skip. Returns whether the run has reached its length."""
        batch = {k: v.to(self.fabric.device, non_blocking=True) for k, v in batch.items()}
        out = self.model(batch)
        self.fabric.backward(out.loss)
        verdict = self.guard.check(out.loss, self.method, self.state.step)
        if not verdict.finite:
            self.optim.zero_grad()
        else:
            self.optim.step(self.fabric, self.model)
            self.method.after_optimizer_step(self.state.step, self.data.total_steps)
            self.state.step += 1
            self._after_step(out, batch, epoch)
        if verdict.stop:
            self._interrupt()
        if self.cfg.train.stop_on_collapse and self.alarm.streak >= self.alarm.patience > 0:
            self._stop_collapsed()
        return self.state.step >= self.data.total_steps

    def _after_step(self, out: Any, batch: dict[str, torch.Tensor], epoch: int) -> None:
        """Metrics, reconstruction figures and checkpoints that fall on the step just completed."""
        step, t = self.state.step, self.cfg.train
        self.window.add(out, step)
        vis = t.visualize_every_n_steps
        if self.fabric.is_global_zero and vis and (step % vis == 0 or step == self.data.total_steps):
            figure = _write_visuals(self.method, batch, step, self.run.root, t.seed)
            if figure is not None and self.trackers:
                self.trackers.log_image_file("reconstructions", figure, step)
        self.window.maybe_log(step, epoch, self.optim.lrs())
        every = self.cfg.checkpoint.every_n_steps
        if (every and step % every == 0) or step % self.data.steps_per_epoch == 0:
            self.save_checkpoint()

    def save_checkpoint(self) -> None:
        """Gather every rank's RNG state; global rank 0 writes ``last.ckpt`` atomically (and rotates)."""
        rngs = dist_utils.all_gather_object(rng_state())
        if self.fabric.is_global_zero:
            ckpt = self.state.state_dict(rngs)
            ckpt["loader"] = self.data.loader_state(self.state.step)
            save_and_rotate(ckpt, self.run.last, step=self.state.step,
                            keep_last_k=self.cfg.checkpoint.keep_last_k)
        self.fabric.barrier()

    def _stop_collapsed(self) -> None:
        """``train.stop_on_collapse``: flush the metrics row, write a checkpoint, stop with exit code 3."""
        self.window.maybe_log(self.state.step, self.state.step // self.data.steps_per_epoch, self.optim.lrs(),
                              force=True)
        self.save_checkpoint()
        raise TrainingCollapsed(
            f"stopped by the collapse alarm (train.stop_on_collapse) after step {self.state.step} of "
            f"{self.data.total_steps}; see the warning above for the likely causes. Checkpoint: {self.run.last}"
        )

    def _interrupt(self) -> None:
        self.save_checkpoint()
        raise TrainingInterrupted(
            f"stopped by {self.guard.signal_name} after step {self.state.step} of {self.data.total_steps}; "
            f"checkpoint written to {self.run.last}. Continue with the same command plus --resume."
        )


def pretrain(cfg: PretrainConfig, out_dir: str | Path, *, resume: bool = False, force: bool = False,
             progress: bool = True) -> Path:
    """Run self-supervised pretraining described by ``cfg`` into ``out_dir``.

    Args:
        cfg: the resolved configuration (``data.image_size`` and ``optim.lr`` defaults are filled in).
        out_dir: run directory (created and locked for the whole run).
        resume: continue from ``out_dir/checkpoints/last.ckpt`` at the saved step, with the same data order
            and RNG states.
        force: accept a changed config on resume.
        progress: show progress (bar on a TTY, plain lines otherwise).

    Returns:
        The run directory.
    """
    _quiet_lightning()
    check_backends(cfg.log.backends)
    run = RunDir(out_dir)
    run.check(cfg.data.spec, resume=resume)
    fabric = make_fabric(cfg.train)
    fabric.launch()
    with run.locked(fabric), _deterministic(cfg.train.deterministic):
        start = load_start(run, cfg, resume=resume, force=force)
        # Each rank gets its own augmentation stream; data order comes from the sampler's own seed.
        fabric.seed_everything(cfg.train.seed + fabric.global_rank, verbose=False)
        dataset = open_data(cfg, run, fabric.is_global_zero, progress=progress)
        method_cls = get_method(cfg.method_name)
        resolve_defaults(cfg, dataset, method_cls)
        data = build_loader(cfg, dataset, method_cls.view_spec_for(cfg.method), fabric)
        method = build_method(cfg, data.info, fabric, init_weights=start is None)
        model, optim = build_optimizers(fabric, method, cfg.optim, data.total_steps, cfg.method_name)
        state = TrainState(method, optim, cfg, data.steps_per_epoch)
        if start is not None:
            state.load(start, rank=fabric.global_rank, source=run.last)
            check_loader_resume(start.get("loader"), data.loader_state(state.step), run.last)
        if fabric.is_global_zero:
            run.write_start(cfg, dataset, data.indices)
        fabric.barrier()
        Trainer(fabric, cfg, run, data, model, optim, state, progress=progress, resumed=resume).fit()
        if fabric.is_global_zero:
            from medssl.export import export_encoders, volume_metadata

            export_encoders(method, run.root, volume_metadata(cfg.data, data.info.spatial_dims))
        fabric.barrier()
    return run.root
