"""Sigmoid focal loss with class weights, for fine-tuning on imbalanced (multi-label) medical labels.

Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017. For a logit ``x``, ``p = σ(x)`` and a target
``t ∈ [0, 1]``::

    p_t = p·t + (1 − p)·(1 − t)
    α_t = α·t + (1 − α)·(1 − t)
    FL  = −α_t · (1 − p_t)^γ · log(p_t)        (log p_t written as −BCE-with-logits, for stability)

CASS (Singh et al. 2022) fine-tuned with this loss plus per-class weights on its imbalanced autoimmune
histopathology labels; here each class column ``c`` is additionally multiplied by ``w_c``. ``γ = 0``,
``α = None`` and unit weights give plain binary cross-entropy. :func:`balanced_class_weights` gives the usual
``n / (C · n_c)`` weights from training labels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medssl.errors import ConfigError, DataError

REDUCTIONS = ("mean", "sum", "none")


def _targets_like(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Float targets shaped like ``logits``: integer class indices ``(N,)`` become one-hot ``(N, C)``."""
    if not targets.is_floating_point() and targets.dim() == logits.dim() - 1 and logits.dim() == 2:
        n_cls = logits.shape[1]
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= n_cls):
            raise DataError(f"class indices must lie in [0, {n_cls - 1}], got [{int(targets.min())}, "
                            f"{int(targets.max())}]")
        return F.one_hot(targets.long(), n_cls).to(logits.dtype)
    if targets.shape != logits.shape:
        raise DataError(f"targets of shape {tuple(targets.shape)} do not fit logits of shape {tuple(logits.shape)}; "
                        "give (N, C) multi-hot / soft targets or (N,) integer class indices")
    return targets.to(logits.dtype)


def sigmoid_focal_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    gamma: float = 2.0,
    alpha: float | None = 0.25,
    class_weights: torch.Tensor | Sequence[float] | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al. 2017) with optional per-class weights.

    Args:
        logits: ``(N, C)`` (or any shape, for binary targets of the same shape) raw scores.
        targets: same shape as ``logits`` with values in ``[0, 1]`` (multi-hot, soft labels), or ``(N,)``
            integer class indices for ``(N, C)`` logits (one-vs-rest, turned into one-hot).
        gamma: focusing exponent ``γ ≥ 0`` (2 in the paper; 0 = no focusing).
        alpha: positive-class weight ``α ∈ [0, 1]`` (negatives get ``1 − α``; 0.25 in the paper), or
            ``None`` for no α-balancing.
        class_weights: ``(C,)`` non-negative weights multiplying each class column (the last dimension).
        reduction: ``mean`` (over all elements, as torchvision's ``sigmoid_focal_loss``), ``sum`` or ``none``.

    Returns:
        The reduced loss, or the element-wise loss (shape of ``logits``) for ``reduction="none"``.

    Raises:
        ConfigError: invalid ``gamma``, ``alpha``, ``class_weights`` or ``reduction``.
        DataError: targets that do not fit the logits.
    """
    if gamma < 0:
        raise ConfigError(f"focal loss: gamma must be >= 0, got {gamma}")
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"focal loss: alpha must be in [0, 1] or None, got {alpha}")
    if reduction not in REDUCTIONS:
        raise ConfigError(f"focal loss: reduction must be one of {REDUCTIONS}, got '{reduction}'")
    x = logits if logits.dtype == torch.float64 else logits.float()  # float32 at least, also under autocast
    t = _targets_like(x, targets)
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")  # = −log p_t
    p = torch.sigmoid(x)
    p_t = p * t + (1.0 - p) * (1.0 - t)
    loss = ce * (1.0 - p_t).pow(gamma) if gamma != 0 else ce
    if alpha is not None:
        loss = (alpha * t + (1.0 - alpha) * (1.0 - t)) * loss
    if class_weights is not None:
        w = torch.as_tensor(class_weights, dtype=loss.dtype, device=loss.device)
        if w.dim() != 1 or loss.dim() == 0 or w.shape[0] != loss.shape[-1]:
            n_cls = loss.shape[-1] if loss.dim() else 1
            raise ConfigError(f"focal loss: class_weights must have one value per class ({n_cls}), "
                              f"got shape {tuple(w.shape)}")
        if bool((w < 0).any()) or not bool(torch.isfinite(w).all()):
            raise ConfigError("focal loss: class_weights must be finite and >= 0")
        loss = loss * w
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


class SigmoidFocalLoss(nn.Module):
    """Module form of :func:`sigmoid_focal_loss`; the class weights are a buffer (they follow ``.to(device)``)."""

    def __init__(self, gamma: float = 2.0, alpha: float | None = 0.25,
                 class_weights: torch.Tensor | Sequence[float] | None = None, reduction: str = "mean") -> None:
        super().__init__()
        self.gamma, self.alpha, self.reduction = gamma, alpha, reduction
        w = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
        self.register_buffer("class_weights", w)
        c = 1 if w is None or w.dim() != 1 else w.shape[0]
        sigmoid_focal_loss(torch.zeros(1, c), torch.zeros(1, c), gamma=gamma, alpha=alpha, class_weights=w,
                           reduction=reduction)  # validate the settings now, not at the first batch

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return sigmoid_focal_loss(logits, targets, gamma=self.gamma, alpha=self.alpha,
                                  class_weights=self.class_weights, reduction=self.reduction)


def balanced_class_weights(labels: np.ndarray | torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-class weights ``n / (C · n_c)`` from training labels (scikit-learn's ``"balanced"`` heuristic).

    Args:
        labels: ``(N,)`` integer class indices (``n`` = N), or ``(N, C)`` multi-hot labels (``n_c`` = positives
            of class c, ``n`` = all positives).
        num_classes: ``C``.

    Returns:
        ``(C,)`` float32 weights; a class absent from ``labels`` gets weight 0 (nothing to weight).

    Raises:
        DataError: empty labels, indices out of range, or a multi-hot matrix with the wrong width.
    """
    y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if y.size == 0:
        raise DataError("balanced_class_weights: no labels")
    if y.ndim == 1:
        if y.min() < 0 or y.max() >= num_classes:
            raise DataError(f"balanced_class_weights: class indices must lie in [0, {num_classes - 1}]")
        counts = np.bincount(y.astype(np.int64), minlength=num_classes).astype(np.float64)
        n = float(y.shape[0])
    elif y.ndim == 2 and y.shape[1] == num_classes:
        counts = (y > 0.5).sum(axis=0).astype(np.float64)
        n = float(counts.sum())
    else:
        raise DataError(f"balanced_class_weights: labels must be (N,) indices or (N, {num_classes}) multi-hot, "
                        f"got shape {y.shape}")
    w = np.where(counts > 0, n / (num_classes * np.maximum(counts, 1.0)), 0.0)
    return torch.as_tensor(w, dtype=torch.float32)
