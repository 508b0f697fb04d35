"""What a checkpoint holds and how a run starts from one.

:class:`TrainState` is the resumable state of a run: step, method (weights, momentum encoders, queues: its
``state_dict``), one optimiser and one schedule per parameter set, the RNG states of every rank and the
config. ``state_dict`` / ``load`` are exact inverses, which is what makes a resumed run equal an uninterrupted
one (``tests/reliability/test_kill_resume.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medssl.config import PretrainConfig
from medssl.engine.checkpoint import load_checkpoint, set_rng_state
from medssl.engine.optim import Optimizers
from medssl.engine.rundir import RunDir
from medssl.errors import CheckpointError, ConfigError
from medssl.methods import Method

log = logging.getLogger("medssl")

#: ``(section, key)`` a resumed run may change without ``--force``: run length, devices, logging and
#: checkpoint cadence, data loading; never what is trained.
RESUMABLE_CHANGES = frozenset({
    ("train", "epochs"), ("train", "max_steps"), ("train", "devices"), ("train", "num_nodes"),
    ("train", "log_every_n_steps"), ("checkpoint", "every_n_steps"), ("checkpoint", "keep_last_k"),
    ("checkpoint", "on_sigterm"), ("data", "num_workers"), ("data", "cache"), ("data", "cache_dir"),
    ("train", "accelerator"), ("train", "collapse_every_n_steps"), ("train", "visualize_every_n_steps"),
})

#: How many names of each kind a mismatch message lists.
_SHOWN = 3


def check_resume_config(saved: dict[str, Any], current: dict[str, Any], force: bool) -> None:
    """A resumed run must keep the settings that define it (:data:`RESUMABLE_CHANGES` may change).

    Raises:
        ConfigError: listing every changed key, unless ``force``.
    """
    diffs = []
    for section, values in current.items():
        if not isinstance(values, dict):
            continue
        for key, value in values.items():
            old = saved.get(section, {}).get(key)
            if (section, key) not in RESUMABLE_CHANGES and old != value:
                diffs.append(f"{section}.{key}: {old!r} -> {value!r}")
    if diffs and not force:
        raise ConfigError("--resume with a changed config (" + "; ".join(diffs) + "); pass --force to accept")


def load_start(run: RunDir, cfg: PretrainConfig, *, resume: bool, force: bool) -> dict[str, Any] | None:
    """The checkpoint a run starts from: ``run.last`` with ``resume`` (config checked), else ``None``.

    Raises:
        CheckpointError: ``resume`` with a missing or unreadable checkpoint (:func:`load_checkpoint`).
        ConfigError: a fresh run into a directory that already holds one, or a changed config without ``force``.
    """
    root, last = run.root, run.last
    if not resume:
        if last.is_file():
            raise ConfigError(f"{root} already holds a run (checkpoints/last.ckpt); use --resume or another --out")
        return None
    ckpt = load_checkpoint(last)
    check_resume_config(ckpt.get("config") or {}, cfg.to_dict(), force)
    log.info("resuming %s from step %d (%s)", root, int(ckpt["step"]), last)
    return ckpt


def _names(keys: list[str]) -> str:
    more = f", ... {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def describe_mismatch(expected: Mapping[str, Any], found: Mapping[str, Any]) -> str | None:
    """One line saying how the state dict ``found`` (a checkpoint's) differs from ``expected`` (the model's).

    Lists the counts of missing keys, unexpected keys and keys with another shape, with the first few names
    of each (shapes as ``checkpoint -> model``); ``None`` when keys and shapes all agree.
    """
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shaped = [k for k in expected if k in found and tuple(getattr(expected[k], "shape", ()))
              != tuple(getattr(found[k], "shape", ()))]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s) ({_names(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s) ({_names(unexpected)})")
    if shaped:
        shown = [f"{k} {list(found[k].shape)} -> {list(expected[k].shape)}" for k in shaped]
        parts.append(f"{len(shaped)} key(s) with another shape ({_names(shown)})")
    return "; ".join(parts) or None


def _saved_optimizer_name(ckpt: Mapping[str, Any], set_name: str) -> str | None:
    """``optim.name`` the checkpoint's config gives parameter set ``set_name`` (its ``sets`` override first)."""
    optim = (ckpt.get("config") or {}).get("optim") or {}
    override = (optim.get("sets") or {}).get(set_name) or {}
    return override.get("name") or optim.get("name")


@dataclass
class TrainState:
    """The resumable state of a run.

    Attributes:
        method: the method (its ``state_dict`` holds weights, EMA encoders, queues and counters).
        optim: the optimisers and schedules of its parameter sets.
        cfg: the resolved config (stored with every checkpoint).
        steps_per_epoch: optimiser steps per epoch (the checkpoint's ``epoch`` is ``step // steps_per_epoch``).
        step: optimiser steps completed.
    """

    method: Method
    optim: Optimizers
    cfg: PretrainConfig
    steps_per_epoch: int
    step: int = 0

    def state_dict(self, rngs: list[dict[str, Any]]) -> dict[str, Any]:
        """The checkpoint: tensors and plain values only, so that it loads with ``weights_only=True``.

        Args:
            rngs: every rank's :func:`~medssl.engine.checkpoint.rng_state`, in rank order.
        """
        return {
            "step": self.step,
            "epoch": self.step // self.steps_per_epoch,
            "model": self.method.state_dict(),
            "optimizers": {n: o.state_dict() for n, o in self.optim.optimizers.items()},
            "schedulers": {n: s.state_dict() for n, s in self.optim.schedulers.items()},
            "rng": rngs,
            "config": self.cfg.to_dict(),
        }

    def load(self, ckpt: Mapping[str, Any], *, rank: int, source: Path) -> None:
        """Restore :meth:`state_dict` output; this rank's RNG state when the checkpoint has one for it.

        Raises:
            CheckpointError: naming ``source``, in one line, when the checkpoint does not fit this method
                (another method or backbone: see :func:`describe_mismatch`) or its optimisers.
        """
        problem = describe_mismatch(self.method.state_dict(), ckpt["model"])
        if problem:
            raise CheckpointError(f"checkpoint {source} does not fit method '{self.cfg.method_name}' with backbone "
                                  f"'{self.cfg.model.backbone}': {problem}")
        self.method.load_state_dict(ckpt["model"])
        for name, opt in self.optim.optimizers.items():
            self._load_optimizer(ckpt, name, opt, source)
        self.step = int(ckpt["step"])
        rng = ckpt.get("rng") or []
        if rank < len(rng):
            set_rng_state(rng[rank])

    def _load_optimizer(self, ckpt: Mapping[str, Any], name: str, opt: Any, source: Path) -> None:
        saved = (ckpt.get("optimizers") or {}).get(name)
        sched = (ckpt.get("schedulers") or {}).get(name)
        if saved is None or sched is None:
            have = ", ".join(ckpt.get("optimizers") or {}) or "none"
            raise CheckpointError(f"checkpoint {source}: no optimiser state for parameter set '{name}' (it has: "
                                  f"{have})")
        was, now = _saved_optimizer_name(ckpt, name), self.optim.configs[name].name
        if was is not None and was != now:
            raise CheckpointError(f"checkpoint {source}: parameter set '{name}' was trained with optim.name={was}, "
                                  f"this run uses {now}; its optimiser state cannot continue")
        try:
            opt.load_state_dict(saved)
            self.optim.schedulers[name].load_state_dict(sched)
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            first = (str(e).splitlines() or [type(e).__name__])[0][:200]
            raise CheckpointError(f"checkpoint {source}: optimiser state of parameter set '{name}' does not fit "
                                  f"({first})") from None
