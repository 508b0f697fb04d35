"""A dense CNN run as a *sparse* one on masked input: the emulation of sparse convolution SparK uses.

Tian et al., "Designing BERT for Convolutional Networks: Sparse and Hierarchical Masked Modeling" (SparK,
ICLR 2023): a CNN fed an image with masked-out regions fills the holes from their neighbours layer after
layer ("mask pattern vanishing"), sees a distribution no real image has, and learns BatchNorm statistics
skewed by the holes. SparK keeps the masked positions *empty* instead, which this module emulates on an
unchanged network:

* after every convolution, pooling layer and ResNet stage, masked positions are set back to zero
  (forward hooks; the pixel mask is resized to each layer's resolution with
  :func:`medssl.transforms.masking.resize_mask`: a position is masked when everything it covers is);
* every BatchNorm computes its statistics over the visible positions only (:func:`sparse_batch_norm`),
  and its output is zero at masked positions.

Outside a masked forward (no mask in the :class:`MaskState`) the network is exactly the plain one, with the
same state-dict keys and values, so the encoder exports and evaluates as an ordinary ResNet.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from medssl.nn.layers import CONV_TYPES, pool
from medssl.transforms.masking import resize_mask

__all__ = [
    "RESNET_STAGES",
    "MaskState",
    "SparseBatchNorm2d",
    "SparseBatchNorm3d",
    "sparse_batch_norm",
    "sparsify",
]

#: the stage modules of a ResNet (timm 2D, medssl 3D), zeroed at masked positions after they run
RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")
#: layers whose output is zeroed at masked positions: convolutions and (strided) max / average pooling
_ZEROED = CONV_TYPES + tuple(pool(d, kind) for kind in ("max", "avg") for d in (2, 3))


class MaskState:
    """The current pixel-level mask of a forward pass, resized (and cached) to every layer's resolution.

    ``None`` outside a masked forward: hooks and sparse BatchNorm then do nothing, so the encoder behaves as
    the plain network (evaluation, export).
    """

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None
        self._cache: dict[tuple[int, ...], torch.Tensor] = {}

    @contextlib.contextmanager
    def active(self, mask: torch.Tensor | None) -> Iterator[None]:
        """Within the block, layers see ``mask`` (``(B, 1, *spatial)`` bool, ``True`` = masked)."""
        self.mask, self._cache = mask, {}
        try:
            yield
        finally:
            self.mask, self._cache = None, {}

    def visible(self, shape: Sequence[int]) -> torch.Tensor | None:
        """``(B, 1, *shape)`` float, 1 where visible (:func:`~medssl.transforms.masking.resize_mask`)."""
        if self.mask is None:
            return None
        key = tuple(int(s) for s in shape)
        vis = self._cache.get(key)
        if vis is None:
            vis = (~resize_mask(self.mask, key)).float()
            self._cache[key] = vis
        return vis

    def zero_masked(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
        """Forward hook: the output with masked positions set to zero."""
        vis = self.visible(output.shape[2:])
        return None if vis is None else output * vis.to(output.dtype)


def sparse_batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """BatchNorm over the visible positions only; masked positions of the output are zero.

    With ``V`` the visible positions of the batch (all samples, all spatial positions where ``visible = 1``)
    and ``n = |V|``, per channel::

        mean = Σ_V x / n,   var = Σ_V (x − mean)² / n,
        y = (x − mean) / sqrt(var + eps) · γ + β   on V, 0 elsewhere

    In training mode the running statistics are updated with ``mean`` and the unbiased ``var · n / (n − 1)``
    (as :class:`torch.nn.BatchNorm2d`); in evaluation mode the running statistics replace ``mean`` and ``var``.
    SparK's "sparse BatchNorm".

    Args:
        bn: the BatchNorm module (its parameters, buffers, ``eps`` and ``momentum``).
        x: ``(B, C, *spatial)``.
        visible: ``(B, 1, *spatial)`` float, 1 = visible.
    """
    dims = [0, *range(2, x.ndim)]
    shape = (1, -1) + (1,) * (x.ndim - 2)
    xf = x.float()
    use_batch = bn.training or bn.running_mean is None
    if use_batch:
        n = visible.sum() * 1.0
        n_safe = n.clamp(min=1.0)
        mean = (xf * visible).sum(dims) / n_safe
        var = ((xf - mean.view(shape)).square() * visible).sum(dims) / n_safe
        if bn.training and bn.track_running_stats and bn.running_mean is not None:
            with torch.no_grad():
                bn.num_batches_tracked.add_(1)
                factor = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
                unbiased = var * n / (n - 1).clamp(min=1.0)
                bn.running_mean.mul_(1 - factor).add_(mean.detach().to(bn.running_mean.dtype), alpha=factor)
                bn.running_var.mul_(1 - factor).add_(unbiased.detach().to(bn.running_var.dtype), alpha=factor)
    else:
        mean, var = bn.running_mean.float(), bn.running_var.float()
    y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + bn.eps)
    if bn.affine:
        y = y * bn.weight.float().view(shape) + bn.bias.float().view(shape)
    return (y * visible).to(x.dtype)


class _SparseBatchNormMixin:
    """Sparse BatchNorm while a :class:`MaskState` holds a mask, plain BatchNorm otherwise."""

    mask_state: MaskState | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vis = self.mask_state.visible(x.shape[2:]) if self.mask_state is not None else None
        if vis is None:
            return super().forward(x)  # type: ignore[misc]
        return sparse_batch_norm(self, x, vis)  # type: ignore[arg-type]


class SparseBatchNorm2d(_SparseBatchNormMixin, nn.BatchNorm2d):
    """:class:`torch.nn.BatchNorm2d` with the same parameters and buffers, sparse under a mask."""


class SparseBatchNorm3d(_SparseBatchNormMixin, nn.BatchNorm3d):
    """:class:`torch.nn.BatchNorm3d` with the same parameters and buffers, sparse under a mask."""


_SPARSE_BN: dict[type[nn.Module], type[nn.Module]] = {nn.BatchNorm2d: SparseBatchNorm2d,
                                                      nn.BatchNorm3d: SparseBatchNorm3d}


def sparsify(backbone: nn.Module, state: MaskState, stages: Sequence[str] = RESNET_STAGES) -> list[RemovableHandle]:
    """Make ``backbone`` behave as a sparse CNN while ``state`` holds a mask; returns the hook handles.

    Replaces every ``BatchNorm2d/3d`` by its sparse subclass (same state-dict keys and values) and zeroes
    masked positions after every convolution, pooling layer and module named in ``stages``.
    """
    for name, module in list(backbone.named_modules()):
        sparse_cls = _SPARSE_BN.get(type(module))
        if sparse_cls is None or not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        new = sparse_cls(module.num_features, eps=module.eps, momentum=module.momentum, affine=module.affine,
                         track_running_stats=module.track_running_stats,
                         device=module.weight.device if module.affine else None)
        new.load_state_dict(module.state_dict())
        new.mask_state = state
        parent_name, _, child = name.rpartition(".")
        setattr(backbone.get_submodule(parent_name) if parent_name else backbone, child, new)
    return [module.register_forward_hook(state.zero_masked) for name, module in backbone.named_modules()
            if isinstance(module, _ZEROED) or name in stages]
