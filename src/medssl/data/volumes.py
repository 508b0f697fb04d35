"""One orientation and physical spacing for every 3D format (see docs/volumes.md).

**The canonical layout.** Every volume medssl reads — NIfTI, MHA / MHD / NRRD, a DICOM series — is brought to
the closest RAS+ orientation (the first voxel axis points to the patient's Right, the second Anterior, the third
Superior; nibabel's :func:`~nibabel.orientations.io_orientation`, the same choice as MONAI's
``Orientation("RAS")``), then stored with its axes reversed: arrays are ``(C, D, H, W) = (C, S, A, R)``, the
spacing ``(z, y, x)`` is in that order too, and the affine kept with the volume maps the ``(d, h, w)`` voxel
index to RAS millimetres. A volume loaded the MONAI way (``LoadImage`` + ``EnsureChannelFirst`` +
``Orientation("RAS")``) is the same array with its three spatial axes reversed: ``monai = medssl.permute(0, 3,
2, 1)``. No voxel is interpolated to reorient (axes are only flipped and permuted); an oblique acquisition keeps
its closest orthogonal orientation and the full affine.

Each format gives an affine in its own world: NIfTI's is already RAS; ITK images (MHA / NRRD) and DICOM
describe LPS (DICOM's patient system), turned into RAS by negating the first two world rows.

**Resampling.** :func:`resample` brings a ``(C, D, H, W)`` volume to a target spacing with trilinear
(images) or nearest-neighbour (masks) interpolation on MONAI ``Spacing``'s grid: the first voxel centre stays
where it is, the output has ``round((n - 1) * old / new) + 1`` voxels per axis (the same physical extent
between the first and last voxel centres, to the nearest voxel), and points past the last input voxel take its
value (``padding_mode="border"``). Trilinear interpolation is separable: it runs as one 1D interpolation per
axis, which needs no ``(D, H, W, 3)`` sampling grid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from medssl.errors import DataError

__all__ = ["AXIS_ORDER", "LPS_TO_RAS", "canonical", "orientation_code", "resample", "resampled_shape"]

#: The axis order of medssl's 3D arrays, recorded in exported encoders (``axis_order`` metadata).
AXIS_ORDER = "SAR"
#: ITK / DICOM world (LPS) → NIfTI / MONAI world (RAS).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def orientation_code(affine: np.ndarray) -> str:
    """The three-letter code (``RAS``, ``LPS``, ``LIP`` ...) of the voxel axes ``(i, j, k)`` of an RAS affine:
    the direction in which each index grows (nibabel's convention, the same as MONAI's)."""
    import nibabel.orientations as nio

    return "".join(nio.ornt2axcodes(nio.io_orientation(np.asarray(affine, dtype=float))))


def canonical(data: np.ndarray, affine: np.ndarray, source: Any) -> tuple[np.ndarray, np.ndarray, str]:
    """A volume in voxel order ``(i, j, k[, C])`` with its RAS ``affine`` → the canonical layout.

    Args:
        data: ``(I, J, K)`` or ``(I, J, K, C)`` array (NIfTI's own order).
        affine: 4x4 voxel index → RAS mm.
        source: named in errors.

    Returns:
        ``(array, affine, code)``: the array as ``(C, S, A, R)`` (channels first), the 4x4 affine mapping its
        ``(d, h, w)`` index to RAS mm, and the file's own orientation code.

    Raises:
        DataError: a singular or non-finite affine.
    """
    import nibabel.orientations as nio

    affine = np.asarray(affine, dtype=float)
    if affine.shape != (4, 4) or not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise DataError(f"{source}: invalid orientation (affine / direction matrix is singular or not finite)")
    ornt = nio.io_orientation(affine)
    code = "".join(nio.ornt2axcodes(ornt))
    transform = nio.ornt_transform(ornt, nio.axcodes2ornt("RAS"))
    ras = nio.apply_orientation(data, transform)
    ras_affine = affine @ nio.inv_ornt_aff(transform, data.shape[:3])
    if ras.ndim == 3:
        ras = ras[..., None]
    array = np.ascontiguousarray(np.transpose(ras, (3, 2, 1, 0)))  # (R, A, S, C) -> (C, S, A, R)
    reverse = np.zeros((4, 4))
    reverse[0, 2] = reverse[1, 1] = reverse[2, 0] = reverse[3, 3] = 1.0  # (d, h, w) -> (i, j, k) = (w, h, d)
    return array, ras_affine @ reverse, code


def spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    """The voxel spacing (column norms of the affine), in the affine's index order."""
    a = np.asarray(affine, dtype=float)[:3, :3]
    return tuple(float(v) for v in np.sqrt((a * a).sum(axis=0)))  # type: ignore[return-value]


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> tuple[int, ...]:
    """The spatial shape :func:`resample` gives: ``round((n - 1) * old / new) + 1`` per axis."""
    # np.round of (extent + 1), half to even, exactly as MONAI's compute_shape_offset
    return tuple(int(np.round((int(n) - 1) * float(s) / float(t) + 1.0))
                 for n, s, t in zip(shape, spacing, target, strict=True))


def _axis(x: torch.Tensor, dim: int, n_out: int, step: float, nearest: bool) -> torch.Tensor:
    """Resample ``x`` along ``dim`` at input coordinates ``0, step, 2 step, ...`` (``n_out`` of them)."""
    n_in = x.shape[dim]
    if n_out == n_in and abs(step - 1.0) < 1e-12:
        return x
    pos = torch.arange(n_out, dtype=torch.float64) * step
    if nearest:
        idx = torch.floor(pos + 0.5).clamp_(0, n_in - 1).long()
        return x.index_select(dim, idx)
    lo = torch.floor(pos).clamp_(0, n_in - 1)
    frac = (pos - lo).clamp_(0.0, 1.0)
    lo_i = lo.long()
    hi_i = (lo_i + 1).clamp_(max=n_in - 1)
    frac = torch.where(lo_i == hi_i, torch.zeros_like(frac), frac)
    shape = [1] * x.ndim
    shape[dim] = n_out
    w = frac.to(x.dtype).reshape(shape)
    a, b = x.index_select(dim, lo_i), x.index_select(dim, hi_i)
    return a + (b - a) * w


def resample(array: np.ndarray | torch.Tensor, spacing: Sequence[float], target: Sequence[float], *,
             mode: str = "linear") -> torch.Tensor:
    """Resample a ``(C, D, H, W)`` volume from ``spacing`` to ``target`` (mm, both in ``(z, y, x)`` order).

    Args:
        array: the volume (any float / int dtype; masks keep theirs).
        spacing: its voxel spacing.
        target: the spacing wanted.
        mode: ``linear`` (trilinear, for images) or ``nearest`` (for masks / labels).

    Returns:
        The resampled volume as a tensor (float32 for ``linear``), on the grid described in the module docstring.
    """
    if mode not in ("linear", "nearest"):
        raise ValueError(f"mode must be linear or nearest, got {mode!r}")
    x = torch.as_tensor(np.ascontiguousarray(array)) if isinstance(array, np.ndarray) else array
    if x.ndim != 4:
        raise ValueError(f"expected a (C, D, H, W) volume, got shape {tuple(x.shape)}")
    nearest = mode == "nearest"
    if not nearest:
        x = x.to(torch.float32)
    out_shape = resampled_shape(x.shape[1:], spacing, target)
    for axis in range(3):
        step = float(target[axis]) / float(spacing[axis])
        if not math.isfinite(step) or step <= 0:
            raise ValueError(f"invalid spacing {tuple(spacing)} -> {tuple(target)}")
        x = _axis(x, axis + 1, out_shape[axis], step, nearest)
    return x.contiguous()
