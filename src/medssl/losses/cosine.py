"""Cosine losses between two row-aligned embeddings (no negatives, no queue).

CASS (Singh et al., "CASS: Cross Architectural Self-Supervision for Medical Image Analysis", arXiv
2206.04170, Eq. 1) makes a CNN's and a ViT's embeddings of the same image agree::

    L = mean_i ( 2 − 2 · cos(a_i, b_i) ) = mean_i ‖â_i − b̂_i‖²,   â = a / ‖a‖

Nothing depends on the other samples of the batch, so the loss needs no gathering under DDP: the mean of the
per-rank losses is the loss of the global batch (equal per-rank batch sizes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["cass_loss"]


def cass_loss(f_cnn: torch.Tensor, f_vit: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """CASS loss ``mean_i (2 − 2 · cos(f_cnn[i], f_vit[i]))`` (Singh et al. 2022, Eq. 1).

    Equal to the mean squared distance of the L2-normalised embeddings. Symmetric: the gradient reaches both
    inputs (no stop-gradient). Computed in float32 even under bf16 autocast.

    Args:
        f_cnn: (N, D) embeddings of the CNN.
        f_vit: (N, D) embeddings of the ViT, row-aligned with ``f_cnn`` (same images).
        eps: guards the normalisation of a zero vector.

    Returns:
        A scalar tensor in ``[0, 4]``.

    Raises:
        ValueError: the inputs are not two ``(N, D)`` tensors of one shape.
    """
    if f_cnn.shape != f_vit.shape or f_cnn.dim() != 2:
        raise ValueError(f"f_cnn and f_vit must both be (N, D); got {tuple(f_cnn.shape)} and {tuple(f_vit.shape)}")
    a = F.normalize(f_cnn.float(), dim=1, eps=eps)
    b = F.normalize(f_vit.float(), dim=1, eps=eps)
    return (2.0 - 2.0 * (a * b).sum(dim=1)).mean()
