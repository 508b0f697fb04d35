"""Exponential moving average of parameters (MoCo's momentum / key encoder)."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def make_ema_copy(module: nn.Module) -> nn.Module:
    """A frozen deep copy of ``module`` to be updated by :func:`ema_update`."""
    ema = copy.deepcopy(module)
    for p in ema.parameters():
        p.requires_grad_(False)
    return ema


@torch.no_grad()
def ema_update(ema: nn.Module, online: nn.Module, momentum: float) -> None:
    """``θ_ema ← m θ_ema + (1 − m) θ_online`` for all parameters, fused with ``torch._foreach_*``.

    Buffers (BatchNorm running statistics) are not averaged: the key encoder keeps its own, computed on
    the batches it sees, as in MoCo.
    """
    ema_params = [p for p in ema.parameters()]
    online_params = [p.detach() for p in online.parameters()]
    if len(ema_params) != len(online_params):
        raise ValueError("EMA and online modules have different parameter lists")
    torch._foreach_mul_(ema_params, momentum)
    torch._foreach_add_(ema_params, online_params, alpha=1.0 - momentum)


def cosine_momentum(base: float, step: int, total_steps: int) -> float:
    """The EMA momentum at ``step`` of ``total_steps``, rising from ``base`` to 1 on a half cosine (BYOL, DINO,
    MoCo v3): ``m = 1 − (1 − base) · (1 + cos(π · step / total_steps)) / 2``; ``base`` when ``total_steps <= 0``."""
    if total_steps <= 0:
        return base
    t = min(max(step / total_steps, 0.0), 1.0)
    return 1.0 - (1.0 - base) * (1.0 + math.cos(math.pi * t)) / 2.0
