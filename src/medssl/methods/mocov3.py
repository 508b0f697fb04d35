"""MoCo v3: momentum contrast without a queue, for vision transformers.

Chen, Xie & He, "An Empirical Study of Training Self-Supervised Vision Transformers", ICCV 2021.

A query encoder (backbone → projector → predictor, MLPs with BatchNorm) and a momentum key encoder (EMA of
backbone → projector, momentum rising from ``momentum`` to 1 on a cosine) see two views of every image. The
negatives are the other keys of the **global batch** (keys gathered across ranks; no queue), and the loss is
symmetric::

    L = 2τ · [ InfoNCE(q₁, k₂) + InfoNCE(q₂, k₁) ]

with InfoNCE from :func:`medssl.losses.info_nce` (the factor 2τ is MoCo v3's scaling, which makes the gradient
scale independent of τ). ``stop_grad_patch_embed`` freezes the ViT's random patch projection (MoCo v3's
remedy for the training instability it observed). ViT by default (``vit_tiny_patch16_224`` in 2D,
``vit_tiny_3d`` in 3D when ``model.backbone`` is left at its CNN default); a CNN named explicitly also works
(MoCo v3's ResNet-50 setting).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from medssl.checks import check_range
from medssl.config import ModelConfig, PretrainConfig
from medssl.errors import ConfigError
from medssl.losses import info_nce
from medssl.methods.base import BackboneMethod, DataInfo, MethodConfig, StepOutput, init_kwargs
from medssl.methods.dino import vit_patch_defaults
from medssl.methods.mae import DEFAULT_VIT
from medssl.methods.registry import register
from medssl.nn.backbones import build_backbone, check_image_fits, feature_dim, is_vit
from medssl.nn.ema import cosine_momentum, ema_update, make_ema_copy
from medssl.nn.heads import mocov3_mlp
from medssl.transforms.intensity import normalize
from medssl.transforms.views import ViewConfig, ViewSampler

log = logging.getLogger("medssl")


@dataclass
class MoCoV3Config(MethodConfig):
    """MoCo v3 hyper-parameters (the paper's ViT values unless noted).

    Attributes:
        temperature: τ (0.2 for ViTs).
        momentum: key-encoder EMA momentum at the start (0.99), rising to 1 on a cosine when
            ``momentum_cosine``.
        momentum_cosine: the cosine momentum schedule (on in MoCo v3); off = constant ``momentum``.
        proj_dim: embedding width (256).
        mlp_dim: hidden width of projector and predictor (4096).
        proj_layers: linear layers of the projector (3 for ViTs).
        pred_layers: linear layers of the predictor (2).
        stop_grad_patch_embed: freeze the ViT's randomly initialised patch projection (MoCo v3's stability fix).
    """

    temperature: float = 0.2
    momentum: float = 0.99
    momentum_cosine: bool = True
    proj_dim: int = 256
    mlp_dim: int = 4096
    proj_layers: int = 3
    pred_layers: int = 2
    stop_grad_patch_embed: bool = False

    def __post_init__(self) -> None:
        """Check the ranges.

        Raises:
            FieldError: naming the first field out of range.
        """
        check_range("temperature", self.temperature, gt=0)
        check_range("momentum", self.momentum, ge=0, le=1)
        for name in ("proj_dim", "mlp_dim", "proj_layers", "pred_layers"):
            check_range(name, getattr(self, name), ge=1)


@register
class MoCoV3(BackboneMethod[MoCoV3Config]):
    """MoCo v3 (ViT or CNN, 2D and 3D): no queue, symmetric InfoNCE over the global batch, predictor head."""

    name = "mocov3"
    description = "MoCo v3: momentum encoder + predictor, symmetric InfoNCE over the global batch (Chen et al. 2021)"
    config_cls = MoCoV3Config
    default_lr = 1.5e-4
    default_optimizer = "adamw"
    paper = "Chen, Xie & He, An Empirical Study of Training Self-Supervised Vision Transformers, ICCV 2021"

    @classmethod
    def resolve_defaults(cls, cfg: PretrainConfig, data: DataInfo) -> None:
        """A ViT when ``model.backbone`` is left at its (CNN) default, and its patch size, recorded in ``cfg``."""
        if cfg.model.backbone == ModelConfig().backbone:
            cfg.model.backbone = DEFAULT_VIT[data.spatial_dims]
            log.info("mocov3: model.backbone -> %s (a ViT)", cfg.model.backbone)
        vit_patch_defaults(cfg, data)

    def __init__(self, hparams: MoCoV3Config, model: ModelConfig, views: ViewConfig, data: DataInfo) -> None:
        """Build query and key encoders.

        Raises:
            ConfigError: ``stop_grad_patch_embed`` on a CNN, or a backbone that does not fit the image.
        """
        super().__init__(hparams)
        m = self.hparams
        vit = is_vit(model.backbone)
        self.backbone = build_backbone(model.backbone, in_chans=data.in_chans, image_size=data.image_size,
                                       stem=model.stem, pretrained=model.pretrained, spatial_dims=data.spatial_dims,
                                       patch_size=model.patch_size if vit else None,
                                       global_pool=model.global_pool if vit else None, **init_kwargs(model))
        check_image_fits(self.backbone, model.backbone, data.image_size)
        self.backbone_name, self.stem, self.in_chans = model.backbone, model.stem, data.in_chans
        self.image_size, self.spatial_dims = data.image_size, data.spatial_dims
        self.patch_size, self.global_pool = (model.patch_size, model.global_pool) if vit else (None, None)
        if m.stop_grad_patch_embed:
            proj = getattr(getattr(self.backbone, "patch_embed", None), "proj", None)
            if proj is None:
                raise ConfigError(f"method.stop_grad_patch_embed needs a ViT (a patch projection); model.backbone "
                                  f"'{model.backbone}' has none")
            for p in proj.parameters():
                p.requires_grad_(False)
        d = feature_dim(self.backbone)
        self.projector = mocov3_mlp(d, m.mlp_dim, m.proj_dim, m.proj_layers, last_bn=True)
        self.predictor = mocov3_mlp(m.proj_dim, m.mlp_dim, m.proj_dim, m.pred_layers, last_bn=False)
        self.key_backbone = make_ema_copy(self.backbone)
        self.key_projector = make_ema_copy(self.projector)
        self.views = ViewSampler(views, data.image_size, data.spatial_dims)

    def training_step(self, batch: dict[str, Any]) -> StepOutput:
        m = self.hparams
        images = batch["image"]
        b = images.shape[0]
        x = torch.cat([normalize(self.views(images).images), normalize(self.views(images).images)])
        h = self.backbone(x)
        q = self.predictor(self.projector(h))
        with torch.no_grad():
            k = self.key_projector(self.key_backbone(x))
        q1, q2 = q[:b], q[b:]
        k1, k2 = k[:b], k[b:]
        loss = 2 * m.temperature * (info_nce(q1, k2, temperature=m.temperature)
                                    + info_nce(q2, k1, temperature=m.temperature))
        with torch.no_grad():
            qn = F.normalize(q.detach().float(), dim=1)
            kn = F.normalize(k.float(), dim=1)
            logs: dict[str, float | torch.Tensor] = {
                "pos_sim": ((qn[:b] * kn[b:]).sum(1).mean() + (qn[b:] * kn[:b]).sum(1).mean()) / 2,
                "embedding_std": qn.std(dim=0).mean() * qn.shape[1] ** 0.5,
            }
        return StepOutput(loss=loss, logs=logs, embeddings={"backbone": h[:b].detach(), "projector": q[:b].detach()})

    @torch.no_grad()
    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """EMA update of the key encoder with the (cosine) momentum of this step."""
        m = self.hparams
        momentum = cosine_momentum(m.momentum, step, total_steps) if m.momentum_cosine else m.momentum
        ema_update(self.key_backbone, self.backbone, momentum)
        ema_update(self.key_projector, self.projector, momentum)

    def export_meta(self) -> dict[str, dict[str, str]]:
        meta = super().export_meta()
        if self.patch_size is not None:
            meta["backbone"]["patch_size"] = str(self.patch_size)
            if self.spatial_dims == 3:
                meta["backbone"]["format"] = "medssl-vit3d (timm ViT key layout, Conv3d patches)"
        if self.global_pool is not None:
            meta["backbone"]["global_pool"] = self.global_pool
        return meta
