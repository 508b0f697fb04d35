"""Intensity normalisation shared by training views, evaluation and exported encoders.

Datasets yield float images in ``[0, 1]`` (after per-modality windowing / clipping). Models see
``normalize(x) = (x - 0.5) / 0.5``, i.e. values in ``[-1, 1]``. Exported encoders record this in their
metadata so users reproduce the same preprocessing.
"""

from __future__ import annotations

import torch

MEAN = 0.5
STD = 0.5


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Map a ``[0, 1]`` image batch to the range the encoders are trained on."""
    return (x - MEAN) / STD


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize`: ``x * STD + MEAN``, the ``[0, 1]`` range of the input (not clamped)."""
    return x * STD + MEAN


def _per_sample(values: torch.Tensor | float, images: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar or ``(B,)`` tensor of per-sample values against ``(B, C, *spatial)`` images."""
    v = torch.as_tensor(values, dtype=images.dtype, device=images.device)
    if v.ndim == 0:
        return v
    if v.shape != (images.shape[0],):
        raise ValueError(f"per-sample values must have shape ({images.shape[0]},), got {tuple(v.shape)}")
    return v.view(-1, *([1] * (images.ndim - 1)))


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """Scale each sample's intensities by a brightness factor and clamp to ``[0, 1]``.

    Multiplicative, as torchvision's ``ColorJitter(brightness=b)`` (factor ``~ U(1 - b, 1 + b)``): an additive
    shift of the same size pushes low-contrast medical images (mean ≈ 0.5, std ≈ 0.15) into clipping and
    destroys the content the views must share; scaling keeps black at black.

    Args:
        images: ``(B, C, *spatial)`` images in ``[0, 1]``.
        factor: Scalar or ``(B,)`` factors (``1`` is the identity).

    Returns:
        ``clamp(images * factor, 0, 1)``.
    """
    return (images * _per_sample(factor, images)).clamp(0.0, 1.0)


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """Scale each sample about its own mean intensity and clamp to ``[0, 1]``.

    The mean is taken over all channels and spatial positions of the sample, so every channel of an RGB
    image gets the same map (no colour change).

    Args:
        images: ``(B, C, *spatial)`` images in ``[0, 1]``.
        factor: Scalar or ``(B,)`` contrast factors (``1`` is the identity).

    Returns:
        ``clamp(mean + factor * (images - mean), 0, 1)``.
    """
    mean = images.mean(dim=tuple(range(1, images.ndim)), keepdim=True)
    return (mean + _per_sample(factor, images) * (images - mean)).clamp(0.0, 1.0)


def adjust_gamma(images: torch.Tensor, gamma: torch.Tensor | float) -> torch.Tensor:
    """Per-sample gamma curve ``x ** gamma`` on images clamped to ``[0, 1]``.

    Args:
        images: ``(B, C, *spatial)`` images (clamped to ``[0, 1]`` first).
        gamma: Scalar or ``(B,)`` positive exponents (``1`` is the identity; ``< 1`` brightens).

    Returns:
        ``clamp(images, 0, 1) ** gamma``, in ``[0, 1]``.
    """
    return images.clamp(0.0, 1.0) ** _per_sample(gamma, images)
