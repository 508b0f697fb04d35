"""Optimisers: parameter groups without weight decay for norms and biases, plus the schedule."""

from __future__ import annotations

from collections.abc import Sequence

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
        if p.ndim <= 1 or name.endswith(".bias") or "pos_embed" in name or "cls_token" in name or "mask_token" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(named_params: Sequence[tuple[str, nn.Parameter]], cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW over :func:`param_groups`."""
    groups = param_groups(named_params, cfg.weight_decay)
    if not groups:
        raise ConfigError("the method has no trainable parameters")
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas))
    raise ConfigError(f"optim.name must be 'sgd' or 'adamw', got '{cfg.name}'")


def set_configs(cfg: OptimConfig, set_names: Sequence[str], lr: float, method_name: str = "") -> dict[str, OptimConfig]:
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


def build_scheduler(opt: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up + cosine schedule stepping once per optimiser step."""
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(round(cfg.warmup_fraction * total_steps))
    warmup = max(0, min(warmup, total_steps))
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, total_steps, warmup, cfg.min_lr_ratio)
    )
