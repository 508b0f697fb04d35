"""BatchNorm variants that keep a contrastive batch from leaking through its statistics.

* :class:`SplitBatchNorm2d` / ``3d`` — statistics over sub-batches in training (MoCo's single-GPU recipe for
  CIFAR, He et al. 2020, uses it with a shuffled key batch as the one-process stand-in for shuffle-BN): a
  sample's normalisation depends only on the samples of its own sub-batch.
* :class:`GlobalBatchNorm2d` / ``3d`` — statistics over the whole batch of all ranks under DDP (what SyncBatchNorm
  does), with a gradient-preserving all-gather, so it runs on gloo (CPU) and NCCL alike; one process: plain BN.

Both keep the parameters, buffers and state-dict keys of :class:`torch.nn.BatchNorm2d` / ``3d`` and behave as it
in evaluation mode, so exported encoders are unchanged. :func:`convert_batchnorm` swaps them into a network.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medssl import distributed as dist_utils

__all__ = ["GlobalBatchNorm2d", "GlobalBatchNorm3d", "SplitBatchNorm2d", "SplitBatchNorm3d", "convert_batchnorm",
           "set_num_splits"]


def _factor(bn: nn.modules.batchnorm._BatchNorm) -> float:
    if bn.momentum is not None:
        return float(bn.momentum)
    return 1.0 / float(int(bn.num_batches_tracked) + 1)


class _SplitMixin:
    """Training-mode statistics over contiguous sub-batches (``torch.tensor_split``); the running statistics are
    updated with the average of the sub-batches' (MoCo's ``SplitBatchNorm``). The batch is cut into
    ``min(num_splits, N // min_split_size)`` sub-batches, so none holds fewer than ``min_split_size`` samples.
    Plain BatchNorm when that is one sub-batch, in evaluation mode and under DDP (shuffle-BN across ranks does
    the job there)."""

    num_splits: int = 1
    min_split_size: int = 16

    def splits_for(self, n: int) -> int:
        """The number of sub-batches a training batch of ``n`` samples is cut into."""
        return max(1, min(int(self.num_splits), n // max(1, int(self.min_split_size))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn: nn.modules.batchnorm._BatchNorm = self  # type: ignore[assignment]
        s = self.splits_for(x.shape[0])
        if not bn.training or s <= 1 or dist_utils.is_distributed():
            return super().forward(x)  # type: ignore[misc]
        factor = _factor(bn)
        outs, means, variances = [], [], []
        for chunk in x.tensor_split(s):
            rm = bn.running_mean.clone() if bn.running_mean is not None else None
            rv = bn.running_var.clone() if bn.running_var is not None else None
            outs.append(F.batch_norm(chunk, rm, rv, bn.weight, bn.bias, True, factor, bn.eps))
            means.append(rm)
            variances.append(rv)
        if bn.track_running_stats and bn.running_mean is not None:
            with torch.no_grad():
                bn.running_mean.copy_(torch.stack(means).mean(0))
                bn.running_var.copy_(torch.stack(variances).mean(0))
                bn.num_batches_tracked.add_(1)
        return torch.cat(outs)


class _GlobalMixin:
    """Training-mode statistics over the batches of all ranks (gathered sums, gradient through them)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn: nn.modules.batchnorm._BatchNorm = self  # type: ignore[assignment]
        if not bn.training or not dist_utils.is_distributed():
            return super().forward(x)  # type: ignore[misc]
        dims = [0, *range(2, x.ndim)]
        shape = (1, -1) + (1,) * (x.ndim - 2)
        xf = x.float()
        c = x.shape[1]
        # two passes (mean, then the centred second moment), each a gradient-preserving all-gather of per-rank sums
        n_local = torch.full((1,), float(x.numel() // c), device=x.device, dtype=xf.dtype)
        total = dist_utils.gather(torch.cat([xf.sum(dims), n_local])[None]).sum(0)
        n = total[-1].detach()
        mean = total[:c] / n
        var = dist_utils.gather((xf - mean.view(shape)).square().sum(dims)[None]).sum(0) / n
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + bn.eps)
        if bn.affine:
            y = y * bn.weight.float().view(shape) + bn.bias.float().view(shape)
        if bn.track_running_stats and bn.running_mean is not None:
            with torch.no_grad():
                factor = _factor(bn)
                unbiased = var.detach() * n / (n - 1).clamp(min=1.0)
                bn.running_mean.lerp_(mean.detach().to(bn.running_mean.dtype), factor)
                bn.running_var.lerp_(unbiased.to(bn.running_var.dtype), factor)
                bn.num_batches_tracked.add_(1)
        return y.to(x.dtype)


class SplitBatchNorm2d(_SplitMixin, nn.BatchNorm2d):
    """:class:`torch.nn.BatchNorm2d` with training statistics over sub-batches (see :class:`_SplitMixin`)."""


class SplitBatchNorm3d(_SplitMixin, nn.BatchNorm3d):
    """:class:`torch.nn.BatchNorm3d` with training statistics over sub-batches."""


class GlobalBatchNorm2d(_GlobalMixin, nn.BatchNorm2d):
    """:class:`torch.nn.BatchNorm2d` with training statistics over all ranks under DDP."""


class GlobalBatchNorm3d(_GlobalMixin, nn.BatchNorm3d):
    """:class:`torch.nn.BatchNorm3d` with training statistics over all ranks under DDP."""


_KINDS = {"split": {nn.BatchNorm2d: SplitBatchNorm2d, nn.BatchNorm3d: SplitBatchNorm3d},
          "global": {nn.BatchNorm2d: GlobalBatchNorm2d, nn.BatchNorm3d: GlobalBatchNorm3d}}


def convert_batchnorm(net: nn.Module, kind: str, num_splits: int = 1, min_split_size: int = 16) -> nn.Module:
    """Replace every plain ``BatchNorm2d`` / ``BatchNorm3d`` of ``net`` (in place) by its ``split`` or ``global``
    variant, with the same parameters and buffers; returns ``net``."""
    table = _KINDS[kind]
    for name, module in list(net.named_modules()):
        cls = table.get(type(module))
        if cls is None:
            continue
        new = cls(module.num_features, eps=module.eps, momentum=module.momentum, affine=module.affine,
                  track_running_stats=module.track_running_stats)
        new.load_state_dict(module.state_dict())
        if module.affine:
            new.to(module.weight.device)
        if kind == "split":
            new.num_splits, new.min_split_size = int(num_splits), int(min_split_size)
        parent, _, child = name.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, child, new)
    return net


def set_num_splits(net: nn.Module, num_splits: int) -> None:
    """Set the sub-batch count of every split BatchNorm in ``net``."""
    for m in net.modules():
        if isinstance(m, _SplitMixin):
            m.num_splits = int(num_splits)
