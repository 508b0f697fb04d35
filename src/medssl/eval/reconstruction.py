"""Reconstruction figures of masked image modelling runs: a PNG grid, rows = samples.

Any method can return :class:`~medssl.visual.VisualPanel` objects from
:meth:`~medssl.methods.base.Method.visualize`; the trainer passes them to :func:`save_reconstruction_grid`,
which lays the panels side by side (per scale: input, mask, reconstruction, target), one row per sample,
and shows 3D volumes by their middle depth slice. Drawn with matplotlib's Agg canvas (no display, no
global backend switch).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from medssl.visual import VisualPanel

__all__ = ["VisualPanel", "middle_slice", "panel_image", "save_reconstruction_grid"]

#: Rows drawn at most (the first samples of the batch).
MAX_ROWS = 8


def middle_slice(x: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W)`` from ``(N, C, H, W)`` (unchanged) or ``(N, C, D, H, W)`` (the slice ``D // 2``)."""
    if x.ndim == 4:
        return x
    if x.ndim == 5:
        return x[:, :, x.shape[2] // 2]
    raise ValueError(f"expected (N, C, H, W) or (N, C, D, H, W), got shape {tuple(x.shape)}")


def panel_image(x: torch.Tensor) -> np.ndarray:
    """Display arrays of one column: ``(N, H, W)`` grey or ``(N, H, W, 3)`` RGB, float in ``[0, 1]``."""
    x = middle_slice(x.detach().float().cpu()).clamp(0.0, 1.0)
    if x.shape[1] == 3:
        return x.permute(0, 2, 3, 1).numpy()
    return x[:, 0].numpy()


def save_reconstruction_grid(
    panels: Sequence[VisualPanel], path: str | Path, *, title: str | None = None, max_rows: int = MAX_ROWS
) -> Path:
    """Write panels as one PNG grid: rows = samples, columns = each panel's columns, panel after panel.

    Args:
        panels: one per scale; every column holds ``(N, C, *spatial)`` values in ``[0, 1]``.
        path: output ``.png`` (parent folders are created; written to a temporary file, then renamed).
        title: figure title (e.g. the step).
        max_rows: at most this many samples (the first ones).

    Returns:
        The path written.

    Raises:
        ValueError: no panels, an empty panel, or columns with different numbers of samples.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns: list[tuple[str, np.ndarray]] = []
    for panel in panels:
        if not panel.columns:
            raise ValueError(f"panel '{panel.scale}' has no columns")
        for name, x in panel.columns.items():
            columns.append((f"{name} ({panel.scale})" if len(panels) > 1 else name, panel_image(x)))
    if not columns:
        raise ValueError("nothing to draw: no panels")
    counts = {c.shape[0] for _, c in columns}
    if len(counts) != 1:
        raise ValueError(f"all columns must hold the same number of samples, got {sorted(counts)}")
    rows = min(counts.pop(), max_rows)
    if rows == 0:
        raise ValueError("nothing to draw: the panels hold no samples")
    ncols = len(columns)
    fig = Figure(figsize=(1.6 * ncols, 1.6 * rows + (0.4 if title else 0.2)), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, ncols, squeeze=False)
    for j, (name, images) in enumerate(columns):
        for i in range(rows):
            ax = axes[i][j]
            img = images[i]
            ax.imshow(img, cmap=None if img.ndim == 3 else "gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        fig.savefig(f, format="png")
    tmp.replace(path)
    return path
