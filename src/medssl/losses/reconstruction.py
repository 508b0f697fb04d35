"""Reconstruction losses of masked image modelling (MAE, MIRAM; usable by any patch-wise predictor).

MAE (He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022) regresses the pixels of the
masked patches with a mean squared error; with ``norm_pix`` the target of every patch is first normalised
by that patch's own mean and variance::

    t̂ = (t − mean(t)) / sqrt(var(t) + ε),   ε = 1e-6,   var unbiased (MAE's choice)
    L = Σ_{b,i} m_bi · mean_j (p_bij − t̂_bij)² / Σ_{b,i} m_bi

where ``i`` runs over patches, ``j`` over the pixels x channels of a patch and ``m_bi = 1`` for masked
patches. The loss is over masked patches only (MIRAM's released code averaged over all patches; medssl
follows the MAE / MIRAM papers). With no masked patch at all (mask ratio 0, a plain autoencoder) every
patch counts.

Under DDP every rank has the same number of masked patches per sample, so the mean of the per-rank losses
is the loss of the global batch and no gathering is needed.

Patch predictors (a ViT decoder: MAE, MIRAM) call :func:`reconstruction_loss` on ``(B, N, P)`` patches;
image predictors (a CNN decoder: cnnmim) call :func:`masked_image_loss`, which cuts prediction and target
into the same patches (:func:`medssl.nn.patches.patchify`) first.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from medssl.nn.patches import patchify

__all__ = ["denormalize_patches", "masked_image_loss", "normalize_patches", "reconstruction_loss"]


def normalize_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch normalised targets ``(t − mean) / sqrt(var + eps)`` over the last axis (unbiased variance).

    Args:
        patches: ``(..., P)`` flattened patches.
        eps: added to the variance (1e-6 in MAE).
    """
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True, unbiased=True)
    return (patches - mean) / torch.sqrt(var + eps)


def denormalize_patches(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Predicted norm-pix patches back in pixel values: ``pred · sqrt(var(t) + eps) + mean(t)`` per patch.

    The inverse of :func:`normalize_patches` with the target patch's statistics (what MAE's figures show).

    Args:
        pred: ``(..., P)`` patches predicted in normalised units.
        target: ``(..., P)`` the target patches in pixel values.
        eps: the variance epsilon of :func:`normalize_patches`.
    """
    mean = target.mean(dim=-1, keepdim=True)
    std = (target.var(dim=-1, keepdim=True, unbiased=True) + eps).sqrt()
    return pred * std + mean


def reconstruction_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    norm_pix: bool = True,
    eps: float = 1e-6,
    metric: str = "mse",
) -> torch.Tensor:
    """Mean squared error (or, ``metric="l1"``, mean absolute error: SimMIM) of predicted patches over the masked
    patches.

    Args:
        pred: ``(B, N, P)`` predicted patches.
        target: ``(B, N, P)`` target patches (pixels, e.g. from :func:`medssl.nn.patches.patchify`).
        mask: ``(B, N)`` bool, ``True`` = masked: the patches the loss is over. ``None`` or an all-visible
            mask = every patch.
        norm_pix: normalise every target patch by its own mean and variance first (MAE's norm-pix loss);
            ``False`` = plain MSE on the pixels.
        eps: variance epsilon of ``norm_pix``.
        metric: ``mse`` (MAE) or ``l1`` (SimMIM: ``Σ m·|p − t| / (Σ m · P)``, the mean over masked pixels).

    Returns:
        Scalar loss (float32).

    Raises:
        ValueError: mismatched shapes or an unknown metric.
    """
    if metric not in ("mse", "l1"):
        raise ValueError(f"metric must be 'mse' or 'l1', got {metric!r}")
    if pred.shape != target.shape or pred.ndim != 3:
        raise ValueError(f"pred and target must both be (B, N, P), got {tuple(pred.shape)} and {tuple(target.shape)}")
    target = target.detach().float()
    if norm_pix:
        target = normalize_patches(target, eps)
    diff = pred.float() - target
    per_patch = (diff.abs() if metric == "l1" else diff.pow(2)).mean(dim=-1)  # (B, N)
    if mask is None:
        return per_patch.mean()
    if mask.shape != per_patch.shape:
        raise ValueError(f"mask must be (B, N) = {tuple(per_patch.shape)}, got {tuple(mask.shape)}")
    # All patches count when none is masked (ratio 0), without reading the mask back to the host.
    weights = torch.where(mask.any(), mask.float(), torch.ones_like(per_patch))
    return (per_patch * weights).sum() / weights.sum()


def masked_image_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int | Sequence[int],
    *,
    norm_pix: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """:func:`reconstruction_loss` of image-shaped predictions over a grid of masked units.

    Prediction and target are cut into units of ``patch_size`` (:func:`medssl.nn.patches.patchify`, the unit
    ``(g_0, g_1[, g_2])`` of the grid is patch ``Σ_k g_k · Π_{j>k} G_j``), so with ``t̂`` the (norm-pix) target::

        L = Σ_{masked units u} mean_{pixels i of u} (pred_i − t̂_i)² / #masked units

    All units have the same size, so this is the MSE over every masked pixel / voxel.

    Args:
        pred: ``(B, C, *S)`` predicted image.
        target: ``(B, C, *S)`` target image (no gradient flows into it).
        mask: ``(B, *grid)`` bool, ``True`` = masked, ``grid = S // patch_size``.
        patch_size: the unit side, one int or one per spatial axis.
        norm_pix: normalise every target unit by its own mean and variance first.
        eps: variance epsilon of ``norm_pix``.

    Raises:
        ValueError: shapes that do not fit one another or the patch size.
    """
    sd = pred.ndim - 2
    if target.shape != pred.shape or mask.ndim != sd + 1 or mask.shape[0] != pred.shape[0]:
        raise ValueError(f"pred and target must be (B, C, *S) and mask (B, *grid); got {tuple(pred.shape)}, "
                         f"{tuple(target.shape)} and {tuple(mask.shape)}")
    p = patchify(pred, patch_size, sd)
    t = patchify(target, patch_size, sd)
    return reconstruction_loss(p, t, mask.reshape(mask.shape[0], -1), norm_pix=norm_pix, eps=eps)
