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
from typing import Any, TypeVar

import torch
from torch import nn

from medssl.checks import FieldError, check_choice, check_range
from medssl.config import ModelConfig, PretrainConfig
from medssl.errors import ConfigError
from medssl.losses.reconstruction import denormalize_patches, reconstruction_loss
from medssl.methods.base import (
    DataInfo,
    Method,
    MethodConfig,
    StepOutput,
    VisualPanel,
    check_mask_units,
    init_kwargs,
)
from medssl.methods.registry import register
from medssl.nn.backbones import build_backbone, is_vit
from medssl.nn.masked_vit import MaskedViT, TokenDecoder, resolve_patch_size, visible_indices
from medssl.nn.patches import patchify, unpatchify
from medssl.transforms.intensity import denormalize, normalize
from medssl.transforms.masking import MASK_STRATEGIES, MaskConfig, mask_grid
from medssl.transforms.views import ViewConfig, ViewSampler

log = logging.getLogger("medssl")

#: the ViT a masked-image method uses when the run names none (``model.backbone`` left at its CNN default)
DEFAULT_VIT = {2: "vit_tiny_patch16_224", 3: "vit_tiny_3d"}
#: the ViT features masked-image methods evaluate when ``model.global_pool`` is not set: the mean of the patch
#: tokens (better frozen features than the class token)
DEFAULT_POOL = "avg"

#: ``{scale: tensor}``: 1 is the input resolution, 2 / 4 the higher scales of MIRAM
Scales = dict[int, torch.Tensor]


@dataclass
class MAEConfig(MethodConfig):
    """MAE hyper-parameters.

    Attributes:
        mask_ratio: fraction of patches masked (0.75), in ``[0, 1)``; 0 trains a plain autoencoder on every
            patch (the loss then covers all patches).
        mask_strategy: how patches are chosen (:mod:`medssl.transforms.masking`; ``random`` in MAE).
        decoder_dim: decoder width (512); a multiple of ``decoder_heads``.
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

    def __post_init__(self) -> None:
        """Validate the values (recipes and ``--set`` overrides end up here).

        Raises:
            FieldError: naming the first invalid field.
        """
        check_range("mask_ratio", self.mask_ratio, ge=0, lt=1)
        check_choice("mask_strategy", self.mask_strategy, MASK_STRATEGIES)
        check_range("decoder_dim", self.decoder_dim, ge=1)
        check_range("decoder_depth", self.decoder_depth, ge=1)
        check_range("decoder_heads", self.decoder_heads, ge=1)
        if self.decoder_dim % self.decoder_heads:
            raise FieldError("decoder_dim", f"must be a multiple of decoder_heads ({self.decoder_heads}), "
                                            f"got {self.decoder_dim}")


MAEC = TypeVar("MAEC", bound=MAEConfig)


@register
class MAE(Method[MAEC]):
    """Masked autoencoder (ViT, 2D and 3D)."""

    name = "mae"
    description = "MAE: ViT encoder on visible patches, light decoder, norm-pix MSE on masked patches (He et al. 2022)"
    config_cls = MAEConfig
    default_lr = 1.5e-4
    default_optimizer = "adamw"
    paper = "He et al., Masked Autoencoders Are Scalable Vision Learners, CVPR 2022"

    #: samples drawn by :meth:`visualize`
    vis_samples: int = 4

    @classmethod
    def vit_settings(cls, model: ModelConfig, data: DataInfo) -> tuple[str, int, str]:
        """The ViT this method builds for ``data``: ``(backbone, patch size, global pool)``.

        ``model.backbone`` if it is a ViT, :data:`DEFAULT_VIT` for the data's spatial dims when the backbone was
        left at the (CNN) default; ``model.patch_size`` or :func:`~medssl.nn.masked_vit.resolve_patch_size`'s
        choice for the image size; ``model.global_pool`` or :data:`DEFAULT_POOL`.

        Raises:
            ConfigError: ``model.backbone`` names a CNN explicitly, or the patch size does not divide the image.
        """
        name = model.backbone
        if not is_vit(name):
            if name != ModelConfig().backbone:
                raise ConfigError(f"{cls.name} needs a ViT backbone (e.g. vit_tiny_patch16_224, vit_small_3d); "
                                  f"got '{name}'")
            name = DEFAULT_VIT[data.spatial_dims]
        patch = resolve_patch_size(name, data.image_size, data.spatial_dims, model.patch_size)
        return name, patch, model.global_pool or DEFAULT_POOL

    @classmethod
    def resolve_defaults(cls, cfg: PretrainConfig, data: DataInfo) -> None:
        """Record :meth:`vit_settings` in ``cfg.model`` (backbone, patch size, global pool)."""
        name, patch, pool = cls.vit_settings(cfg.model, data)
        if name != cfg.model.backbone:
            log.info("%s: model.backbone %s -> %s (a ViT)", cls.name, cfg.model.backbone, name)
        cfg.model.backbone, cfg.model.patch_size, cfg.model.global_pool = name, patch, pool

    def __init__(self, hparams: MAEC, model: ModelConfig, views: ViewConfig, data: DataInfo) -> None:
        """Build the masked ViT and its decoder.

        Raises:
            ConfigError: a CNN backbone, or a patch size that does not fit the image
                (:func:`~medssl.methods.base.check_mask_units`), naming the keys.
        """
        super().__init__(hparams)
        m = self.hparams
        sd = data.spatial_dims
        self.spatial_dims = sd
        self.in_chans = data.in_chans
        self.image_size = data.image_size
        self.backbone_name, self.patch, self.global_pool = self.vit_settings(model, data)
        vit = build_backbone(self.backbone_name, in_chans=data.in_chans, image_size=data.image_size,
                             pretrained=model.pretrained, spatial_dims=sd, patch_size=self.patch,
                             global_pool=self.global_pool, **init_kwargs(model))
        # MAE's initialisation from scratch, the same in 2D (timm's ViT) and 3D; never over loaded weights
        scratch = not (model.pretrained or model.init_from)
        self.encoder = MaskedViT(vit, sd, fixed_pos_embed=scratch, init_weights=scratch)
        self.mask_cfg = MaskConfig(strategy=m.mask_strategy, ratio=m.mask_ratio, patch_size=self.patch)
        self.patch_numel = self.patch**sd * data.in_chans
        check_mask_units(self.mask_cfg, self.encoder.grid, values_per_unit=self.patch_numel, norm_pix=m.norm_pix_loss,
                         sizes=f"data.image_size {data.image_size}, model.patch_size {self.patch}")
        self.decoder = TokenDecoder(self.encoder.embed_dim, self.encoder.grid, self.patch_numel, dim=m.decoder_dim,
                                    depth=m.decoder_depth, num_heads=m.decoder_heads,
                                    num_prefix_tokens=self.encoder.num_prefix_tokens)
        geometric = dataclasses.replace(views, intensity_p=0.0, blur_p=0.0, noise_std=0.0)
        self.views = ViewSampler(geometric, data.image_size, sd)

    # -- pieces -------------------------------------------------------------------------------------------
    def make_views(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> Scales:
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

    def forward_scales(self, views: Scales, mask: torch.Tensor, ids_keep: torch.Tensor | None
                       ) -> tuple[Scales, Scales, Scales, torch.Tensor]:
        """Predictions, targets and masks per scale, and the encoder's tokens.

        Returns:
            ``(preds, targets, masks, latent)``: ``{scale: (B, N_s, P)}`` predicted and target patches
            (targets in normalised-image space), ``{scale: (B, N_s)}`` masks and ``(B, P + N_vis, D)``.
        """
        x = normalize(views[1])
        latent = self.encoder(x, ids_keep)
        tokens = self.decoder.forward_tokens(latent, ids_keep)
        preds, masks = {1: self.decoder.predict(tokens)}, {1: mask}
        targets = {1: patchify(x, self.patch, self.spatial_dims)}
        self.add_scales(tokens, views, preds, targets, masks)
        return preds, targets, masks, latent

    def add_scales(self, tokens: torch.Tensor, views: Scales, preds: Scales, targets: Scales, masks: Scales) -> None:
        """Add the predictions, targets and masks of scales beyond 1x, from the 1x decoder's ``tokens`` (MIRAM).
        MAE has none."""

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
                pred = denormalize_patches(pred, target)
            m = masks[s].unsqueeze(-1)
            grid = tuple(g * s for g in self.encoder.grid)
            pix_mask = unpatchify(m.float().expand_as(target), self.patch, grid, self.in_chans)[:, :1] > 0.5
            target_img = denormalize(unpatchify(target, self.patch, grid, self.in_chans)).clamp(0.0, 1.0)
            recon = unpatchify(torch.where(m, pred, target), self.patch, grid, self.in_chans)
            recon = denormalize(recon).clamp(0.0, 1.0)
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

