"""Sliding-window inference on whole 3D volumes (docs/volumes.md).

A 3D encoder pretrained on patches sees, at evaluation, volumes larger than its window. :func:`sliding_logits`
runs a dense model (a segmentation network) window by window with MONAI's ``sliding_window_inference``
(``overlap`` between neighbouring windows, overlapping predictions averaged, a volume smaller than the window
zero-padded); Dice is then computed on the whole volume. :func:`sliding_features` does the same for a feature
extractor: the pooled features of every window, averaged (for a network ending in global average pooling, the
feature of a volume the window covers is its own feature).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["sliding_features", "sliding_logits", "window_starts"]


def _roi(roi_size: int | Sequence[int], spatial_dims: int) -> tuple[int, ...]:
    roi = (int(roi_size),) * spatial_dims if isinstance(roi_size, int) else tuple(int(r) for r in roi_size)
    if len(roi) != spatial_dims or min(roi) < 1:
        raise ValueError(f"roi_size must be {spatial_dims} positive sides, got {roi_size!r}")
    return roi


def _check_overlap(overlap: float) -> None:
    if not 0.0 <= float(overlap) < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap!r}")


@torch.no_grad()
def sliding_logits(model: nn.Module, images: torch.Tensor, roi_size: int | Sequence[int], *, overlap: float = 0.25,
                   sw_batch_size: int = 4, mode: str = "constant") -> torch.Tensor:
    """Dense predictions ``(B, K, *spatial)`` of ``model`` on ``images`` ``(B, C, *spatial)``, window by window.

    Args:
        model: maps ``(b, C, *roi)`` to ``(b, K, *roi)``.
        images: the whole volumes.
        roi_size: window side(s).
        overlap: fraction of a window shared with its neighbour along each axis, in ``[0, 1)``.
        sw_batch_size: windows per forward pass.
        mode: how overlapping windows blend, ``constant`` (mean) or ``gaussian`` (MONAI's modes).
    """
    from monai.inferers import sliding_window_inference

    _check_overlap(overlap)
    roi = _roi(roi_size, images.ndim - 2)
    out = sliding_window_inference(images, roi, sw_batch_size, model, overlap=overlap, mode=mode)
    return out.as_tensor() if hasattr(out, "as_tensor") else out  # type: ignore[union-attr,return-value]


def window_starts(size: int, window: int, overlap: float) -> list[int]:
    """Start offsets of windows of ``window`` covering ``size`` with the given overlap (the last flush with the
    end); ``[0]`` when the window covers the axis."""
    if size <= window:
        return [0]
    step = max(1, int(window * (1.0 - overlap)))
    starts = list(range(0, size - window + 1, step))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


@torch.no_grad()
def sliding_features(encoder: nn.Module, images: torch.Tensor, roi_size: int | Sequence[int], *,
                     overlap: float = 0.25) -> torch.Tensor:
    """Pooled features ``(B, D)`` of ``images`` ``(B, C, *spatial)``: the mean of the encoder's features over the
    windows covering each volume (volumes smaller than a window are zero-padded, centred, to it)."""
    _check_overlap(overlap)
    sd = images.ndim - 2
    roi = _roi(roi_size, sd)
    pad = []
    for n, r in zip(reversed(images.shape[2:]), reversed(roi), strict=True):
        total = max(r - n, 0)
        pad += [total // 2, total - total // 2]
    if any(pad):
        images = torch.nn.functional.pad(images, pad)
    grids = [window_starts(n, r, overlap) for n, r in zip(images.shape[2:], roi, strict=True)]
    total, count = None, 0
    for start in torch.cartesian_prod(*[torch.tensor(g) for g in grids]).reshape(-1, sd).tolist():
        window = images[(slice(None), slice(None), *(slice(s, s + r) for s, r in zip(start, roi, strict=True)))]
        feats = encoder(window)
        total = feats if total is None else total + feats
        count += 1
    assert total is not None
    return total / count
