"""The training loop on Lightning Fabric: CPU, one GPU, DDP across GPUs and nodes, bf16 autocast.

The trainer is method-agnostic: it builds the data loader, the method, one optimiser + schedule per
parameter set the method declares, then loops ``loss = method(batch).loss; backward; step;
method.after_optimizer_step``. It owns the run directory (``config.yaml``, ``metrics.csv``,
``checkpoints/last.ckpt``, exported encoders) and resuming.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medssl.config import PretrainConfig, save_config
from medssl.engine import checkpoint as ckpt_utils
from medssl.engine import distributed as dist_utils
from medssl.engine.logging import MetricsCSV, Progress
from medssl.engine.optim import build_optimizer, build_scheduler, set_configs
from medssl.engine.sampler import ResumableBatchSampler
from medssl.errors import CheckpointError, ConfigError, MedsslError
from medssl.methods import DataInfo, Method, build_method, get_method

log = logging.getLogger("medssl")

PRECISIONS = ("32", "32-true", "bf16-mixed", "16-mixed")
SPLIT_CHOICES = ("train", "train+val", "all")
#: Consecutive non-finite losses after which training stops (the last good checkpoint stays intact).
MAX_BAD_STEPS = 10


@dataclass
class RunPaths:
    """Where a run directory keeps its files."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.csv"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def last(self) -> Path:
        return self.checkpoints / "last.ckpt"


def _quiet_lightning() -> None:
    for name in ("lightning.fabric", "lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*Seed set to.*")


def _make_fabric(cfg: PretrainConfig) -> Any:
    from lightning.fabric import Fabric
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    t = cfg.train
    if t.precision not in PRECISIONS:
        raise ConfigError(f"train.precision must be one of {PRECISIONS}, got '{t.precision}'")
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


def pretrain_indices(dataset: Any, split: str) -> np.ndarray:
    """Indices pretraining may read: ``train`` (default), ``train+val`` or ``all`` (test included)."""
    if split not in SPLIT_CHOICES:
        raise ConfigError(f"data.split must be one of {SPLIT_CHOICES}, got '{split}'")
    if split == "all":
        return np.arange(len(dataset))
    parts = ["train"] if split == "train" else ["train", "val"]
    return np.concatenate([dataset.indices(p) for p in parts]).astype(np.int64)


def _lr_for(cfg: PretrainConfig, method_cls: type[Method]) -> float:
    return cfg.optim.lr if cfg.optim.lr is not None else method_cls.default_lr


def _collate_images(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack what pretraining needs (images, and high-res copies where present); labels are not read."""
    out = {"image": torch.stack([it["image"] for it in items])}
    for key in items[0]:
        if key.startswith("image_highres"):  # image_highres (2x), image_highres_x4 ...
            out[key] = torch.stack([it[key] for it in items])
    out["index"] = torch.tensor([int(it["index"]) for it in items])
    return out


def _collapse_update(embeddings: dict[str, torch.Tensor], step: int, total_steps: int, every: int,
                     pending: dict[str, Any]) -> dict[str, Any]:
    """Collapse columns for the next metrics.csv row: present (empty) from the first row on, filled every
    ``every`` steps and at the last step from this step's embeddings (gathered across ranks)."""
    if not every or not embeddings:
        return pending
    from medssl.eval.collapse import collapse_columns, collapse_logs

    cols = {c: pending.get(c, "") for c in collapse_columns(list(embeddings))}
    if step % every == 0 or step == total_steps:
        cols.update(collapse_logs({k: dist_utils.gather(v.detach(), with_grad=False) for k, v in embeddings.items()}))
    return cols


def _write_visuals(method: Method, batch: dict[str, torch.Tensor], step: int, root: Path, seed: int) -> Path | None:
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


def _finite_gradients(module: torch.nn.Module) -> torch.Tensor:
    """A 0-dim bool tensor (no read-back): are all gradients finite? One fused norm over every gradient, so a NaN
    or Inf anywhere makes it non-finite."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return torch.ones((), dtype=torch.bool)
    return torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum())


class TrainingInterrupted(MedsslError):
    """Training stopped on SIGTERM after writing a checkpoint (the CLI exits with code 143)."""

    exit_code = 143


class _StopOnSignal:
    """Turns SIGTERM into a flag checked once per step, so the step finishes and a checkpoint is written.

    Under DDP the trainer all-reduces the flag together with the step's non-finite check, so every rank stops at
    the same step even when the signal reaches the ranks at slightly different times. Signal handlers can only be installed from the main thread; elsewhere
    (a training loop started from a worker thread) SIGTERM keeps its default action.
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


def _check_resume_config(saved: dict[str, Any], current: dict[str, Any], force: bool) -> None:
    """A resumed run must keep the settings that define it; length and devices may change."""
    allowed = {("train", "epochs"), ("train", "max_steps"), ("train", "devices"), ("train", "num_nodes"),
               ("train", "log_every_n_steps"), ("checkpoint", "every_n_steps"), ("checkpoint", "keep_last_k"),
               ("checkpoint", "on_sigterm"), ("data", "num_workers"), ("data", "cache"), ("data", "cache_dir"),
               ("train", "accelerator"), ("train", "collapse_every_n_steps"), ("train", "visualize_every_n_steps")}
    diffs = []
    for section, values in current.items():
        if not isinstance(values, dict):
            continue
        for key, value in values.items():
            old = saved.get(section, {}).get(key)
            if (section, key) not in allowed and old != value:
                diffs.append(f"{section}.{key}: {old!r} -> {value!r}")
    if diffs and not force:
        raise ConfigError("--resume with a changed config (" + "; ".join(diffs) + "); pass --force to accept")


def pretrain(cfg: PretrainConfig, out_dir: str | Path, *, resume: bool = False, force: bool = False,
             progress: bool = True) -> Path:
    """Run self-supervised pretraining described by ``cfg`` into ``out_dir``.

    Args:
        cfg: the resolved configuration.
        out_dir: run directory (created).
        resume: continue from ``out_dir/checkpoints/last.ckpt`` at the saved step, with the same data order
            and RNG states.
        force: accept a changed config on resume.
        progress: show progress (bar on a TTY, plain lines otherwise).

    Returns:
        The run directory.
    """
    from medssl.data.specs import open_from_config
    from medssl.data.splits import write_split_manifest

    _quiet_lightning()
    paths = RunPaths(Path(out_dir))
    method_cls = get_method(cfg.method_name)
    start_ckpt: dict[str, Any] | None = None
    if resume:
        if not paths.last.is_file():
            raise CheckpointError(f"--resume: {paths.last} does not exist (nothing to resume in {paths.root})")
        start_ckpt = ckpt_utils.load_checkpoint(paths.last)
        _check_resume_config(start_ckpt.get("config", {}), cfg.to_dict(), force)
        log.info("resuming %s from step %d (%s)", paths.root, int(start_ckpt["step"]), paths.last)
    elif paths.last.is_file():
        raise ConfigError(f"{paths.root} already holds a run (checkpoints/last.ckpt); use --resume or another --out")

    fabric = _make_fabric(cfg)
    fabric.launch()
    t = cfg.train
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    if t.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    # Each rank gets its own augmentation stream; data order comes from the sampler's own seed.
    fabric.seed_everything(t.seed + fabric.global_rank, verbose=False)

    # The data seed is a property of the dataset (phantom content, split assignment), not of the run: evaluation
    # must see the same splits, so pretraining never reads the test images.
    dataset = open_from_config(cfg.data)
    skipped: list[tuple[str, str]] | None = None
    if cfg.data.skip_bad:
        from medssl.data.manifest import drop_bad

        dataset = drop_bad(dataset)
        skipped = dataset.skipped
        if skipped:
            log.warning("data %s: skipped %d unreadable item(s), listed in %s", cfg.data.spec, len(skipped),
                        paths.root / "skipped.csv")
    if cfg.data.image_size is None:
        cfg.data.image_size = int(dataset.image_size)
    indices = pretrain_indices(dataset, cfg.data.split)
    global_batch = t.batch_size * fabric.world_size
    if len(indices) < global_batch and t.drop_last:
        raise ConfigError(
            f"data {cfg.data.spec}: {len(indices)} training images, fewer than one batch of {global_batch}; "
            "lower --batch-size"
        )
    sampler = ResumableBatchSampler(indices, t.batch_size, seed=t.seed, rank=fabric.global_rank,
                                    world_size=fabric.world_size, drop_last=t.drop_last)
    steps_per_epoch = sampler.batches_per_epoch()
    total_steps = t.max_steps if t.max_steps is not None else t.epochs * steps_per_epoch
    if total_steps <= 0:
        raise ConfigError("nothing to train: max_steps / epochs give 0 steps")
    loader_data: torch.utils.data.Dataset = dataset
    view_spec = method_cls.view_spec_for(cfg.method)
    if view_spec.needs_highres:  # multi-scale reconstruction: the same images read at 2x (4x) the size
        from medssl.data.highres import HighResDataset

        loader_data = HighResDataset(dataset, view_spec.highres_factors)
    loader = torch.utils.data.DataLoader(
        loader_data, batch_sampler=sampler, num_workers=cfg.data.num_workers, collate_fn=_collate_images,
        pin_memory=fabric.device.type == "cuda", persistent_workers=False,
        generator=torch.Generator(),  # keeps the global RNG untouched by iterator creation (resume equality)
    )

    info = DataInfo(in_chans=dataset.in_chans, spatial_dims=dataset.spatial_dims,
                    image_size=int(cfg.data.image_size), num_samples=len(indices))
    with fabric.init_module():
        method = build_method(cfg, info)
    if t.channels_last:  # NHWC / NDHWC convolutions (the weights decide the format of every conv's output)
        method = method.to(memory_format=torch.channels_last if info.spatial_dims == 2 else torch.channels_last_3d)
    lr = _lr_for(cfg, method_cls)
    cfg.optim.lr = lr
    sets = method.parameter_sets()
    # One optimiser + schedule per parameter set (CASS: cnn and vit), each with its optim.sets overrides.
    set_cfgs = set_configs(cfg.optim, list(sets), lr, cfg.method_name)
    optimizers = {name: build_optimizer(params, set_cfgs[name], float(set_cfgs[name].lr))
                  for name, params in sets.items()}
    schedulers = {name: build_scheduler(opt, set_cfgs[name], total_steps) for name, opt in optimizers.items()}
    model = fabric.setup_module(method)
    fab_opts = fabric.setup_optimizers(*optimizers.values())
    if len(optimizers) == 1:
        fab_opts = (fab_opts,)
    fab_opts = dict(zip(optimizers, fab_opts, strict=True))

    step = 0
    if start_ckpt is not None:
        method.load_state_dict(start_ckpt["model"])
        for name, opt in optimizers.items():
            opt.load_state_dict(start_ckpt["optimizers"][name])
            schedulers[name].load_state_dict(start_ckpt["schedulers"][name])
        step = int(start_ckpt["step"])
        rng = start_ckpt.get("rng", [])
        if fabric.global_rank < len(rng):
            ckpt_utils.set_rng_state(rng[fabric.global_rank])

    if fabric.is_global_zero:
        paths.root.mkdir(parents=True, exist_ok=True)
        paths.checkpoints.mkdir(exist_ok=True)
        save_config(cfg, paths.config)
        if skipped is not None:
            from medssl.data.manifest import write_skipped

            write_skipped(skipped, paths.root / "skipped.csv")
        # which items pretraining read (split == train, or every non-test item): reusable with --splits
        write_split_manifest(dataset, paths.root / "splits.csv", {"subset:pretrain": indices})
    fabric.barrier()
    metrics = MetricsCSV(paths.metrics, resume_step=step if resume else None) if fabric.is_global_zero else None
    bar = Progress(total_steps, start_step=step, enabled=progress and fabric.is_global_zero)

    def save_checkpoint() -> None:
        rngs = dist_utils.all_gather_object(ckpt_utils.rng_state())
        if fabric.is_global_zero:
            ckpt_utils.save_and_rotate(
                {
                    "step": step,
                    "epoch": step // steps_per_epoch,
                    "model": method.state_dict(),
                    "optimizers": {n: o.state_dict() for n, o in optimizers.items()},
                    "schedulers": {n: s.state_dict() for n, s in schedulers.items()},
                    "rng": rngs,
                    "config": cfg.to_dict(),
                },
                paths.last,
                step=step,
                keep_last_k=cfg.checkpoint.keep_last_k,
            )
        fabric.barrier()

    if t.collapse_every_n_steps < 0:
        raise ConfigError(f"train.collapse_every_n_steps must be >= 0 (0 = off), got {t.collapse_every_n_steps}")
    collapse_row: dict[str, Any] = {}
    if t.visualize_every_n_steps < 0:
        raise ConfigError(f"train.visualize_every_n_steps must be >= 0 (0 = off), got {t.visualize_every_n_steps}")
    model.train()
    loss_sum = torch.zeros((), device=fabric.device)
    loss_count = 0
    logs_acc: dict[str, Any] = {}  # float or 0-dim tensor sums; tensors are read back only on log steps
    bad_steps = 0
    t_last = time.perf_counter()
    step_last = step
    stop = _StopOnSignal(enabled=cfg.checkpoint.on_sigterm)

    def interrupt() -> None:
        save_checkpoint()
        raise TrainingInterrupted(
            f"stopped by {stop.signal_name} after step {step} of {total_steps}; checkpoint written to "
            f"{paths.last}. Continue with the same command plus --resume."
        )
    try:
        while step < total_steps:
            epoch, start_batch = divmod(step, steps_per_epoch)
            sampler.set_epoch(epoch, start_batch)
            for batch in loader:
                batch = {k: v.to(fabric.device, non_blocking=True) for k, v in batch.items()}
                out = model(batch)
                loss = out.loss
                # Backward always runs (every rank joins DDP's gradient all-reduce); the loss and the gradients
                # are then checked together, with one read-back per step and one all-reduce under DDP, so that
                # every rank skips the same steps.
                # The SIGTERM flag travels in the same all-reduce, as "not stopped" (min: any rank was signalled).
                fabric.backward(loss)
                flags = torch.stack([(torch.isfinite(loss.detach()) & _finite_gradients(method)).float(),
                                     torch.tensor(0.0 if stop.flag else 1.0, device=loss.device)])
                if fabric.world_size > 1:
                    flags = fabric.all_reduce(flags, reduce_op="min")
                finite_flag, running_flag = flags.tolist()  # the one read-back of the step
                stop_requested = running_flag == 0.0
                if finite_flag == 0.0:
                    bad_steps += 1
                    for opt in fab_opts.values():
                        opt.zero_grad(set_to_none=True)
                    what = "loss" if not math.isfinite(float(loss.detach())) else "gradients"
                    log.warning("step %d: non-finite %s (loss %s), step skipped", step, what, float(loss.detach()))
                    if bad_steps >= MAX_BAD_STEPS:
                        raise MedsslError(
                            f"{bad_steps} consecutive non-finite losses or gradients at step {step}; stopped. "
                            f"The last good checkpoint is {paths.last}. Lower the learning rate, set "
                            "optim.grad_clip, or check the data."
                        )
                    if stop_requested:
                        interrupt()
                    continue
                bad_steps = 0
                for name, opt in fab_opts.items():  # clips the norm of this optimiser's parameters
                    if set_cfgs[name].grad_clip > 0:
                        fabric.clip_gradients(model, opt, max_norm=set_cfgs[name].grad_clip)
                for name, opt in fab_opts.items():
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    schedulers[name].step()
                method.after_optimizer_step(step, total_steps)
                step += 1
                loss_sum += loss.detach().float()
                loss_count += 1
                for k, v in out.logs.items():
                    logs_acc[k] = logs_acc.get(k, 0.0) + (v.detach().float() if torch.is_tensor(v) else float(v))
                collapse_row = _collapse_update(out.embeddings, step, total_steps, t.collapse_every_n_steps, collapse_row)
                vis = t.visualize_every_n_steps
                if fabric.is_global_zero and vis and (step % vis == 0 or step == total_steps):
                    _write_visuals(method, batch, step, paths.root, t.seed)
                is_log = step % t.log_every_n_steps == 0 or step == total_steps
                if is_log:
                    mean_loss = float(fabric.all_reduce(loss_sum / max(loss_count, 1), reduce_op="mean"))
                    now = time.perf_counter()
                    ips = (step - step_last) * global_batch / max(now - t_last, 1e-9)
                    lr_now = next(iter(optimizers.values())).param_groups[0]["lr"]
                    if metrics is not None:
                        row = {"step": step, "epoch": epoch, "loss": mean_loss, "lr": lr_now, "images_per_s": ips}
                        if len(optimizers) > 1:
                            row.update({f"lr_{n}": o.param_groups[0]["lr"] for n, o in optimizers.items()})
                        row.update({k: float(v) / max(loss_count, 1) for k, v in logs_acc.items()})
                        row.update(collapse_row)
                        metrics.log(row)
                    bar.update(step, epoch, mean_loss, lr_now, ips)
                    if not math.isfinite(mean_loss):
                        log.warning("non-finite mean loss at step %d", step)
                    loss_sum.zero_()
                    loss_count = 0
                    logs_acc = {}
                    collapse_row = {}
                    t_last, step_last = now, step
                every = cfg.checkpoint.every_n_steps
                if (every and step % every == 0) or step % steps_per_epoch == 0:
                    save_checkpoint()
                if stop_requested:
                    interrupt()
                if step >= total_steps:
                    break
    finally:
        stop.restore()
        bar.close()
        torch.use_deterministic_algorithms(was_deterministic)
    save_checkpoint()
    if fabric.is_global_zero:
        from medssl.export import export_encoders

        export_encoders(method, paths.root)
    fabric.barrier()
    return paths.root
