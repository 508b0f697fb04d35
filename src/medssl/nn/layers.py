"""Layer factories by spatial dimensions: one place that picks the 2D or the 3D class (as MONAI's factories do).

Every network that runs on images and volumes alike asks here instead of writing ``Conv2d if d == 2 else
Conv3d``::

    conv(3)(in_ch, out_ch, 3, padding=1)          # nn.Conv3d
    make_norm("instance", 2, 64)                  # nn.InstanceNorm2d(64, affine=True)
    pool(2, "max")(3, 2, 1)                       # nn.MaxPool2d
    F.interpolate(x, size, mode=linear_mode(3))   # "trilinear"

``spatial_dims`` is 2 (``(B, C, H, W)``) or 3 (``(B, C, D, H, W)``); anything else is a ``ValueError``.
"""

from __future__ import annotations

import math

from torch import nn

__all__ = [
    "CONV_TYPES",
    "NORMS",
    "POOL_TYPES",
    "POOLS",
    "batch_norm",
    "check_spatial_dims",
    "conv",
    "linear_mode",
    "make_norm",
    "norm",
    "pool",
]

#: every convolution class the factories return (for ``isinstance`` checks)
CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Conv3d)
#: every pooling class :func:`pool` returns
POOL_TYPES: tuple[type[nn.Module], ...] = (nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool2d, nn.AvgPool3d,
                                           nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.AdaptiveAvgPool2d,
                                           nn.AdaptiveAvgPool3d)
#: normalisations :func:`make_norm` builds (``group`` and ``none`` do not depend on ``spatial_dims``)
NORMS = ("batch", "instance", "group", "none")
#: pooling kinds of :func:`pool`
POOLS = ("max", "avg", "adaptive_max", "adaptive_avg")

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_BATCH = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_NORM: dict[str, dict[int, type[nn.Module]]] = {"batch": dict(_BATCH),
                                                "instance": {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}}
_POOL = {
    "max": {2: nn.MaxPool2d, 3: nn.MaxPool3d},
    "avg": {2: nn.AvgPool2d, 3: nn.AvgPool3d},
    "adaptive_max": {2: nn.AdaptiveMaxPool2d, 3: nn.AdaptiveMaxPool3d},
    "adaptive_avg": {2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d},
}


def check_spatial_dims(spatial_dims: int) -> int:
    """``spatial_dims`` itself when it is 2 or 3.

    Raises:
        ValueError: any other value.
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    return spatial_dims


def conv(spatial_dims: int) -> type[nn.Conv2d] | type[nn.Conv3d]:
    """``nn.Conv2d`` or ``nn.Conv3d``."""
    return _CONV[check_spatial_dims(spatial_dims)]


def norm(spatial_dims: int, kind: str = "batch") -> type[nn.Module]:
    """The normalisation class of ``kind`` (``batch`` or ``instance``) for ``spatial_dims``.

    Raises:
        ValueError: another kind (``group`` has no per-dimension class: use :func:`make_norm`).
    """
    if kind not in _NORM:
        raise ValueError(f"norm kind must be one of {', '.join(_NORM)}, got '{kind}'")
    return _NORM[kind][check_spatial_dims(spatial_dims)]


def batch_norm(spatial_dims: int) -> type[nn.BatchNorm2d] | type[nn.BatchNorm3d]:
    """``nn.BatchNorm2d`` or ``nn.BatchNorm3d``."""
    return _BATCH[check_spatial_dims(spatial_dims)]


def make_norm(kind: str, spatial_dims: int, channels: int, *, groups: int = 8) -> nn.Module:
    """A normalisation layer over ``channels`` feature maps.

    Args:
        kind: ``batch`` (``BatchNormNd``), ``instance`` (``InstanceNormNd`` with affine parameters), ``group``
            (``GroupNorm`` with ``gcd(groups, channels)`` groups, so any width works) or ``none`` (identity).
        spatial_dims: 2 or 3.
        channels: feature maps normalised.
        groups: the wanted number of groups of ``group``.

    Raises:
        ValueError: an unknown kind or ``spatial_dims``.
    """
    check_spatial_dims(spatial_dims)
    if kind == "batch":
        return _NORM["batch"][spatial_dims](channels)
    if kind == "instance":
        return _NORM["instance"][spatial_dims](channels, affine=True)
    if kind == "group":
        return nn.GroupNorm(math.gcd(int(groups), int(channels)), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of {', '.join(NORMS)}, got '{kind}'")


def pool(spatial_dims: int, kind: str = "max") -> type[nn.Module]:
    """The pooling class of ``kind`` (``max``, ``avg``, ``adaptive_max``, ``adaptive_avg``) for ``spatial_dims``.

    Raises:
        ValueError: an unknown kind or ``spatial_dims``.
    """
    if kind not in _POOL:
        raise ValueError(f"pool kind must be one of {', '.join(POOLS)}, got '{kind}'")
    return _POOL[kind][check_spatial_dims(spatial_dims)]


def linear_mode(spatial_dims: int) -> str:
    """The ``F.interpolate`` mode of linear interpolation: ``bilinear`` (2D) or ``trilinear`` (3D)."""
    return "bilinear" if check_spatial_dims(spatial_dims) == 2 else "trilinear"
