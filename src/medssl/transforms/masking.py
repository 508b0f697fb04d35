"""Mask generators for masked image modelling, shared by ViTs (MAE, MIRAM) and CNNs (cnnmim), 2D and 3D.

A mask is drawn on a *grid of mask units*: one unit is a ``patch_size`` square (2D) or cube (3D) of
pixels / voxels, which for a ViT is one token. :func:`mask_grid` returns ``(B, *grid_shape)`` booleans,
``True`` = masked; :func:`upsample_mask` brings it to pixel / voxel resolution and :func:`resize_mask` to
any feature-map resolution.

Strategies (``MaskConfig.strategy``):

* ``random`` — ``round(ratio * n)`` units chosen uniformly at random per sample (MAE, He et al. 2022;
  random cubes in 3D). The count is exact.
* ``block`` — contiguous rectangular blocks (cuboids in 3D) placed at random until the target count is
  reached, in the spirit of BEiT's block-wise masking (Bao et al. 2022): each block has a random area
  (volume) between ``min(rem, max(1, round(0.08 n)))`` and the remaining count ``rem``, and a random aspect
  ratio (log-uniform per axis, extreme ratio 1:3.3 as in BEiT); a block is accepted when the units it adds do
  not overshoot the target. Unlike BEiT, a block may start partly outside the grid and is clipped, so
  every unit is about equally likely to be masked (placing blocks inside the grid masks the centre about
  4x as often as the corners). After 100 rejected draws the remainder is filled with random units (rare).
  The count is exact.
* ``center`` — a central disc (2D) / ball (3D) in the grid's normalised coordinates (an ellipse /
  ellipsoid when the grid is not square / cubic). Units are masked by increasing distance from the centre,
  whole rings of equidistant units at a time (so the mask stays symmetric and exactly centred), choosing
  the ring boundary whose count is nearest to ``round(ratio * n)`` but never the whole grid: the count is
  off by at most half the units of one ring (14x14 grid: at most ±8 units, 4 %; 16x16: ±8, 3 %; 8x8x8:
  ±36, 7 %; coarse grids such as 2x2 can only mask 0 or 4 units, so use a smaller ``patch_size``).
  The same for every sample; no randomness.
* ``slice`` — whole slices along depth (3D: axis ``D`` of ``(D, H, W)``), whole rows in 2D (axis ``H``):
  ``round(ratio * g0)`` of the ``g0`` slices at random, so the ratio is off by at most ``1 / (2 g0)``.
* ``tube`` — 3D only: one random 2D pattern of exactly ``round(ratio * gh * gw)`` units repeated on every
  slice (tube masking, as in VideoMAE, Tong et al. 2022). Ratio off by at most ``1 / (2 gh gw)``.

Every strategy masks the same number of units in every sample of a batch (:func:`num_masked`), so a ViT
can drop a fixed number of tokens per sample whatever the strategy. No strategy masks a whole grid: where
``round(ratio * n)`` would be ``n`` (tiny grids), one unit (slice, tube plane) fewer is masked.

Draws come from ``generator`` when given (a CPU or device generator), else from the global CPU RNG, and
the mask is then moved to ``device``: the same seed gives the same masks on any device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from medssl.errors import ConfigError

__all__ = [
    "MASK_STRATEGIES",
    "MaskConfig",
    "grid_shape_for",
    "mask_grid",
    "num_masked",
    "resize_mask",
    "upsample_mask",
]

#: The strategies :func:`mask_grid` knows.
MASK_STRATEGIES: tuple[str, ...] = ("random", "block", "center", "slice", "tube")

_BLOCK_MIN_FRACTION = 16 / 196  # BEiT: at least 16 of 196 patches per block
_BLOCK_LOG_ASPECT = math.log(1 / 0.3)  # BEiT: aspect ratio in [0.3, 1/0.3]
_BLOCK_MAX_REJECTS = 100


@dataclass
class MaskConfig:
    """How masks are drawn.

    Attributes:
        strategy: one of :data:`MASK_STRATEGIES` (``random``, ``block``, ``center``, ``slice``, ``tube``).
        ratio: fraction of mask units masked, in ``[0, 1)``.
        patch_size: side of one mask unit in pixels / voxels.

    Raises:
        ConfigError: unknown strategy, ratio outside ``[0, 1)`` or a non-positive patch size.
    """

    strategy: str = "random"
    ratio: float = 0.75
    patch_size: int = 16

    def __post_init__(self) -> None:
        if self.strategy not in MASK_STRATEGIES:
            raise ConfigError(f"mask strategy must be one of {', '.join(MASK_STRATEGIES)}, got '{self.strategy}'")
        self.ratio = float(self.ratio)
        if not 0.0 <= self.ratio < 1.0:
            raise ConfigError(f"mask ratio must be in [0, 1), got {self.ratio}")
        if int(self.patch_size) != self.patch_size or int(self.patch_size) < 1:
            raise ConfigError(f"mask patch_size must be a positive integer, got {self.patch_size}")
        self.patch_size = int(self.patch_size)


def grid_shape_for(image_shape: Sequence[int], patch_size: int | Sequence[int]) -> tuple[int, ...]:
    """The mask-unit grid of an image: ``image_shape // patch_size`` per spatial axis.

    Args:
        image_shape: spatial shape ``(H, W)`` or ``(D, H, W)``.
        patch_size: one size for all axes or one per axis.

    Raises:
        ConfigError: when an axis is not a multiple of its patch size.
    """
    sizes = _per_axis(patch_size, len(image_shape))
    for n, p in zip(image_shape, sizes, strict=True):
        if n % p:
            raise ConfigError(
                f"image shape {tuple(image_shape)} is not divisible by the mask patch size {tuple(sizes)}; "
                "choose an image size that is a multiple of the patch size"
            )
    return tuple(n // p for n, p in zip(image_shape, sizes, strict=True))


def num_masked(cfg: MaskConfig, grid_shape: Sequence[int]) -> int:
    """Masked units per sample that :func:`mask_grid` returns for this config and grid (same for all samples)."""
    grid = tuple(int(g) for g in grid_shape)
    _check_grid(cfg, grid)
    n = math.prod(grid)
    if cfg.strategy in ("random", "block"):
        return _target(cfg.ratio, n)
    if cfg.strategy == "slice":
        return _target(cfg.ratio, grid[0]) * (n // grid[0])
    if cfg.strategy == "tube":
        plane = grid[1] * grid[2]
        return _target(cfg.ratio, plane) * grid[0]
    return int(_center_mask(grid, cfg.ratio).sum())


def mask_grid(
    cfg: MaskConfig,
    batch_size: int,
    grid_shape: Sequence[int],
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw one mask per sample on a grid of mask units.

    Args:
        cfg: strategy and ratio (``cfg.patch_size`` is not used here: the grid is given).
        batch_size: number of masks.
        grid_shape: ``(gh, gw)`` (2D) or ``(gd, gh, gw)`` (3D).
        generator: RNG for reproducible masks (CPU or device); ``None`` = the global CPU RNG.
        device: where the mask is returned (default CPU).

    Returns:
        Bool tensor ``(batch_size, *grid_shape)``, ``True`` = masked, with :func:`num_masked` masked units
        in every sample.

    Raises:
        ConfigError: a grid that is not 2D / 3D, or ``tube`` on a 2D grid.
    """
    grid = tuple(int(g) for g in grid_shape)
    _check_grid(cfg, grid)
    b = int(batch_size)
    n = math.prod(grid)
    if cfg.strategy == "random":
        out = _random_exact(b, n, _target(cfg.ratio, n), generator).view(b, *grid)
    elif cfg.strategy == "slice":
        rows = _random_exact(b, grid[0], _target(cfg.ratio, grid[0]), generator)
        out = rows.view(b, grid[0], *([1] * (len(grid) - 1))).expand(b, *grid)
    elif cfg.strategy == "tube":
        plane = grid[1] * grid[2]
        pattern = _random_exact(b, plane, _target(cfg.ratio, plane), generator).view(b, 1, grid[1], grid[2])
        out = pattern.expand(b, *grid)
    elif cfg.strategy == "center":
        out = torch.from_numpy(_center_mask(grid, cfg.ratio)).unsqueeze(0).expand(b, *grid)
    else:
        out = torch.from_numpy(np.stack([_block_mask(grid, cfg.ratio, generator) for _ in range(b)]))
        out = out.view(b, *grid)
    return out.contiguous().to(device=device if device is not None else "cpu")


def upsample_mask(mask: torch.Tensor, patch_size: int | Sequence[int]) -> torch.Tensor:
    """Bring a unit-grid mask to pixel / voxel resolution.

    Args:
        mask: ``(B, *grid)`` bool (2D or 3D grid).
        patch_size: size of one unit, one int or one per spatial axis.

    Returns:
        ``(B, 1, *(grid * patch_size))`` bool, each unit repeated over its patch.
    """
    sd = mask.ndim - 1
    if sd not in (2, 3):
        raise ValueError(f"mask must be (B, gh, gw) or (B, gd, gh, gw), got shape {tuple(mask.shape)}")
    out = mask
    for axis, p in enumerate(_per_axis(patch_size, sd)):
        out = out.repeat_interleave(p, dim=axis + 1)
    return out.unsqueeze(1)


def resize_mask(mask: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """A mask at another resolution: a position is masked only when everything it covers is masked.

    Equivalently, the visible map is max-pooled over the region each output position covers (adaptive
    pooling, so any output shape works, finer or coarser; nearest repetition when the shape is a multiple).
    This is the rule a CNN needs to keep masked positions empty at every stage (SparK, Tian et al. 2023).

    Args:
        mask: ``(B, 1, *spatial)`` or ``(B, *spatial)`` bool, ``True`` = masked.
        shape: target spatial shape (2 or 3 ints).

    Returns:
        ``(B, 1, *shape)`` bool.
    """
    sd = len(shape)
    if mask.ndim == sd + 1:
        mask = mask.unsqueeze(1)
    if mask.ndim != sd + 2:
        raise ValueError(f"cannot resize a mask of shape {tuple(mask.shape)} to spatial shape {tuple(shape)}")
    if tuple(mask.shape[2:]) == tuple(shape):
        return mask
    visible = (~mask).float()
    pool = F.adaptive_max_pool2d if sd == 2 else F.adaptive_max_pool3d
    return pool(visible, tuple(int(s) for s in shape)) < 0.5


# -- helpers ----------------------------------------------------------------------------------------------
def _per_axis(size: int | Sequence[int], sd: int) -> tuple[int, ...]:
    sizes = (int(size),) * sd if isinstance(size, int) else tuple(int(s) for s in size)
    if len(sizes) != sd or any(s < 1 for s in sizes):
        raise ValueError(f"patch size must be a positive int or {sd} positive ints, got {size!r}")
    return sizes


def _check_grid(cfg: MaskConfig, grid: tuple[int, ...]) -> None:
    if len(grid) not in (2, 3) or any(g < 1 for g in grid):
        raise ConfigError(f"mask grid must be 2 or 3 positive sizes, got {grid}")
    if cfg.strategy == "tube" and len(grid) != 3:
        raise ConfigError("mask strategy 'tube' needs 3D data (tubes run through depth); use 'random' or 'block' in 2D")


def _target(ratio: float, n: int) -> int:
    """``round(ratio * n)`` units, but never all ``n`` (a ratio < 1 always leaves something visible)."""
    return max(0, min(int(round(ratio * n)), n - 1))


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    if generator is None:
        return torch.rand(shape)
    return torch.rand(shape, generator=generator, device=generator.device).cpu()


def _random_exact(b: int, n: int, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """``(b, n)`` bool with exactly ``k`` True per row, uniformly at random (rank of uniform noise < k)."""
    noise = _uniform((b, n), generator)
    rank = noise.argsort(dim=1).argsort(dim=1)
    return rank < k


def _center_mask(grid: tuple[int, ...], ratio: float) -> np.ndarray:
    """The central disc / ball of whole equidistant rings whose size is nearest ``round(ratio * n)``."""
    n = math.prod(grid)
    k = _target(ratio, n)
    coords = np.meshgrid(*[(np.arange(g) + 0.5) / g - 0.5 for g in grid], indexing="ij")
    dist = np.round(np.sqrt(sum(c**2 for c in coords)), 9)
    levels, counts = np.unique(dist, return_counts=True)
    cum = np.concatenate([[0], np.cumsum(counts)])
    best = int(np.argmin(np.abs(cum - k)))  # number of whole rings; ties -> fewer rings
    if cum[best] == n and k < n:
        best -= 1  # never mask everything
    if best == 0:
        return np.zeros(grid, dtype=bool)
    return dist <= levels[best - 1]


def _block_mask(grid: tuple[int, ...], ratio: float, generator: torch.Generator | None) -> np.ndarray:
    """One block-wise mask with exactly ``round(ratio * n)`` units (see the module docstring)."""
    sd = len(grid)
    n = math.prod(grid)
    k = _target(ratio, n)
    mask = np.zeros(grid, dtype=bool)
    count, rejects = 0, 0
    min_area = max(1, int(round(_BLOCK_MIN_FRACTION * n)))
    draws = _uniform((64, 2 * sd + 1), generator).numpy().astype(np.float64)
    used = 0
    while count < k and rejects < _BLOCK_MAX_REJECTS:
        if used == draws.shape[0]:
            draws, used = _uniform((64, 2 * sd + 1), generator).numpy().astype(np.float64), 0
        u = draws[used]
        used += 1
        rem = k - count
        lo = min(min_area, rem)
        area = lo + (rem - lo) * u[0]
        log_aspect = (2 * u[1 : 1 + sd] - 1) * (_BLOCK_LOG_ASPECT / 2)
        log_aspect -= log_aspect.mean()
        side = area ** (1 / sd)
        sides = [min(g, max(1, int(round(side * math.exp(a))))) for g, a in zip(grid, log_aspect, strict=True)]
        # Start anywhere the block still overlaps the grid, then clip: every unit equally likely to be hit.
        starts = [int(v * (g + s - 1)) - (s - 1) for v, g, s in zip(u[1 + sd :], grid, sides, strict=True)]
        region = tuple(slice(max(s0, 0), s0 + s) for s0, s in zip(starts, sides, strict=True))
        new = int((~mask[region]).sum())
        if 0 < new <= rem:
            mask[region] = True
            count += new
        else:
            rejects += 1
    if count < k:  # rare fallback: random free units
        free = np.flatnonzero(~mask.ravel())
        order = _uniform((free.size,), generator).argsort().numpy()
        mask.ravel()[free[order[: k - count]]] = True
    return mask
