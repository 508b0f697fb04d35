"""cnnmim: masked image modelling for CNN encoders, 2D and 3D.

Inspired by Fernandez-Quilez et al., "Self-supervised learning for 3D prostate MRI with masked image
modelling" (arXiv 2212.14267), who pretrain a 3D CNN on T2w prostate MRI by reconstructing masked regions and
compare several masking strategies. They published neither code nor their exact architecture, so medssl's
version is an implementation of the idea with documented choices, built the way SparK does it (Tian et al.,
"Designing BERT for Convolutional Networks: Sparse and Hierarchical Masked Modeling", ICLR 2023):

* the image (one light crop + flip view) is cut into mask units of ``mask_patch_size`` pixels / voxels — by
  default the encoder's total stride (32 px for a ResNet, 8 with the CIFAR stem), SparK's choice, so that
  every stage sees the same masked fraction as the input — and a fraction is masked with any strategy of
  :mod:`medssl.transforms.masking` (random, block, center, slice, tube); masked units are set to 0 (the mean
  of the normalised image) or to a learnable token;
* a ResNet (timm in 2D, :mod:`medssl.nn.backbones3d` in 3D) encodes the masked image as if it were *sparse*
  (:mod:`medssl.nn.sparse`): after every convolution, normalisation, pooling and stage, masked positions are
  set back to zero (the mask resized to that layer's resolution), and BatchNorm statistics are computed over
  visible positions only. A plain CNN would fill the holes from their neighbours layer after layer ("mask
  pattern vanishing" in SparK), see a distribution no real image has, and learn BatchNorm statistics skewed
  by the holes;
* the masked positions of each stage's features are filled with a learnable per-stage mask token
  ("densifying", SparK), and a light U-Net decoder (:class:`medssl.nn.decoders.UNetDecoder`) reconstructs the
  image from all stages;
* the loss is the mean squared error over the masked pixels / voxels only, against per-patch normalised
  targets by default (``norm_pix_loss``, as MAE and SparK): :func:`medssl.losses.reconstruction.masked_image_loss`,
  MAE's reconstruction loss on the same patches (:func:`medssl.nn.patches.patchify`).

The encoder that is exported and evaluated is the plain ResNet: its state dict has timm's (2D) or the
medssl ResNet-3D (3D) key layout; the sparse BatchNorm is a drop-in subclass with the same parameters.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from medssl.checks import FieldError, check_choice, check_range
from medssl.config import ModelConfig
from medssl.errors import ConfigError
from medssl.losses.reconstruction import denormalize_patches, masked_image_loss
from medssl.methods.base import (
    BackboneMethod,
    DataInfo,
    MethodConfig,
    StepOutput,
    VisualPanel,
    check_mask_units,
)
from medssl.methods.registry import register
from medssl.nn.backbones import build_backbone, output_stride
from medssl.nn.decoders import UNetDecoder
from medssl.nn.layers import CONV_TYPES
from medssl.nn.patches import patchify, unpatchify
from medssl.nn.segmentation import is_resnet_like, multiscale_features
from medssl.nn.sparse import RESNET_STAGES, MaskState, sparsify
from medssl.transforms.intensity import denormalize, normalize
from medssl.transforms.masking import MaskConfig, grid_shape_for, mask_grid, resize_mask, upsample_mask
from medssl.transforms.views import ViewConfig, ViewSampler

if TYPE_CHECKING:
    from medssl.config import PretrainConfig

__all__ = ["CNNMIM", "CNNMIMConfig", "stage_masked_fractions"]

log = logging.getLogger("medssl")

INPUT_FILLS = ("zero", "token")
AUGMENTS = ("light", "views")


@dataclass
class CNNMIMConfig(MethodConfig):
    """cnnmim hyper-parameters (the recipe's ``method:`` section).

    Attributes:
        mask_strategy: ``random``, ``block``, ``center``, ``slice`` or ``tube`` (3D only); see
            :mod:`medssl.transforms.masking`.
        mask_ratio: fraction of mask units masked, in ``(0, 1)`` (0.6 as in SparK).
        mask_patch_size: side of one mask unit in pixels / voxels; the image size must be a multiple of it.
            ``0`` (default) = the encoder's total stride (SparK): then every stage's masked fraction equals the
            input's. A smaller unit is allowed for ablations, with a warning: a coarse position counts as masked
            only when everything it covers is, so the mask thins out and vanishes at the deep stages.
        norm_pix_loss: normalise each target patch by its own mean and std (MAE / SparK).
        input_fill: what masked input units hold: ``zero`` (the normalised mean) or ``token`` (one learnable
            value per channel).
        densify: fill the masked positions of every stage's features with a learnable per-stage token before
            the decoder (SparK); otherwise they stay zero.
        sparse: keep masked positions empty through the encoder (zero after every layer and stage, BatchNorm
            over visible positions). ``false`` gives a plain dense CNN on the zero-filled image, the leaky
            variant SparK argues against; for ablations only.
        decoder_channels: widths of the decoder stages, coarse to fine (4 values); empty = half of each skip.
        decoder_convs: convolutions per decoder stage (2 as in U-Net; 1 is lighter).
        augment: ``light`` (random resized crop + flips from the ``views:`` section, no intensity jitter,
            blur or noise, as MAE / SparK) or ``views`` (the ``views:`` section as it is).
        vis_samples: samples in the reconstruction figure.
    """

    mask_strategy: str = "random"
    mask_ratio: float = 0.6
    mask_patch_size: int = 0
    norm_pix_loss: bool = True
    input_fill: str = "zero"
    densify: bool = True
    sparse: bool = True
    decoder_channels: tuple[int, ...] = ()
    decoder_convs: int = 2
    augment: str = "light"
    vis_samples: int = 4

    def __post_init__(self) -> None:
        """Validate the values (recipes and ``--set`` overrides end up here).

        Raises:
            ConfigError: naming the first invalid field.
        """
        self.decoder_channels = tuple(int(c) for c in self.decoder_channels)
        check_range("mask_ratio", self.mask_ratio, gt=0, lt=1)  # (0: nothing to reconstruct)
        check_range("mask_patch_size", self.mask_patch_size, ge=0)
        self.mask_config()  # validates the strategy
        check_choice("input_fill", self.input_fill, INPUT_FILLS)
        check_choice("augment", self.augment, AUGMENTS)
        if self.decoder_channels and len(self.decoder_channels) != 4:
            raise FieldError("decoder_channels", f"needs 4 widths (coarse to fine) or none, got "
                                                 f"{list(self.decoder_channels)}")
        for width in self.decoder_channels:
            check_range("decoder_channels", width, ge=1)
        check_range("decoder_convs", self.decoder_convs, ge=1)
        check_range("vis_samples", self.vis_samples, ge=1)

    def mask_config(self, patch_size: int | None = None) -> MaskConfig:
        """The :class:`~medssl.transforms.masking.MaskConfig` these settings describe (``patch_size``: the resolved
        unit when ``mask_patch_size`` is 0)."""
        return MaskConfig(strategy=self.mask_strategy, ratio=self.mask_ratio,
                          patch_size=patch_size or self.mask_patch_size or 1)


def stage_masked_fractions(mask_pix: torch.Tensor, shapes: list[tuple[int, ...]]) -> list[float]:
    """The masked fraction of a pixel mask at each stage's resolution, as the sparse encoder sees it
    (:func:`~medssl.transforms.masking.resize_mask`: a position is masked only when everything it covers is).

    Args:
        mask_pix: ``(B, 1, *S)`` bool pixel mask.
        shapes: the spatial shapes of the stages' feature maps.
    """
    return [float(resize_mask(mask_pix, shape).float().mean()) for shape in shapes]


def _check_resnet(backbone: nn.Module, name: str) -> None:
    if not is_resnet_like(backbone):
        missing = [a for a in ("conv1", "bn1", "act1", "maxpool", *RESNET_STAGES) if not hasattr(backbone, a)]
        raise ConfigError(
            f"cnnmim needs a ResNet-style CNN (conv1, bn1, act1, maxpool, layer1..layer4), e.g. resnet18, resnet50, "
            f"resnet18_3d; model.backbone '{name}' lacks {', '.join(missing)}. For ViTs use mae."
        )


def _stage_channels(backbone: nn.Module) -> list[int]:
    """Channels of the stem output and of every stage (the last convolution of a stage's last block)."""
    chans = [int(backbone.bn1.num_features)]
    for stage in RESNET_STAGES:
        convs = [m for m in getattr(backbone, stage)[-1].modules() if isinstance(m, CONV_TYPES)]
        chans.append(int(convs[-1].out_channels))
    return chans


def _default_unit(stride: int, size: int, spatial_dims: int, model: ModelConfig) -> int:
    """The default mask unit: the encoder's total stride (SparK), or — where images are too small for that (fewer
    than 4 units, or not a multiple of it: a 16^3 sub-volume under a stride-32 ResNet) — the largest power-of-two
    unit below it that still cuts the image into at least 4 units, with a warning (the deep stages then see a
    diluted mask; the constructor reports the per-stage fractions)."""
    if size % stride == 0 and (size // stride) ** spatial_dims >= 4:
        return stride
    unit = stride
    while unit > 1 and not (size % unit == 0 and (size // unit) ** spatial_dims >= 4):
        unit //= 2
    if unit <= 1:
        return stride  # nothing fits: the constructor refuses with the keys named
    log.warning("cnnmim: %d px images hold fewer than 4 mask units of the encoder's total stride %d "
                "(model.backbone %s, model.stem %s); using %d px units instead. For small images prefer "
                "model.stem=cifar (total stride 8) so that every stage sees the input's masked fraction.",
                size, stride, model.backbone, model.stem, unit)
    return unit


@register
class CNNMIM(BackboneMethod[CNNMIMConfig]):
    """Masked image modelling for CNNs (sparse ResNet encoder + U-Net decoder), 2D and 3D."""

    name = "cnnmim"
    description = ("CNN masked image modelling, 2D/3D, sparse ResNet + U-Net decoder, five masking strategies "
                   "(inspired by Fernandez-Quilez et al. 2022; SparK-style)")
    config_cls = CNNMIMConfig
    default_lr = 1e-3
    default_optimizer = "adamw"
    paper = ("Fernandez-Quilez et al., Self-supervised learning for 3D prostate MRI with masked image modelling, "
             "arXiv 2212.14267; Tian et al., SparK, ICLR 2023")

    @classmethod
    def resolve_defaults(cls, cfg: PretrainConfig, data: DataInfo) -> None:
        """Record the mask unit in ``cfg.method`` when it defaults to the encoder's total stride (``0``)."""
        if int(cfg.method.get("mask_patch_size", 0) or 0) > 0:
            return
        try:
            net = build_backbone(cfg.model.backbone, in_chans=data.in_chans, image_size=data.image_size,
                                 stem=cfg.model.stem, spatial_dims=data.spatial_dims)
        except ConfigError:
            return  # the constructor reports it
        stride = int(output_stride(net) or 0)
        if stride:
            cfg.method["mask_patch_size"] = _default_unit(stride, data.image_size, data.spatial_dims, cfg.model)

    def __init__(self, hparams: CNNMIMConfig, model: ModelConfig, views: ViewConfig, data: DataInfo) -> None:
        """Build the sparse ResNet, the decoder and the mask tokens.

        Raises:
            ConfigError: a backbone that is not a ResNet, or mask units that do not fit the image, naming the keys.
        """
        super().__init__(hparams)
        m = self.hparams
        self.image_shape = (data.image_size,) * data.spatial_dims
        self.build_backbone(model, data)
        _check_resnet(self.backbone, model.backbone)
        self.stride = int(output_stride(self.backbone) or 1)
        unit = m.mask_patch_size or self.stride
        self.mask_cfg = m.mask_config(unit)
        self.patch = (unit,) * data.spatial_dims
        sizes = f"data.image_size {data.image_size}, method.mask_patch_size {unit}"
        if unit == self.stride:
            sizes += f" = the total stride of model.backbone {model.backbone} with model.stem {model.stem}"
        try:
            self.grid = grid_shape_for(self.image_shape, self.patch)
        except ConfigError as e:
            raise ConfigError(f"cnnmim: {e} ({sizes})") from None
        try:
            check_mask_units(self.mask_cfg, self.grid, values_per_unit=unit**data.spatial_dims * data.in_chans,
                             norm_pix=m.norm_pix_loss, sizes=sizes)
        except ConfigError as e:
            hint = ("; mask units follow the encoder's total stride, so for small images use model.stem=cifar "
                    "(total stride 8)" if unit >= self.stride > 8 and hasattr(self.backbone, "maxpool") else "")
            raise ConfigError(f"{e}{hint}") from None
        self.stage_shapes = self._stage_shapes(data)
        if unit % self.stride:
            probe = upsample_mask(mask_grid(self.mask_cfg, 1, self.grid, generator=torch.Generator().manual_seed(0)),
                                  self.patch)
            fractions = ", ".join(f"{f:.2f}" for f in stage_masked_fractions(probe, self.stage_shapes))
            log.warning("cnnmim: mask units of %d px are not a multiple of the encoder's total stride %d: the sparse "
                        "encoder's masked fraction per stage (stem, layer1..layer4) is %s instead of %.2f at every "
                        "stage; the deep stages train on a mostly visible image. Leave method.mask_patch_size at 0 "
                        "(= the stride) unless this is an ablation.", unit, self.stride, fractions,
                        float(probe.float().mean()))
        self.mask_state = MaskState()
        self._hooks = sparsify(self.backbone, self.mask_state)
        chans = _stage_channels(self.backbone)
        self.decoder = UNetDecoder(chans, data.spatial_dims, data.in_chans,
                                   decoder_channels=m.decoder_channels or None, num_convs=m.decoder_convs)
        token_shape = (1,) * data.spatial_dims
        self.mask_tokens = nn.ParameterList(
            [nn.Parameter(nn.init.trunc_normal_(torch.zeros(1, c, *token_shape), std=0.02)) for c in chans]
        ) if m.densify else None
        self.input_token = (nn.Parameter(torch.zeros(1, data.in_chans, *token_shape)) if m.input_fill == "token"
                            else None)
        if m.augment == "light":
            views = ViewConfig(crop_scale=views.crop_scale, crop_ratio=views.crop_ratio, flip_p=views.flip_p,
                               flip_axes=views.flip_axes, intensity_p=0.0, blur_p=0.0, noise_std=0.0)
        self.views = ViewSampler(views, data.image_size, data.spatial_dims)

    @torch.no_grad()
    def _stage_shapes(self, data: DataInfo) -> list[tuple[int, ...]]:
        """Spatial shapes of the stem and stage outputs for this image size (one probe forward, eval mode)."""
        was = self.backbone.training
        self.backbone.eval()
        probe = torch.zeros(1, data.in_chans, *self.image_shape, device=next(self.backbone.parameters()).device)
        shapes = [tuple(int(s) for s in f.shape[2:]) for f in multiscale_features(self.backbone, probe)]
        self.backbone.train(was)
        return shapes

    # -- pieces ---------------------------------------------------------------------------------------------
    def draw_mask(self, batch_size: int, device: torch.device,
                  generator: torch.Generator | None = None) -> torch.Tensor:
        """``(B, *grid)`` bool unit mask (global CPU RNG unless ``generator``; same on every device)."""
        return mask_grid(self.mask_cfg, batch_size, self.grid, generator=generator, device=device)

    def encode(self, x: torch.Tensor, mask_pix: torch.Tensor | None) -> list[torch.Tensor]:
        """Multi-scale features (stem, layer1..layer4) of an already masked input, sparse under ``mask_pix``.

        Args:
            x: ``(B, C, *S)`` normalised input (masked units already filled).
            mask_pix: ``(B, 1, *S)`` bool mask, or ``None`` for the plain dense network.
        """
        with self.mask_state.active(mask_pix if self.hparams.sparse else None):
            return multiscale_features(self.backbone, x)

    def reconstruct(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Predict the image from its visible units.

        Args:
            x: ``(B, C, *S)`` normalised images.
            mask: ``(B, *grid)`` bool unit mask.

        Returns:
            ``(prediction (B, C, *S), pixel mask (B, 1, *S) bool)``.
        """
        mask_pix = upsample_mask(mask, self.patch)
        visible = (~mask_pix).to(x.dtype)
        x_in = x * visible
        if self.input_token is not None:
            x_in = x_in + self.input_token.to(x.dtype) * (1 - visible)
        feats = self.encode(x_in, mask_pix)
        if self.mask_tokens is not None:
            feats = [torch.where(resize_mask(mask_pix, f.shape[2:]), tok.to(f.dtype), f)
                     for f, tok in zip(feats, self.mask_tokens, strict=True)]
        return self.decoder(feats, out_shape=x.shape[2:]), mask_pix

    def _view(self, images: torch.Tensor) -> torch.Tensor:
        return normalize(self.views(images).images)

    # -- contract -------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any]) -> StepOutput:
        x = self._view(batch["image"])
        mask = self.draw_mask(x.shape[0], x.device)
        pred, _ = self.reconstruct(x, mask)
        loss = masked_image_loss(pred, x, mask, self.patch, norm_pix=self.hparams.norm_pix_loss)
        return StepOutput(loss=loss, logs={"mask_ratio": mask.float().mean()})  # a tensor: read back on log steps only

    def visualize(self, batch: dict[str, Any], step: int) -> list[VisualPanel] | None:
        """Masked input, mask, reconstruction (prediction in the masked units, input elsewhere), target."""
        images = batch["image"][: self.hparams.vis_samples]
        x = normalize(images) if tuple(images.shape[2:]) == self.image_shape else self._view(images)
        mask = self.draw_mask(x.shape[0], x.device)
        pred, mask_pix = self.reconstruct(x, mask)
        if self.hparams.norm_pix_loss:  # back from per-patch normalised units to image values
            sd = len(self.patch)
            pred = denormalize_patches(patchify(pred.float(), self.patch, sd), patchify(x.float(), self.patch, sd))
            pred = unpatchify(pred, self.patch, self.grid, x.shape[1])
        recon = torch.where(mask_pix, pred.to(x.dtype), x)
        return [VisualPanel(scale="1x", columns={
            "input": denormalize(x) * (~mask_pix),
            "mask": mask_pix.float(),
            "reconstruction": denormalize(recon),
            "target": denormalize(x),
        })]
