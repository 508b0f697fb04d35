"""MAE: masked autoencoder with a ViT encoder that sees only the visible patches.

He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022.

A random 75 % of the patches is dropped; the ViT encoder (:class:`~medssl.nn.masked_vit.MaskedViT`) runs on
the remaining 25 % only; a lighter decoder (512 wide, 8 blocks) gets the encoded tokens plus a shared mask
token at every masked position and predicts the pixels of every patch; the loss is the mean squared error
on the masked patches, against per-patch normalised pixels (norm-pix). 2D uses a timm ViT, 3D a ViT over
cubes (:mod:`medssl.nn.vit3d`) — the same code with ``spatial_dims=3``.

Augmentation is MAE's: a random resized crop (``views.crop_scale``, ``views.crop_ratio``) and flips
(``views.flip_p``, ``views.flip_axes``); the intensity jitter, blur and noise of ``views`` are not used.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from medssl.config import ModelConfig
from medssl.errors import ConfigError
from medssl.losses.reconstruction import reconstruction_loss
from medssl.methods import register
from medssl.methods.base import DataInfo, Method, MethodConfig, StepOutput, ViewSpec, VisualPanel
from medssl.nn.backbones import build_backbone, is_vit
from medssl.nn.masked_vit import MaskedViT, TokenDecoder, resolve_patch_size, visible_indices
from medssl.nn.patches import patchify, unpatchify
from medssl.transforms.intensity import MEAN, STD, normalize
from medssl.transforms.masking import MaskConfig, mask_grid
from medssl.transforms.views import ViewSampler

log = logging.getLogger("medssl")

#: the ViT a masked-image method uses when the run names none (``model.backbone`` left at its CNN default)
DEFAULT_VIT = {2: "vit_tiny_patch16_224", 3: "vit_tiny_3d"}


@dataclass
class MAEConfig(MethodConfig):
    """MAE hyper-parameters.

    Attributes:
        mask_ratio: fraction of patches masked (0.75).
        mask_strategy: how patches are chosen (:mod:`medssl.transforms.masking`; ``random`` in MAE).
        decoder_dim: decoder width (512).
        decoder_depth: decoder blocks (8).
        decoder_heads: decoder attention heads (16).
        norm_pix_loss: per-patch normalised pixel targets (MAE's best setting).
    """

    mask_ratio: float = 0.75
    mask_strategy: str = "random"
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    norm_pix_loss: bool = True


def resolve_vit_backbone(cfg: Any, spatial_dims: int, method: str) -> str:
    """The ViT a masked-image method builds: ``model.backbone`` if it is a ViT, :data:`DEFAULT_VIT` when the
    backbone was left at the (CNN) default. The choice is written back into ``cfg.model`` so that the run's
    ``config.yaml`` records it.

    Raises:
        ConfigError: ``model.backbone`` names a CNN explicitly.
    """
    name = cfg.model.backbone
    if not is_vit(name):
        if name != ModelConfig().backbone:
            raise ConfigError(f"{method} needs a ViT backbone (e.g. vit_tiny_patch16_224, vit_small_3d); got '{name}'")
        name = DEFAULT_VIT[spatial_dims]
        log.info("%s: model.backbone %s -> %s (a ViT)", method, cfg.model.backbone, name)
        cfg.model.backbone = name
    return name


@register
class MAE(Method):
    """Masked autoencoder (ViT, 2D and 3D)."""

    name = "mae"
    description = "MAE: ViT encoder on visible patches, light decoder, norm-pix MSE on masked patches (He et al. 2022)"
    config_cls = MAEConfig
    default_lr = 1.5e-4
    default_optimizer = "adamw"
    paper = "He et al., Masked Autoencoders Are Scalable Vision Learners, CVPR 2022"
    view_spec = ViewSpec(num_views=1)

    def __init__(self, cfg: Any, data: DataInfo) -> None:
        super().__init__()
        m = self.config_cls(**cfg.method)
        self.hparams = m
        sd = data.spatial_dims
        self.spatial_dims = sd
        self.in_chans = data.in_chans
        self.image_size = data.image_size
        name = resolve_vit_backbone(cfg, sd, self.name)
        patch = resolve_patch_size(name, data.image_size, sd, cfg.model.patch_size)
        cfg.model.patch_size = patch
        if cfg.model.global_pool is None:  # mean of the patch tokens: better frozen features than the class token
            cfg.model.global_pool = "avg"
        self.backbone_name = name
        self.patch = patch
        self.global_pool = cfg.model.global_pool
        vit = build_backbone(name, in_chans=data.in_chans, image_size=data.image_size, pretrained=cfg.model.pretrained,
                             spatial_dims=sd, patch_size=patch, global_pool=self.global_pool)
        self.encoder = MaskedViT(vit, sd, fixed_pos_embed=not cfg.model.pretrained)
        self.mask_cfg = MaskConfig(strategy=m.mask_strategy, ratio=m.mask_ratio, patch_size=patch)
        self.patch_numel = patch**sd * data.in_chans
        self.decoder = TokenDecoder(self.encoder.embed_dim, self.encoder.grid, self.patch_numel, dim=m.decoder_dim,
                                    depth=m.decoder_depth, num_heads=m.decoder_heads,
                                    num_prefix_tokens=self.encoder.num_prefix_tokens)
        geometric = dataclasses.replace(cfg.views, intensity_p=0.0, blur_p=0.0, noise_std=0.0)
        self.views = ViewSampler(geometric, data.image_size, sd)

    # -- pieces -------------------------------------------------------------------------------------------
    def make_views(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict[int, torch.Tensor]:
        """The augmented image of every sample, ``{1: (B, C, *S)}`` in ``[0, 1]`` (MIRAM adds higher scales)."""
        return {1: self.views(batch["image"], generator=generator).images}

    def draw_mask(self, batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A mask ``(B, N)`` (``True`` = masked) and the visible indices (``None`` when nothing is masked).

        Drawn on the CPU (global RNG, so resumed runs draw the same masks) and moved to ``device`` with the
        indices already computed, so no host-device synchronisation happens in the step.
        """
        mask = mask_grid(self.mask_cfg, batch_size, self.encoder.grid).reshape(batch_size, -1)
        ids = visible_indices(mask) if bool(mask.any()) else None
        return mask.to(device), (ids.to(device) if ids is not None else None)

    def forward_scales(self, views: dict[int, torch.Tensor], mask: torch.Tensor, ids_keep: torch.Tensor | None
                       ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], dict[int, torch.Tensor], torch.Tensor]:
        """Predictions, targets and masks per scale, and the encoder's tokens.

        Returns:
            ``(preds, targets, masks, latent)``: ``{scale: (B, N_s, P)}`` predicted and target patches
            (targets in normalised-image space), ``{scale: (B, N_s)}`` masks and ``(B, P + N_vis, D)``.
        """
        x = normalize(views[1])
        latent = self.encoder(x, ids_keep)
        tokens = self.decoder.forward_tokens(latent, ids_keep)
        preds = {1: self.decoder.predict(tokens)}
        targets = {1: patchify(x, self.patch, self.spatial_dims)}
        return preds, targets, {1: mask}, latent

    # -- step ---------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any]) -> StepOutput:
        views = self.make_views(batch)
        mask, ids = self.draw_mask(views[1].shape[0], views[1].device)
        preds, targets, masks, latent = self.forward_scales(views, mask, ids)
        losses = {s: reconstruction_loss(preds[s], targets[s], masks[s], norm_pix=self.hparams.norm_pix_loss)
                  for s in preds}
        loss = torch.stack(list(losses.values())).sum()  # equal weights (one scale for MAE)
        logs = {f"loss_{s}x": v.detach() for s, v in losses.items()} if len(losses) > 1 else {}
        # the class token of the masked forward, for the trainer's collapse statistics
        return StepOutput(loss=loss, logs=logs, embeddings={"backbone": latent[:, 0].detach()})

    #: samples drawn by :meth:`visualize`
    vis_samples: int = 4

    @torch.no_grad()
    def visualize(self, batch: dict[str, Any], step: int) -> list[VisualPanel] | None:
        """Reconstruction panels of the first samples, one per scale: the masked input (1x), then mask,
        reconstruction and target at every scale (3D: the figure shows the middle slice).

        Predictions are mapped back to pixels: with norm-pix, each predicted patch is de-normalised with its
        target patch's mean and standard deviation (as in MAE's figures); visible patches show the target.
        The trainer calls this in ``eval()`` mode with a seeded RNG (:meth:`Method.visualize`).
        """
        n = min(self.vis_samples, int(batch["image"].shape[0]))
        small = {k: v[:n] for k, v in batch.items() if isinstance(v, torch.Tensor)}
        views = self.make_views(small)
        mask, ids = self.draw_mask(n, views[1].device)
        preds, targets, masks, _ = self.forward_scales(views, mask, ids)
        panels = []
        for s, pred in preds.items():
            target, pred = targets[s].float(), pred.float()
            if self.hparams.norm_pix_loss:
                mean = target.mean(dim=-1, keepdim=True)
                std = (target.var(dim=-1, keepdim=True) + 1e-6).sqrt()
                pred = pred * std + mean
            m = masks[s].unsqueeze(-1)
            grid = tuple(g * s for g in self.encoder.grid)
            pix_mask = unpatchify(m.float().expand_as(target), self.patch, grid, self.in_chans)[:, :1] > 0.5
            target_img = _denormalize(unpatchify(target, self.patch, grid, self.in_chans))
            recon = _denormalize(unpatchify(torch.where(m, pred, target), self.patch, grid, self.in_chans))
            columns = {"input": target_img * ~pix_mask} if s == 1 else {}  # what the encoder saw: 1x only
            columns.update({"mask": pix_mask, "reconstruction": recon, "target": target_img})
            panels.append(VisualPanel(scale=f"{s}x", columns=columns))
        return panels

    def encoders(self) -> dict[str, nn.Module]:
        return {"backbone": self.encoder.vit}

    def export_meta(self) -> dict[str, dict[str, str]]:
        return {
            "backbone": {
                "format": "timm" if self.spatial_dims == 2 else "medssl-vit3d (timm ViT key layout, Conv3d patches)",
                "model_name": self.backbone_name,
                "in_chans": str(self.in_chans),
                "image_size": str(self.image_size),
                "patch_size": str(self.patch),
                "spatial_dims": str(self.spatial_dims),
                "global_pool": self.global_pool,
            }
        }


def _denormalize(x: torch.Tensor) -> torch.Tensor:
    """Normalised-image space back to ``[0, 1]`` (inverse of :func:`medssl.transforms.intensity.normalize`)."""
    return (x * STD + MEAN).clamp(0.0, 1.0)
