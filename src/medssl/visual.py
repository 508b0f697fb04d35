"""What a method draws: :class:`VisualPanel`, the one type shared by the methods that draw and the code that
saves the figure (:mod:`medssl.eval.reconstruction`).

A leaf (it imports nothing of medssl), so that drawing code does not import, and register, every method.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["VisualPanel"]


@dataclass
class VisualPanel:
    """One scale of a reconstruction figure (see :meth:`medssl.methods.base.Method.visualize`).

    Attributes:
        scale: label of the scale, e.g. ``"1x"``, ``"2x"``.
        columns: column name -> ``(N, C, *spatial)`` tensor, one row per sample, in display range ``[0, 1]``
            (values outside are clipped; bool masks are fine). Usual columns: ``input`` (what the encoder
            saw, masked), ``mask``, ``reconstruction``, ``target``. 3D volumes are shown by their middle
            depth slice; ``C == 3`` is shown as RGB, otherwise the first channel in grey.
    """

    scale: str
    columns: dict[str, torch.Tensor]
