"""Med-MoCo: MoCo v2 + local feature learning + feature decorrelation.

Hassanpour et al., "Med-MoCo: ... dimensional collapse ... medical images", ISBI 2024, arXiv 2402.14611.

MoCo v2 trained on medical images suffers dimensional collapse: the embeddings span few directions. Med-MoCo
adds two parts to the MoCo v2 of :mod:`medssl.methods.mocov2` (reused by subclassing, not copied):

* a **local InfoNCE** (:class:`medssl.losses.local_infonce.LocalInfoNCE`) over RoIAlign-pooled regions
  that correspond between the two views (inside the overlap of their crop boxes), taken from the
  backbone's last feature map, so the gradient reaches the backbone: ``L = L_global + w · L_local``
  (``w = 0.5``);
* a **whitening layer** (:class:`medssl.nn.whitening.Whitening`, ``zca`` or ``iternorm``) at the end of the
  backbone, before the projector, in both the query and the key encoder. As the authors do, it whitens the last
  feature map as one group with statistics over all ``N·H·W`` positions (``whitening_stats: feature_map``);
  whitening every position and average-pooling equals whitening the pooled features with that ``W``, ``μ``.
  The earlier variant, grouped whitening of the pooled features, is ``whitening_stats: pooled``.

Each part can be switched off for ablations: ``method.local_weight=0``, ``method.whitening=none`` (both
off is MoCo v2). The exported encoder is the backbone followed by the eval-mode whitening.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from medssl.checks import FieldError, check_choice, check_range
from medssl.config import ModelConfig
from medssl.errors import ConfigError
from medssl.losses.local_infonce import LocalInfoNCE
from medssl.methods.base import DataInfo, StepOutput
from medssl.methods.mocov2 import MoCoV2, MoCoV2Config, batch_ids
from medssl.methods.registry import register
from medssl.nn.backbones import feature_dim, is_vit
from medssl.nn.ema import make_ema_copy
from medssl.nn.whitening import WHITENING_METHODS, WHITENING_STATS, WhitenedBackbone, Whitening, feature_positions
from medssl.transforms.intensity import normalize
from medssl.transforms.views import ViewConfig

log = logging.getLogger("medssl")


@dataclass
class MedMoCoConfig(MoCoV2Config):
    """Med-MoCo hyper-parameters: those of MoCo v2 plus the local term and the whitening layer.

    Attributes:
        local_weight: weight ``w`` of the local InfoNCE in ``L_global + w · L_local`` (0.5 in the paper;
            ``0`` switches the local term off).
        local_regions: regions drawn per image inside the overlap of the two crops.
        local_region_scale: side of a region as a fraction of the overlap's side, ``(min, max)``.
        local_temperature: τ of the local InfoNCE.
        local_dim: output width of the local projection MLP.
        local_hidden: hidden width of the local projection MLP (``0`` = the feature map's channels).
        local_pool_size: RoIAlign bins per axis (the region feature is their mean).
        whitening: ``none``, ``zca`` or ``iternorm``.
        whitening_stats: ``feature_map`` (the paper: statistics over every position of the last feature map,
            ``N·H·W`` samples per step) or ``pooled`` (over the ``N`` pooled features, medssl's earlier variant).
        whitening_group_size: channels whitened together (block-diagonal whitening; ``0`` = all, the paper's one
            group). Keep it below the number of statistics samples per step (2 × batch × H × W with
            ``feature_map`` statistics and the symmetric loss; 2 × batch with ``pooled``).
        whitening_eps: ridge ``ε`` added to the covariance.
        whitening_momentum: weight of a new batch in the running statistics used in eval mode.
        whitening_iterations: Newton iterations ``T`` of ``iternorm``.
        whitening_gather: compute the whitening statistics over all ranks under DDP.
    """

    local_weight: float = 0.5
    local_regions: int = 16
    local_region_scale: tuple[float, float] = (0.25, 0.5)
    local_temperature: float = 0.2
    local_dim: int = 128
    local_hidden: int = 0
    local_pool_size: int = 2
    whitening: str = "zca"
    whitening_stats: str = "feature_map"
    whitening_group_size: int = 0
    whitening_eps: float = 1e-5
    whitening_momentum: float = 0.1
    whitening_iterations: int = 5
    whitening_gather: bool = False

    def __post_init__(self) -> None:
        """Validate the MoCo v2 and the Med-MoCo fields (recipes and ``--set`` overrides end up here).

        Raises:
            FieldError: naming the first invalid field.
        """
        super().__post_init__()
        check_choice("whitening", self.whitening, WHITENING_METHODS)
        check_choice("whitening_stats", self.whitening_stats, WHITENING_STATS)
        check_range("local_weight", self.local_weight, ge=0)
        check_range("local_regions", self.local_regions, ge=1)
        scale = tuple(self.local_region_scale)
        if len(scale) != 2:
            raise FieldError("local_region_scale", f"must be a (min, max) pair, got {list(scale)}")
        for value in scale:
            check_range("local_region_scale", value, gt=0, le=1)
        if scale[0] > scale[1]:
            raise FieldError("local_region_scale", f"must satisfy 0 < min <= max <= 1, got {list(scale)}")
        self.local_region_scale = (float(scale[0]), float(scale[1]))
        check_range("local_temperature", self.local_temperature, gt=0)
        check_range("local_dim", self.local_dim, ge=1)
        check_range("local_hidden", self.local_hidden, ge=0)
        check_range("local_pool_size", self.local_pool_size, ge=1)
        check_range("whitening_group_size", self.whitening_group_size, ge=0)
        check_range("whitening_eps", self.whitening_eps, gt=0)
        check_range("whitening_momentum", self.whitening_momentum, gt=0, le=1)
        check_range("whitening_iterations", self.whitening_iterations, ge=1)


def feature_map_and_pooled(backbone: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The backbone's last spatial feature map and its pooled features, from one forward pass.

    timm models: ``forward_features`` then ``forward_head(pre_logits=True)`` (what ``forward`` does with
    ``num_classes=0``); medssl's 3D ResNets: ``forward_features`` then the spatial mean.

    Raises:
        ConfigError: the backbone has no spatial feature map (e.g. a ViT, whose features are tokens).
    """
    ff = getattr(backbone, "forward_features", None)
    if ff is None:
        raise ConfigError(f"{type(backbone).__name__} has no forward_features: Med-MoCo's local term needs a "
                          "CNN feature map (set method.local_weight=0 to train without it)")
    fmap = ff(x)
    if fmap.ndim != x.ndim:
        raise ConfigError(
            f"{type(backbone).__name__} returns features of shape {tuple(fmap.shape)}, not a spatial feature map: "
            "Med-MoCo's local term needs a CNN backbone (set method.local_weight=0 for a ViT)"
        )
    head = getattr(backbone, "forward_head", None)
    pooled = head(fmap, pre_logits=True) if head is not None else fmap.flatten(2).mean(dim=2)
    return fmap, pooled


@register
class MedMoCo(MoCoV2[MedMoCoConfig]):
    """Med-MoCo: MoCo v2 with a local InfoNCE over corresponding regions and a whitening layer."""

    name = "medmoco"
    description = ("Med-MoCo: MoCo v2 + local InfoNCE over corresponding regions + whitening (Hassanpour et al. "
                   "ISBI 2024)")
    config_cls = MedMoCoConfig
    paper = "Hassanpour et al., Med-MoCo, ISBI 2024, arXiv 2402.14611"

    def __init__(self, hparams: MedMoCoConfig, model: ModelConfig, views: ViewConfig, data: DataInfo) -> None:
        super().__init__(hparams, model, views, data)
        m = self.hparams
        d = feature_dim(self.backbone)
        self.whitening: Whitening | None = None
        self.key_whitening: nn.Module | None = None
        if m.whitening != "none":
            self.whitening = Whitening(
                d, m.whitening, group_size=m.whitening_group_size, eps=m.whitening_eps,
                momentum=m.whitening_momentum, iterations=m.whitening_iterations,
                gather_distributed=m.whitening_gather,
            )
            # The key encoder whitens with its own batch statistics, like its own BatchNorm layers.
            self.key_whitening = make_ema_copy(self.whitening)
        self.local: LocalInfoNCE | None = None
        vit = is_vit(model.backbone)
        if m.local_weight > 0:
            if data.spatial_dims == 2 and vit:
                raise ConfigError(
                    f"backbone '{model.backbone}' has no spatial feature map: Med-MoCo's local term needs a "
                    "CNN backbone; use e.g. resnet18/resnet50, or set method.local_weight=0"
                )
            self.local = LocalInfoNCE(
                d, num_regions=m.local_regions, region_scale=m.local_region_scale,
                proj_hidden=m.local_hidden, proj_dim=m.local_dim, temperature=m.local_temperature,
                output_size=m.local_pool_size,
            )
        if m.whitening != "none" and m.whitening_stats == "feature_map" and vit:
            raise ConfigError(
                f"backbone '{model.backbone}' has no spatial feature map: method.whitening_stats=feature_map whitens "
                "a CNN's last feature map; use a CNN or method.whitening_stats=pooled"
            )
        self._warned_small_map = False

    # -- encoders -----------------------------------------------------------------------------------
    @property
    def _map_stats(self) -> bool:
        return self.whitening is not None and self.hparams.whitening_stats == "feature_map"

    def _whiten(self, whitening: nn.Module, backbone: nn.Module, x: torch.Tensor,
                fmap: torch.Tensor | None = None, h: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pooled, whitened pooled)`` features of ``x``, statistics from the feature map's positions or the
        pooled features (``whitening_stats``)."""
        if self.hparams.whitening_stats == "feature_map":
            if fmap is None:
                fmap, h = feature_map_and_pooled(backbone, x)
            return h, whitening(h, stats=feature_positions(fmap))
        h = backbone(x) if h is None else h
        return h, whitening(h)

    def embed_query(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Query outputs: ``backbone`` (pooled, before whitening), ``whitened``, ``projector`` and, when the
        local term is on or the whitening takes feature-map statistics, the last ``feature_map``."""
        out: dict[str, torch.Tensor] = {}
        if self.local is not None or self._map_stats:
            out["feature_map"], h = feature_map_and_pooled(self.backbone, x)
        else:
            h = self.backbone(x)
        out["backbone"] = h
        if self.whitening is not None:
            _, h = self._whiten(self.whitening, self.backbone, x, out.get("feature_map"), h)
            out["whitened"] = h
        out["projector"] = self.projector(h)
        return out

    def embed_key(self, x: torch.Tensor) -> torch.Tensor:
        if self.key_whitening is None:
            return self.key_projector(self.key_backbone(x))
        _, h = self._whiten(self.key_whitening, self.key_backbone, x)
        return self.key_projector(h)

    # -- step -----------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any]) -> StepOutput:
        images = batch["image"]
        w1 = self.views(images)
        w2 = self.views(images)
        v1, v2 = normalize(w1.images), normalize(w2.images)
        out, qd = self.global_step(v1, v2, batch_ids(batch, images))
        if self.local is None:
            return out
        b = images.shape[0]
        fmap = qd["feature_map"]
        if self.hparams.symmetric:
            f1, f2 = fmap[:b], fmap[b:]
        else:  # the second view's feature map from the query backbone, for the local term only
            f1 = fmap
            f2, _ = feature_map_and_pooled(self.backbone, v2)
        if not self._warned_small_map and min(f1.shape[2:]) < 2:
            log.warning("medmoco: the backbone's last feature map is %s; the local term cannot tell regions apart "
                        "on a 1-cell map. Use larger images or model.stem=cifar.", "x".join(map(str, f1.shape[2:])))
            self._warned_small_map = True
        local = self.local(f1, f2, w1.boxes, w2.boxes, w1.flips, w2.flips)
        weight = self.hparams.local_weight
        out.logs["loss_global"] = out.loss.detach()  # tensors: read back on log steps only
        out.logs["loss_local"] = local.loss.detach()
        out.logs["local_valid_fraction"] = local.num_valid / b
        out.loss = out.loss + weight * local.loss
        return out

    def encoders(self) -> dict[str, nn.Module]:
        """The backbone, followed by the (eval-mode) whitening layer when there is one."""
        if self.whitening is None:
            return {"backbone": self.backbone}
        return {"backbone": WhitenedBackbone(self.backbone, self.whitening)}
