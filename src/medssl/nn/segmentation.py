"""Segmentation networks on a pretrained encoder, 2D and 3D: a U-Net decoder on a CNN's multi-scale features,
a progressive-upsampling decoder on a ViT's patch tokens.

* CNN (ResNet-style ``conv1 / bn1 / act1 / maxpool / layer1..4``: timm 2D ResNets and medssl's 3D ResNets;
  other timm CNNs through ``forward_intermediates``): the stem output and every stage's output feed
  :class:`medssl.nn.decoders.UNetDecoder` (Ronneberger et al. 2015; Çiçek et al. 2016 in 3D) as skips.
* ViT (timm 2D, :class:`medssl.nn.vit3d.ViT3d`): the final patch tokens, reshaped to their grid, go through
  :class:`ProgressiveUpsamplingDecoder`: ``log2(patch)`` steps of (conv 3, norm, ReLU, ×2 upsampling), then
  a 1×1 convolution — the "PUP" decoder of SETR (Zheng et al., CVPR 2021), in 2D or 3D.

The network takes ``[0, 1]`` images (the encoder's input normalisation is applied inside) and returns
``(B, num_classes, *spatial)`` logits at the input resolution.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medssl.errors import ConfigError
from medssl.nn.decoders import ConvBlock, UNetDecoder
from medssl.nn.layers import conv, linear_mode
from medssl.nn.whitening import Whitening, whiten_map
from medssl.transforms.intensity import normalize

__all__ = ["ProgressiveUpsamplingDecoder", "SegmentationNet", "core_backbone", "encoder_whitening", "is_resnet_like",
           "is_vit_like", "multiscale_features"]


def core_backbone(encoder: nn.Module) -> nn.Module:
    """The network inside an :class:`~medssl.nn.backbones.Encoder` (without a Med-MoCo whitening layer: see
    :func:`encoder_whitening`)."""
    net = getattr(encoder, "backbone", encoder)
    if hasattr(net, "whitening") and hasattr(net, "backbone"):  # Med-MoCo: the whitening follows the network
        net = net.backbone
    return net


def encoder_whitening(encoder: nn.Module) -> nn.Module | None:
    """The whitening layer that ends an encoder (Med-MoCo's :class:`~medssl.nn.whitening.WhitenedBackbone`: a
    :class:`~medssl.nn.whitening.Whitening` or its folded ``nn.Linear``), or ``None``."""
    net = getattr(encoder, "backbone", encoder)
    if hasattr(net, "whitening") and hasattr(net, "backbone"):
        return net.whitening
    return None


def is_vit_like(net: nn.Module) -> bool:
    """A ViT with ``patch_embed``, ``blocks`` and ``forward_features`` returning tokens (timm 2D, medssl 3D)."""
    return all(hasattr(net, a) for a in ("patch_embed", "blocks", "forward_features"))


def is_resnet_like(net: nn.Module) -> bool:
    """A ResNet with ``conv1 / bn1 / act1 / maxpool / layer1..4`` (timm 2D, medssl 3D)."""
    return all(hasattr(net, a) for a in ("conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3", "layer4"))


def multiscale_features(net: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Feature maps of a CNN from fine to coarse: ResNet stem output and ``layer1..layer4`` outputs, or timm's
    ``forward_intermediates`` for other timm CNNs. ``x`` is already normalised.

    Raises:
        ConfigError: a network that offers neither.
    """
    if is_resnet_like(net):
        h = net.act1(net.bn1(net.conv1(x)))
        feats = [h]
        h = net.maxpool(h)
        for stage in ("layer1", "layer2", "layer3", "layer4"):
            h = getattr(net, stage)(h)
            feats.append(h)
        return feats
    if hasattr(net, "forward_intermediates"):
        return list(net.forward_intermediates(x, intermediates_only=True))
    raise ConfigError(
        f"segmentation needs a ResNet-style CNN, a timm CNN with forward_intermediates, or a ViT; got "
        f"{type(net).__name__}"
    )


class ProgressiveUpsamplingDecoder(nn.Module):
    """SETR-PUP decoder: token grid → ``n`` × (conv block, ×2 upsampling) → 1×1 conv, 2D or 3D.

    Args:
        in_channels: token width.
        out_channels: classes.
        spatial_dims: 2 or 3.
        patch_size: the encoder's patch side per axis; ``ceil(log2(max patch))`` upsampling steps.
        channels: width of the first block; halved at every step (at least 16).
        norm: ``batch``, ``instance`` or ``none``.
    """

    def __init__(self, in_channels: int, out_channels: int, spatial_dims: int, patch_size: Sequence[int],
                 channels: int = 128, norm: str = "batch") -> None:
        super().__init__()
        steps = max(1, math.ceil(math.log2(max(int(p) for p in patch_size))))
        blocks = []
        width = in_channels
        for i in range(steps):
            out = max(16, channels // 2**i)
            blocks.append(ConvBlock(width, out, spatial_dims, num_convs=1, norm=norm))
            width = out
        self.blocks = nn.ModuleList(blocks)
        self.head = conv(spatial_dims)(width, out_channels, 1)
        self.spatial_dims = spatial_dims
        self.mode = linear_mode(spatial_dims)

    def forward(self, grid: torch.Tensor, out_shape: Sequence[int]) -> torch.Tensor:
        """``grid``: ``(B, D, *token_grid)``; returns ``(B, out_channels, *out_shape)``."""
        x = grid
        for i, block in enumerate(self.blocks):
            x = block(x)
            last = i == len(self.blocks) - 1
            size = tuple(out_shape) if last else tuple(min(2 * s, o)
                                                       for s, o in zip(x.shape[2:], out_shape, strict=True))
            x = F.interpolate(x, size=size, mode=self.mode, align_corners=False)
        return self.head(x)


class SegmentationNet(nn.Module):
    """Encoder + decoder producing per-pixel (per-voxel) class logits.

    Args:
        encoder: an :class:`~medssl.nn.backbones.Encoder` (normalisation + backbone) or a bare backbone.
        num_classes: output classes (background included).
        in_chans: image channels.
        image_shape: spatial input shape (used once to measure the feature maps).
        freeze_encoder: keep the encoder's weights and batch-norm statistics fixed (``eval()`` even when the
            network trains).

    A CNN encoder that ends with a whitening layer (Med-MoCo) feeds the decoder its **whitened** last feature map:
    the eval-mode whitening applied at every position (a 1×1 convolution), as Med-MoCo whitens that map.

    Raises:
        ConfigError: an encoder without usable dense features.
    """

    def __init__(self, encoder: nn.Module, num_classes: int, in_chans: int, image_shape: Sequence[int],
                 freeze_encoder: bool = False) -> None:
        super().__init__()
        self.encoder = encoder
        self.net = core_backbone(encoder)
        self.freeze_encoder = freeze_encoder
        self.spatial_dims = len(image_shape)
        self.kind = "vit" if is_vit_like(self.net) else "cnn"
        white = encoder_whitening(encoder) if self.kind == "cnn" else None
        if isinstance(white, Whitening):  # an in-memory layer: its eval-mode transform, as the export writes it
            white = white.to_linear()
            white.requires_grad_(not freeze_encoder)
        self.whitening = white
        was = self.net.training
        self.net.eval()
        with torch.no_grad():
            probe = torch.zeros(1, in_chans, *image_shape, device=next(self.net.parameters()).device)
            if self.kind == "vit":
                grid = self._tokens(probe)
                patch = [math.ceil(s / g) for s, g in zip(image_shape, grid.shape[2:], strict=True)]
                self.decoder: nn.Module = ProgressiveUpsamplingDecoder(grid.shape[1], num_classes, self.spatial_dims,
                                                                       patch)
            else:
                chans = [int(f.shape[1]) for f in multiscale_features(self.net, probe)]
                self.decoder = UNetDecoder(chans, self.spatial_dims, num_classes)
        self.net.train(was)
        if freeze_encoder:
            for p in self.encoder.parameters():
                p.requires_grad_(False)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.net.forward_features(x)
        prefix = int(getattr(self.net, "num_prefix_tokens", 1))
        grid = tuple(int(g) for g in self.net.patch_embed.grid_size)
        patches = tokens[:, prefix:]
        return patches.transpose(1, 2).reshape(x.shape[0], patches.shape[-1], *grid)

    def train(self, mode: bool = True) -> SegmentationNet:
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = normalize(images)
        shape = images.shape[2:]
        if self.kind == "vit":
            return self.decoder(self._tokens(x), shape)
        feats = multiscale_features(self.net, x)
        if self.whitening is not None:
            feats[-1] = whiten_map(self.whitening, feats[-1])
        return self.decoder(feats, out_shape=shape)
