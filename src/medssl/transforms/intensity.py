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
