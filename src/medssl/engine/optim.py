"""Optimisers: parameter groups without weight decay for norms and biases, the schedule, and one optimiser +
schedule per parameter set of a method, set up on Fabric (:func:`build_optimizers`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from medssl.config import OptimConfig
from medssl.engine.schedule import warmup_cosine
from medssl.errors import ConfigError


def param_groups(named_params: Sequence[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Split parameters into a decayed group (weights of linear / conv layers) and a group with no decay.

    No decay for tensors with ≤ 1 dimension (biases, norm scales and shifts, scalar temperatures) and for
    position embeddings / tokens — the usual practice (Goyal et al. 2017; ViT, MAE recipes).
    """
    decay, no_decay = [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or any(t in name for t in ("pos_embed", "cls_token", "mask_token")):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(named_params: Sequence[tuple[str, nn.Parameter]], cfg: OptimConfig,
                    lr: float) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW over :func:`param_groups`."""
    groups = param_groups(named_params, cfg.weight_decay)
    if not groups:
        raise ConfigError("the method has no trainable parameters")
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas))
    raise ConfigError(f"optim.name must be 'sgd' or 'adamw', got '{cfg.name}'")


def set_configs(cfg: OptimConfig, set_names: Sequence[str], lr: float,
                method_name: str = "") -> dict[str, OptimConfig]:
    """The optimiser settings of each parameter set of a method: ``cfg`` with ``cfg.sets[name]`` applied.

    Args:
        cfg: the run's optimiser settings.
        set_names: the method's parameter sets (:meth:`medssl.methods.base.Method.parameter_sets`).
        lr: the peak learning rate of a set that names none (the run's ``optim.lr`` or the method's default).
        method_name: for the error message.

    Raises:
        ConfigError: ``cfg.sets`` names a set the method does not have.
    """
    unknown = sorted(set(cfg.sets) - set(set_names))
    if unknown:
        raise ConfigError(
            f"optim.sets names {', '.join(unknown)}, but method '{method_name}' trains the parameter set(s) "
            f"{', '.join(set_names)}"
        )
    out = {}
    for name in set_names:
        sc = cfg.for_set(name)
        if sc.lr is None:
            sc.lr = lr
        out[name] = sc
    return out


def build_scheduler(opt: torch.optim.Optimizer, cfg: OptimConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up + cosine schedule stepping once per optimiser step."""
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(round(cfg.warmup_fraction * total_steps))
    warmup = max(0, min(warmup, total_steps))
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, total_steps, warmup, cfg.min_lr_ratio)
    )


@dataclass
class Optimizers:
    """One optimiser + schedule per parameter set of a method, and Fabric's wrappers of the optimisers.

    Attributes:
        optimizers: the torch optimisers by set name (their ``state_dict`` goes into checkpoints).
        schedulers: the warm-up + cosine schedule of each.
        configs: each set's settings (``optim`` with its ``optim.sets`` override applied, ``lr`` resolved).
        wrapped: Fabric's wrappers (what steps, under DDP and mixed precision).
    """

    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, torch.optim.lr_scheduler.LambdaLR]
    configs: dict[str, OptimConfig]
    wrapped: dict[str, Any]

    def zero_grad(self) -> None:
        """Drop every gradient (a skipped step)."""
        for opt in self.wrapped.values():
            opt.zero_grad(set_to_none=True)

    def step(self, fabric: Any, model: Any) -> None:
        """Clip each set's gradient norm to its ``grad_clip`` (0 = off), step every optimiser, advance the
        schedules, drop the gradients."""
        for name, opt in self.wrapped.items():
            if self.configs[name].grad_clip > 0:
                fabric.clip_gradients(model, opt, max_norm=self.configs[name].grad_clip)
        for name, opt in self.wrapped.items():
            opt.step()
            opt.zero_grad(set_to_none=True)
            self.schedulers[name].step()

    def lrs(self) -> dict[str, float]:
        """The current learning rate of each set (its first parameter group)."""
        return {name: float(opt.param_groups[0]["lr"]) for name, opt in self.optimizers.items()}


def build_optimizers(fabric: Any, method: nn.Module, cfg: OptimConfig, total_steps: int,
                     method_name: str = "") -> tuple[Any, Optimizers]:
    """One optimiser + schedule per parameter set ``method.parameter_sets()`` declares (CASS: cnn and vit),
    each with its ``optim.sets`` overrides; then the method and the optimisers set up on ``fabric``.

    Args:
        fabric: a launched ``lightning.fabric.Fabric``.
        method: the method (a :class:`~medssl.methods.base.Method`).
        cfg: the run's ``optim`` section, ``lr`` resolved.
        total_steps: length of the schedules.
        method_name: for error messages.

    Returns:
        Fabric's wrapper of the method (what runs forward) and the :class:`Optimizers`.
    """
    sets = method.parameter_sets()
    configs = set_configs(cfg, list(sets), float(cfg.lr), method_name)
    optimizers = {name: build_optimizer(params, configs[name], float(configs[name].lr))
                  for name, params in sets.items()}
    schedulers = {name: build_scheduler(opt, configs[name], total_steps) for name, opt in optimizers.items()}
    model = fabric.setup_module(method)
    wrapped = fabric.setup_optimizers(*optimizers.values())
    if len(optimizers) == 1:
        wrapped = (wrapped,)
    return model, Optimizers(optimizers, schedulers, configs, dict(zip(optimizers, wrapped, strict=True)))
