"""SimMIM: masked image modelling with a mask token in the full-sequence encoder and a linear prediction head.

Xie et al., "SimMIM: A Simple Framework for Masked Image Modeling", CVPR 2022.

Unlike MAE, the encoder sees **every** position: the embeddings of masked patches are replaced by one learned
mask token before the position embeddings are added (:meth:`medssl.nn.masked_vit.MaskedViT.embed`), so the
compute does not fall with the mask ratio. The prediction head is one linear layer from each patch token to
the pixels of its patch (SimMIM's 1x1 convolution + pixel shuffle, written per token), and the loss is the
L1 distance on the **masked** pixels only (:func:`medssl.losses.reconstruction.reconstruction_loss` with
``metric="l1"``), against the normalised image (no per-patch normalisation by default).

Masks are drawn by the shared masking module on a grid of ``mask_unit`` pixels (SimMIM: 32 px units for a
16 px patch ViT at 192 px; default here: the patch size) and brought to the patch grid. It reuses MAE's ViT
choice, views and reconstruction figures (``RUN/reconstructions``). 2D (timm ViT) and 3D (medssl ViT).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from medssl.checks import check_choice, check_range
from medssl.config import ModelConfig
from medssl.errors import ConfigError
from medssl.losses.reconstruction import reconstruction_loss
from medssl.methods.base import DataInfo, Method, MethodConfig, StepOutput, check_mask_units, init_kwargs
from medssl.methods.mae import MAE
from medssl.methods.registry import register
from medssl.nn.backbones import build_backbone
from medssl.nn.masked_vit import MaskedViT
from medssl.nn.patches import patchify
from medssl.transforms.intensity import normalize
from medssl.transforms.masking import MASK_STRATEGIES, MaskConfig, mask_grid
from medssl.transforms.views import ViewConfig, ViewSampler


@dataclass
class SimMIMConfig(MethodConfig):
    """SimMIM hyper-parameters.

    Attributes:
        mask_ratio: fraction of mask units masked (0.6 in SimMIM), in ``(0, 1)``.
        mask_strategy: how units are chosen (:mod:`medssl.transforms.masking`; ``random`` in SimMIM).
        mask_unit: side of a mask unit in pixels / voxels, a multiple of the patch size; 0 = the patch size
            (SimMIM: 32 with 16 px patches).
        norm_pix_loss: per-patch normalised targets (off in SimMIM: raw normalised pixels).
    """

    mask_ratio: float = 0.6
    mask_strategy: str = "random"
    mask_unit: int = 0
    norm_pix_loss: bool = False

    def __post_init__(self) -> None:
        """Validate the values.

        Raises:
            FieldError: naming the first invalid field.
        """
        check_range("mask_ratio", self.mask_ratio, gt=0, lt=1)
        check_choice("mask_strategy", self.mask_strategy, MASK_STRATEGIES)
        check_range("mask_unit", self.mask_unit, ge=0)


@register
class SimMIM(MAE[Any]):
    """SimMIM (ViT, 2D and 3D): full-sequence encoder with a mask token, linear head, L1 on masked pixels."""

    name = "simmim"
    description = "SimMIM: mask token in the full-sequence ViT, linear head, L1 on masked pixels (Xie et al. 2022)"
    config_cls = SimMIMConfig  # type: ignore[assignment]
    default_lr = 1e-4
    default_optimizer = "adamw"
    paper = "Xie et al., SimMIM: A Simple Framework for Masked Image Modeling, CVPR 2022"

    def __init__(self, hparams: Any, model: ModelConfig, views: ViewConfig, data: DataInfo) -> None:
        """Build the ViT (MAE's choice for the data), the mask token and the linear head.

        Raises:
            ConfigError: a CNN backbone, a mask unit that is not a multiple of the patch size, or a mask that
                cannot hide and keep at least one unit, naming the keys.
        """
        Method.__init__(self, hparams)
        m: SimMIMConfig = self.hparams
        sd = data.spatial_dims
        self.spatial_dims, self.in_chans, self.image_size = sd, data.in_chans, data.image_size
        self.backbone_name, self.patch, self.global_pool = self.vit_settings(model, data)
        vit = build_backbone(self.backbone_name, in_chans=data.in_chans, image_size=data.image_size,
                             pretrained=model.pretrained, spatial_dims=sd, patch_size=self.patch,
                             global_pool=self.global_pool, **init_kwargs(model))
        # learned position embeddings, as SimMIM's ViT (MAE fixes sine-cosine ones)
        self.encoder = MaskedViT(vit, sd, fixed_pos_embed=False)
        self.patch_numel = self.patch**sd * data.in_chans
        self.views = ViewSampler(dataclasses.replace(views, intensity_p=0.0, blur_p=0.0, noise_std=0.0),
                                 data.image_size, sd)
        unit = m.mask_unit or self.patch
        if unit % self.patch or data.image_size % unit:
            raise ConfigError(f"method.mask_unit {unit} must be a multiple of model.patch_size {self.patch} and "
                              f"divide data.image_size {data.image_size}")
        self.unit_factor = unit // self.patch
        self.unit_grid = tuple(g // self.unit_factor for g in self.encoder.grid)
        self.mask_cfg = MaskConfig(strategy=m.mask_strategy, ratio=m.mask_ratio, patch_size=unit)
        check_mask_units(self.mask_cfg, self.unit_grid, values_per_unit=unit**self.spatial_dims * data.in_chans,
                         norm_pix=m.norm_pix_loss, sizes=f"data.image_size {data.image_size}, method.mask_unit {unit}")
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.encoder.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.head = nn.Linear(self.encoder.embed_dim, self.patch_numel)

    def draw_mask(self, batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A patch-grid mask ``(B, N)`` drawn on the unit grid (each unit covers ``mask_unit / patch`` patches per
        axis); the encoder sees every patch, so there are no visible indices (``None``)."""
        mask = mask_grid(self.mask_cfg, batch_size, self.unit_grid)
        for axis in range(1, mask.ndim):
            mask = mask.repeat_interleave(self.unit_factor, dim=axis)
        return mask.reshape(batch_size, -1).to(device), None

    def forward_scales(self, views: dict[int, torch.Tensor], mask: torch.Tensor, ids_keep: torch.Tensor | None
                       ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], dict[int, torch.Tensor],
                                  torch.Tensor]:
        """Predictions ``{1: (B, N, P)}``, targets, masks and the encoder's tokens (every position)."""
        x = normalize(views[1])
        latent = self.encoder(x, mask=mask, mask_token=self.mask_token)
        pred = self.head(latent[:, self.encoder.num_prefix_tokens:])
        return {1: pred}, {1: patchify(x, self.patch, self.spatial_dims)}, {1: mask}, latent

    def training_step(self, batch: dict[str, Any]) -> StepOutput:
        views = self.make_views(batch)
        mask, _ = self.draw_mask(views[1].shape[0], views[1].device)
        preds, targets, masks, latent = self.forward_scales(views, mask, None)
        loss = reconstruction_loss(preds[1], targets[1], masks[1], norm_pix=self.hparams.norm_pix_loss, metric="l1")
        return StepOutput(loss=loss, logs={}, embeddings={"backbone": latent[:, 0].detach()})

