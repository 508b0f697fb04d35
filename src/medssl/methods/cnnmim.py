"""cnnmim: masked image modelling for CNN encoders, 2D and 3D.

Inspired by Fernandez-Quilez et al., "Self-supervised learning for 3D prostate MRI with masked image
modelling" (arXiv 2212.14267), who pretrain a 3D CNN on T2w prostate MRI by reconstructing masked regions and
compare several masking strategies. They published neither code nor their exact architecture, so medssl's
version is an implementation of the idea with documented choices, built the way SparK does it (Tian et al.,
"Designing BERT for Convolutional Networks: Sparse and Hierarchical Masked Modeling", ICLR 2023):

* the image (one light crop + flip view) is cut into mask units of ``mask_patch_size`` pixels / voxels and a
  fraction is masked with any strategy of :mod:`medssl.transforms.masking` (random, block, center, slice,
  tube); masked units are set to 0 (the mean of the normalised image) or to a learnable token;
* a ResNet (timm in 2D, :mod:`medssl.nn.backbones3d` in 3D) encodes the masked image as if it were *sparse*:
  after every convolution, normalisation, pooling and stage, masked positions are set back to zero (the mask
  resized to that layer's resolution), and BatchNorm statistics are computed over visible positions only.
  A plain CNN would fill the holes from their neighbours layer after layer ("mask pattern vanishing" in
  SparK), see a distribution no real image has, and learn BatchNorm statistics skewed by the holes;
* the masked positions of each stage's features are filled with a learnable per-stage mask token
  ("densifying", SparK), and a light U-Net decoder (:class:`medssl.nn.decoders.UNetDecoder`) reconstructs the
  image from all stages;
* the loss is the mean squared error over the masked pixels / voxels only, against per-patch normalised
  targets by default (``norm_pix_loss``, as MAE and SparK).

The encoder that is exported and evaluated is the plain ResNet: its state dict has timm's (2D) or the
medssl ResNet-3D (3D) key layout; the sparse BatchNorm is a drop-in subclass with the same parameters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from medssl.errors import ConfigError
from medssl.methods import register
from medssl.methods.base import (
    BackboneMethod,
    DataInfo,
    MethodConfig,
    StepOutput,
    ViewSpec,
    VisualPanel,
)
from medssl.nn.decoders import UNetDecoder
from medssl.transforms.intensity import MEAN, STD, normalize
from medssl.transforms.masking import (
    MaskConfig,
    grid_shape_for,
    mask_grid,
    num_masked,
    resize_mask,
    upsample_mask,
)
from medssl.transforms.views import ViewConfig, ViewSampler

__all__ = [
    "CNNMIM",
    "CNNMIMConfig",
    "MaskState",
    "SparseBatchNorm2d",
    "SparseBatchNorm3d",
    "masked_reconstruction_loss",
    "patchify_pixels",
    "sparse_batch_norm",
    "unpatchify_pixels",
]

_CONV = (nn.Conv2d, nn.Conv3d)
_POOL = (nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool2d, nn.AvgPool3d)
_STAGES = ("layer1", "layer2", "layer3", "layer4")


@dataclass
class CNNMIMConfig(MethodConfig):
    """cnnmim hyper-parameters (the recipe's ``method:`` section).

    Attributes:
        mask_strategy: ``random``, ``block``, ``center``, ``slice`` or ``tube`` (3D only); see
            :mod:`medssl.transforms.masking`.
        mask_ratio: fraction of mask units masked, in ``(0, 1)`` (0.6 as in SparK).
        mask_patch_size: side of one mask unit in pixels / voxels; the image size must be a multiple of it.
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
    mask_patch_size: int = 8
    norm_pix_loss: bool = True
    input_fill: str = "zero"
    densify: bool = True
    sparse: bool = True
    decoder_channels: tuple[int, ...] = ()
    decoder_convs: int = 2
    augment: str = "light"
    vis_samples: int = 4

    def __post_init__(self) -> None:
        self.decoder_channels = tuple(int(c) for c in self.decoder_channels)
        self.mask_config()  # validates strategy, ratio, patch size
        if not 0.0 < float(self.mask_ratio) < 1.0:
            raise ConfigError(
                f"method.mask_ratio must be in (0, 1) for cnnmim (something to reconstruct), got {self.mask_ratio}"
            )
        if self.input_fill not in ("zero", "token"):
            raise ConfigError(f"method.input_fill must be 'zero' or 'token', got '{self.input_fill}'")
        if self.augment not in ("light", "views"):
            raise ConfigError(f"method.augment must be 'light' or 'views', got '{self.augment}'")
        if self.decoder_channels and len(self.decoder_channels) != 4:
            raise ConfigError(
                f"method.decoder_channels needs 4 widths (coarse to fine) or none, got {list(self.decoder_channels)}"
            )
        if self.decoder_convs < 1:
            raise ConfigError(f"method.decoder_convs must be >= 1, got {self.decoder_convs}")
        if self.vis_samples < 1:
            raise ConfigError(f"method.vis_samples must be >= 1, got {self.vis_samples}")

    def mask_config(self) -> MaskConfig:
        """The :class:`~medssl.transforms.masking.MaskConfig` these settings describe."""
        return MaskConfig(strategy=self.mask_strategy, ratio=self.mask_ratio, patch_size=self.mask_patch_size)


# -- sparse-convolution emulation --------------------------------------------------------------------------
class MaskState:
    """The current pixel-level mask of a forward pass, resized (and cached) to every layer's resolution.

    ``None`` outside a masked forward: hooks and sparse BatchNorm then do nothing, so the encoder behaves as
    the plain network (evaluation, export).
    """

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None
        self._cache: dict[tuple[int, ...], torch.Tensor] = {}

    @contextlib.contextmanager
    def active(self, mask: torch.Tensor | None) -> Iterator[None]:
        """Within the block, layers see ``mask`` (``(B, 1, *spatial)`` bool, ``True`` = masked)."""
        self.mask, self._cache = mask, {}
        try:
            yield
        finally:
            self.mask, self._cache = None, {}

    def visible(self, shape: Sequence[int]) -> torch.Tensor | None:
        """``(B, 1, *shape)`` float, 1 where visible (:func:`~medssl.transforms.masking.resize_mask`)."""
        if self.mask is None:
            return None
        key = tuple(int(s) for s in shape)
        vis = self._cache.get(key)
        if vis is None:
            vis = (~resize_mask(self.mask, key)).float()
            self._cache[key] = vis
        return vis

    def zero_masked(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
        """Forward hook: the output with masked positions set to zero."""
        vis = self.visible(output.shape[2:])
        return None if vis is None else output * vis.to(output.dtype)


def sparse_batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """BatchNorm over the visible positions only; masked positions of the output are zero.

    In training mode the mean and (biased) variance are taken over visible positions of the batch and the
    running statistics are updated with them (unbiased variance, as :class:`torch.nn.BatchNorm2d`); in
    evaluation mode the running statistics are used. SparK's "sparse BatchNorm".

    Args:
        bn: the BatchNorm module (its parameters, buffers, ``eps`` and ``momentum``).
        x: ``(B, C, *spatial)``.
        visible: ``(B, 1, *spatial)`` float, 1 = visible.
    """
    dims = [0, *range(2, x.ndim)]
    shape = (1, -1) + (1,) * (x.ndim - 2)
    xf = x.float()
    use_batch = bn.training or bn.running_mean is None
    if use_batch:
        n = visible.sum() * 1.0
        n_safe = n.clamp(min=1.0)
        mean = (xf * visible).sum(dims) / n_safe
        var = ((xf - mean.view(shape)).square() * visible).sum(dims) / n_safe
        if bn.training and bn.track_running_stats and bn.running_mean is not None:
            with torch.no_grad():
                bn.num_batches_tracked.add_(1)
                factor = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
                unbiased = var * n / (n - 1).clamp(min=1.0)
                bn.running_mean.mul_(1 - factor).add_(mean.detach().to(bn.running_mean.dtype), alpha=factor)
                bn.running_var.mul_(1 - factor).add_(unbiased.detach().to(bn.running_var.dtype), alpha=factor)
    else:
        mean, var = bn.running_mean.float(), bn.running_var.float()
    y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + bn.eps)
    if bn.affine:
        y = y * bn.weight.float().view(shape) + bn.bias.float().view(shape)
    return (y * visible).to(x.dtype)


class _SparseBatchNormMixin:
    """Sparse BatchNorm while a :class:`MaskState` holds a mask, plain BatchNorm otherwise."""

    mask_state: MaskState | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vis = self.mask_state.visible(x.shape[2:]) if self.mask_state is not None else None
        if vis is None:
            return super().forward(x)  # type: ignore[misc]
        return sparse_batch_norm(self, x, vis)  # type: ignore[arg-type]


class SparseBatchNorm2d(_SparseBatchNormMixin, nn.BatchNorm2d):
    """:class:`torch.nn.BatchNorm2d` with the same parameters and buffers, sparse under a mask."""


class SparseBatchNorm3d(_SparseBatchNormMixin, nn.BatchNorm3d):
    """:class:`torch.nn.BatchNorm3d` with the same parameters and buffers, sparse under a mask."""


def sparsify(backbone: nn.Module, state: MaskState) -> list[Any]:
    """Make ``backbone`` behave as a sparse CNN while ``state`` holds a mask; returns the hook handles.

    Replaces every ``BatchNorm2d/3d`` by its sparse subclass (same state-dict keys and values) and zeroes
    masked positions after every convolution, pooling layer and ResNet stage.
    """
    for name, module in list(backbone.named_modules()):
        if type(module) in (nn.BatchNorm2d, nn.BatchNorm3d):
            cls = SparseBatchNorm2d if isinstance(module, nn.BatchNorm2d) else SparseBatchNorm3d
            new = cls(module.num_features, eps=module.eps, momentum=module.momentum, affine=module.affine,
                      track_running_stats=module.track_running_stats,
                      device=module.weight.device if module.affine else None)
            new.load_state_dict(module.state_dict())
            new.mask_state = state
            parent_name, _, child = name.rpartition(".")
            setattr(backbone.get_submodule(parent_name) if parent_name else backbone, child, new)
    handles = []
    for name, module in backbone.named_modules():
        if isinstance(module, _CONV + _POOL) or name in _STAGES:
            handles.append(module.register_forward_hook(state.zero_masked))
    return handles


# -- pixels <-> patches and the loss ------------------------------------------------------------------------
def patchify_pixels(x: torch.Tensor, patch_size: Sequence[int]) -> torch.Tensor:
    """``(B, C, *S)`` → ``(B, *grid, C * prod(patch))``, each row one mask unit's pixels (channel-major)."""
    sd = x.ndim - 2
    b, c = x.shape[:2]
    grid = [s // p for s, p in zip(x.shape[2:], patch_size, strict=True)]
    split = [b, c]
    for g, p in zip(grid, patch_size, strict=True):
        split += [g, p]
    x = x.reshape(split)
    grid_axes = [2 + 2 * i for i in range(sd)]
    patch_axes = [3 + 2 * i for i in range(sd)]
    return x.permute(0, *grid_axes, 1, *patch_axes).reshape(b, *grid, -1)


def unpatchify_pixels(p: torch.Tensor, patch_size: Sequence[int], channels: int) -> torch.Tensor:
    """Inverse of :func:`patchify_pixels`."""
    sd = len(patch_size)
    b, grid = p.shape[0], list(p.shape[1 : 1 + sd])
    x = p.reshape(b, *grid, channels, *patch_size)
    order = [0, sd + 1]
    for i in range(sd):
        order += [1 + i, sd + 2 + i]
    x = x.permute(order)
    return x.reshape(b, channels, *[g * s for g, s in zip(grid, patch_size, strict=True)])


def _patch_norm(target: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    mean = target.mean(dim=-1, keepdim=True)
    std = (target.var(dim=-1, keepdim=True) + eps).sqrt()
    return mean, std


def masked_reconstruction_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    patch_size: Sequence[int],
    *,
    norm_pix: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Mean squared error over the masked pixels / voxels only.

    ``L = Σ_{masked units u} mean_{pixels i of u} (pred_i − t_i)² / #masked units``, where ``t`` is the target
    itself or, with ``norm_pix``, the target normalised per unit: ``t = (x − mean_u) / sqrt(var_u + eps)``
    (unbiased variance over the unit's pixels and channels, as MAE). All units have the same size, so this
    is the MSE over every masked pixel.

    Args:
        pred: ``(B, C, *S)`` prediction.
        target: ``(B, C, *S)`` image (normalised).
        mask: ``(B, *grid)`` bool, ``True`` = masked, ``grid = S // patch_size``.
        patch_size: the unit size per spatial axis.
        norm_pix: normalise the targets per unit.
        eps: added to the variance.
    """
    p = patchify_pixels(pred.float(), patch_size)
    t = patchify_pixels(target.float(), patch_size)
    if norm_pix:
        mean, std = _patch_norm(t, eps)
        t = (t - mean) / std
    per_unit = (p - t).square().mean(dim=-1)
    m = mask.to(per_unit.dtype)
    return (per_unit * m).sum() / m.sum().clamp(min=1.0)


# -- the method ----------------------------------------------------------------------------------------------
def _check_resnet(backbone: nn.Module, name: str) -> None:
    missing = [a for a in ("conv1", "bn1", "act1", "maxpool", *_STAGES) if not hasattr(backbone, a)]
    if missing:
        raise ConfigError(
            f"cnnmim needs a ResNet-style CNN (conv1, bn1, act1, maxpool, layer1..layer4), e.g. resnet18, resnet50, "
            f"resnet18_3d; '{name}' lacks {', '.join(missing)}. For ViTs use mae."
        )


def _stage_channels(backbone: nn.Module) -> list[int]:
    """Channels of the stem output and of every stage (the last convolution of a stage's last block)."""
    chans = [int(backbone.bn1.num_features)]
    for stage in _STAGES:
        convs = [m for m in getattr(backbone, stage)[-1].modules() if isinstance(m, _CONV)]
        chans.append(int(convs[-1].out_channels))
    return chans


@register
class CNNMIM(BackboneMethod):
    """Masked image modelling for CNNs (sparse ResNet encoder + U-Net decoder), 2D and 3D."""

    name = "cnnmim"
    description = ("CNN masked image modelling, 2D/3D, sparse ResNet + U-Net decoder, five masking strategies "
                   "(inspired by Fernandez-Quilez et al. 2022; SparK-style)")
    config_cls = CNNMIMConfig
    default_lr = 1e-3
    default_optimizer = "adamw"
    paper = ("Fernandez-Quilez et al., Self-supervised learning for 3D prostate MRI with masked image modelling, "
             "arXiv 2212.14267; Tian et al., SparK, ICLR 2023")
    view_spec = ViewSpec(num_views=1, needs_masks=False)  # masks are drawn inside the step

    def __init__(self, cfg: Any, data: DataInfo) -> None:
        super().__init__()
        m = CNNMIMConfig(**cfg.method)
        self.hparams = m
        self.spatial_dims = data.spatial_dims
        self.in_chans = data.in_chans
        self.image_size = data.image_size
        self.image_shape = (data.image_size,) * data.spatial_dims
        self.mask_cfg = m.mask_config()
        self.patch = (m.mask_patch_size,) * data.spatial_dims
        try:
            self.grid = grid_shape_for(self.image_shape, self.patch)
        except ConfigError as e:
            raise ConfigError(f"cnnmim: {e} (method.mask_patch_size={m.mask_patch_size}, image size "
                              f"{data.image_size})") from None
        if num_masked(self.mask_cfg, self.grid) == 0:
            raise ConfigError(
                f"cnnmim: mask ratio {m.mask_ratio} masks no unit of the {self.grid} grid; raise method.mask_ratio "
                "or lower method.mask_patch_size"
            )
        self.build_backbone(cfg, data)
        _check_resnet(self.backbone, cfg.model.backbone)
        self.mask_state = MaskState()
        self._hooks = sparsify(self.backbone, self.mask_state)
        chans = _stage_channels(self.backbone)
        self.decoder = UNetDecoder(chans, data.spatial_dims, data.in_chans,
                                   decoder_channels=m.decoder_channels or None, num_convs=m.decoder_convs)
        token_shape = (1,) * data.spatial_dims
        self.mask_tokens = nn.ParameterList(
            [nn.Parameter(nn.init.trunc_normal_(torch.zeros(1, c, *token_shape), std=0.02)) for c in chans]
        ) if m.densify else None
        self.input_token = nn.Parameter(torch.zeros(1, data.in_chans, *token_shape)) if m.input_fill == "token" else None
        views: ViewConfig = cfg.views
        if m.augment == "light":
            views = ViewConfig(crop_scale=views.crop_scale, crop_ratio=views.crop_ratio, flip_p=views.flip_p,
                               flip_axes=views.flip_axes, intensity_p=0.0, blur_p=0.0, noise_std=0.0)
        self.views = ViewSampler(views, data.image_size, data.spatial_dims)

    # -- pieces ---------------------------------------------------------------------------------------------
    def draw_mask(self, batch_size: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(B, *grid)`` bool unit mask (global CPU RNG unless ``generator``; same on every device)."""
        return mask_grid(self.mask_cfg, batch_size, self.grid, generator=generator, device=device)

    def encode(self, x: torch.Tensor, mask_pix: torch.Tensor | None) -> list[torch.Tensor]:
        """Multi-scale features (stem, layer1..layer4) of an already masked input, sparse under ``mask_pix``.

        Args:
            x: ``(B, C, *S)`` normalised input (masked units already filled).
            mask_pix: ``(B, 1, *S)`` bool mask, or ``None`` for the plain dense network.
        """
        b = self.backbone
        with self.mask_state.active(mask_pix if self.hparams.sparse else None):
            h = b.act1(b.bn1(b.conv1(x)))
            feats = [h]
            h = b.maxpool(h)
            for stage in _STAGES:
                h = getattr(b, stage)(h)
                feats.append(h)
        return feats

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
        loss = masked_reconstruction_loss(pred, x, mask, self.patch, norm_pix=self.hparams.norm_pix_loss)
        return StepOutput(loss=loss, logs={"mask_ratio": mask.float().mean()})  # a tensor: read back on log steps only

    def visualize(self, batch: dict[str, Any], step: int) -> list[VisualPanel] | None:
        """Masked input, mask, reconstruction (prediction in the masked units, input elsewhere), target."""
        images = batch["image"][: self.hparams.vis_samples]
        x = normalize(images) if tuple(images.shape[2:]) == self.image_shape else self._view(images)
        mask = self.draw_mask(x.shape[0], x.device)
        pred, mask_pix = self.reconstruct(x, mask)
        if self.hparams.norm_pix_loss:  # back from per-patch normalised units to image values
            t = patchify_pixels(x.float(), self.patch)
            mean, std = _patch_norm(t, 1e-6)
            pred = unpatchify_pixels(patchify_pixels(pred.float(), self.patch) * std + mean, self.patch, x.shape[1])
        recon = torch.where(mask_pix, pred.to(x.dtype), x)

        def show(v: torch.Tensor) -> torch.Tensor:
            return v * STD + MEAN

        return [VisualPanel(scale="1x", columns={
            "input": show(x) * (~mask_pix),
            "mask": mask_pix.float(),
            "reconstruction": show(recon),
            "target": show(x),
        })]

