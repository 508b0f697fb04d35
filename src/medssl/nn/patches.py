"""Patches, token grids and fixed position embeddings, for 2D and 3D (``spatial_dims``) alike.

Shared by every masked-image-modelling method: the masked ViT (MAE, MIRAM) cuts images into the same
patches its patch embedding sees, and a CNN method (cnnmim) can compare predictions patch by patch.

Conventions:

* A patch grid is row-major over ``(D,) H, W``: token ``i`` of a ``(gh, gw)`` grid covers rows
  ``(i // gw) * p`` ... and columns ``(i % gw) * p`` ..., the order timm's ``PatchEmbed`` flattens a
  convolution's output in (and ``Conv3d`` in 3D).
* A flattened patch is ``(*patch, C)``: the pixels of the patch in row-major order, channels last
  (the layout of MAE, He et al. 2022).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "as_patch_size",
    "grid_shape",
    "interpolate_tokens",
    "patchify",
    "sincos_pos_embed",
    "unpatchify",
]


def as_patch_size(patch_size: int | Sequence[int], spatial_dims: int) -> tuple[int, ...]:
    """A patch size as one int per spatial axis.

    Raises:
        ValueError: ``spatial_dims`` not 2 or 3, or a non-positive / wrongly sized patch size.
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    sizes = (int(patch_size),) * spatial_dims if isinstance(patch_size, int) else tuple(int(p) for p in patch_size)
    if len(sizes) != spatial_dims or any(p < 1 for p in sizes):
        raise ValueError(f"patch_size must be a positive int or {spatial_dims} positive ints, got {patch_size!r}")
    return sizes


def grid_shape(image_shape: Sequence[int], patch_size: int | Sequence[int]) -> tuple[int, ...]:
    """The patch grid ``image_shape // patch_size`` per axis.

    Raises:
        ValueError: when an axis is not a multiple of its patch size.
    """
    sizes = as_patch_size(patch_size, len(image_shape))
    if any(n % p for n, p in zip(image_shape, sizes, strict=True)):
        raise ValueError(f"image shape {tuple(image_shape)} is not divisible by the patch size {sizes}")
    return tuple(n // p for n, p in zip(image_shape, sizes, strict=True))


def patchify(x: torch.Tensor, patch_size: int | Sequence[int], spatial_dims: int) -> torch.Tensor:
    """Cut images into flattened non-overlapping patches.

    Args:
        x: ``(B, C, H, W)`` (2D) or ``(B, C, D, H, W)`` (3D).
        patch_size: patch side, one int or one per spatial axis.
        spatial_dims: 2 or 3.

    Returns:
        ``(B, N, prod(patch) * C)`` with ``N`` the number of patches in row-major grid order and each patch
        flattened as ``(*patch, C)``.

    Raises:
        ValueError: wrong rank, or a spatial size that is not a multiple of the patch size.
    """
    p = as_patch_size(patch_size, spatial_dims)
    if x.ndim != spatial_dims + 2:
        raise ValueError(f"expected a {spatial_dims + 2}D tensor (B, C, *spatial), got shape {tuple(x.shape)}")
    b, c = x.shape[:2]
    g = grid_shape(x.shape[2:], p)
    # (B, C, g0, p0, g1, p1[, g2, p2]) -> (B, g0, g1[, g2], p0, p1[, p2], C)
    split = [b, c] + [v for pair in zip(g, p, strict=True) for v in pair]
    x = x.reshape(split)
    sd = spatial_dims
    order = [0] + [2 + 2 * i for i in range(sd)] + [3 + 2 * i for i in range(sd)] + [1]
    return x.permute(order).reshape(b, math.prod(g), math.prod(p) * c)


def unpatchify(
    patches: torch.Tensor, patch_size: int | Sequence[int], grid: Sequence[int], channels: int
) -> torch.Tensor:
    """Inverse of :func:`patchify`.

    Args:
        patches: ``(B, N, prod(patch) * C)``.
        patch_size: patch side, one int or one per spatial axis.
        grid: the patch grid ``(gh, gw)`` or ``(gd, gh, gw)`` (``N = prod(grid)``).
        channels: ``C``.

    Returns:
        ``(B, C, *(grid * patch))`` images.

    Raises:
        ValueError: when the shapes do not agree.
    """
    sd = len(grid)
    p = as_patch_size(patch_size, sd)
    b, n, d = patches.shape
    if n != math.prod(grid) or d != math.prod(p) * channels:
        raise ValueError(
            f"patches of shape {tuple(patches.shape)} do not fit grid {tuple(grid)}, patch {p} and {channels} channels"
        )
    x = patches.reshape([b, *grid, *p, channels])
    # (B, g..., p..., C) -> (B, C, g0, p0, g1, p1[, g2, p2])
    order = [0, 2 * sd + 1] + [v for i in range(sd) for v in (1 + i, 1 + sd + i)]
    x = x.permute(order)
    return x.reshape([b, channels] + [gi * pi for gi, pi in zip(grid, p, strict=True)])


def _sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """``[sin(pos * ω_k), cos(pos * ω_k)]`` with ``ω_k = 10000^(-k / (dim/2))``, ``k < dim/2``
    (Vaswani et al. 2017)."""
    omega = 1.0 / 10000.0 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = positions.reshape(-1, 1).astype(np.float64) * omega.reshape(1, -1)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_pos_embed(dim: int, grid: Sequence[int], num_prefix_tokens: int = 0) -> torch.Tensor:
    """Fixed sine-cosine position embeddings of a 2D or 3D token grid (MAE, He et al. 2022; 3D by extension).

    The width is split evenly between the spatial axes, ``2 * floor(dim / (2 * sd))`` channels per axis in
    axis order ``(D,) H, W``, each holding the 1D embedding of that axis' integer coordinate; channels left
    over when ``dim`` is not a multiple of ``2 * sd`` are zero. Prefix tokens (class token) get zeros.

    Args:
        dim: embedding width.
        grid: ``(gh, gw)`` or ``(gd, gh, gw)``.
        num_prefix_tokens: zero rows prepended (1 for a class token).

    Returns:
        float32 ``(1, num_prefix_tokens + prod(grid), dim)``.
    """
    sd = len(grid)
    if sd not in (1, 2, 3):
        raise ValueError(f"grid must have 1 to 3 axes, got {tuple(grid)}")
    per_axis = 2 * (dim // (2 * sd))
    if per_axis == 0:
        raise ValueError(f"embedding width {dim} is too small for a {sd}D position embedding")
    coords = np.meshgrid(*[np.arange(g) for g in grid], indexing="ij")
    parts = [_sincos_1d(per_axis, c.reshape(-1)) for c in coords]
    emb = np.concatenate(parts, axis=1)
    if emb.shape[1] < dim:
        emb = np.concatenate([emb, np.zeros((emb.shape[0], dim - emb.shape[1]))], axis=1)
    if num_prefix_tokens:
        emb = np.concatenate([np.zeros((num_prefix_tokens, dim)), emb], axis=0)
    return torch.from_numpy(emb).float().unsqueeze(0)


def interpolate_tokens(tokens: torch.Tensor, grid: Sequence[int], factor: int) -> torch.Tensor:
    """Token interpolation of MIRAM (Vo et al. 2025): repeat every token of a grid ``factor`` times per axis.

    Each token of a ``(gh, gw)`` grid becomes a ``factor x factor`` block of identical tokens in a
    ``(factor * gh, factor * gw)`` grid (``factor³`` in 3D), kept in row-major order, so that token ``j`` of
    the fine grid lies inside the area of the coarse token it came from.

    Args:
        tokens: ``(B, prod(grid), D)`` (no prefix tokens).
        grid: the coarse grid.
        factor: repetition per axis (2 for the 2x decoder).

    Returns:
        ``(B, prod(grid) * factor**sd, D)``.
    """
    b, n, d = tokens.shape
    if n != math.prod(grid):
        raise ValueError(f"{n} tokens do not fill a grid {tuple(grid)}")
    x = tokens.reshape(b, *grid, d)
    for axis in range(len(grid)):
        x = x.repeat_interleave(factor, dim=1 + axis)
    return x.reshape(b, n * factor ** len(grid), d)
