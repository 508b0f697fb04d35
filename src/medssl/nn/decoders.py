"""Convolutional decoders over an encoder's multi-scale features, 2D and 3D (``spatial_dims``).

:class:`UNetDecoder` is the U-Net expanding path (Ronneberger et al., "U-Net: Convolutional Networks for
Biomedical Image Segmentation", MICCAI 2015; Çiçek et al. 2016 for 3D) on top of any encoder that returns a
list of feature maps from fine to coarse: starting from the coarsest map, each step upsamples to the next
finer map's size, concatenates that skip connection and applies ``num_convs`` × (conv 3, norm, ReLU). A
final block at the output resolution and a 1x1 convolution give ``out_channels`` maps. It serves masked
image modelling (``cnnmim``: reconstruct the image) and segmentation (predict class logits) alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medssl.nn.layers import conv, linear_mode, make_norm

__all__ = ["NORMS", "ConvBlock", "UNetDecoder", "default_decoder_channels"]

#: normalisations of the decoders' convolution blocks
NORMS = ("batch", "instance", "none")


class ConvBlock(nn.Sequential):
    """``num_convs`` × (3x3(x3) convolution, normalisation, ReLU).

    Args:
        in_channels: input channels.
        out_channels: output channels of every convolution.
        spatial_dims: 2 or 3.
        num_convs: convolutions in the block.
        norm: ``batch``, ``instance`` or ``none`` (:func:`medssl.nn.layers.make_norm`).

    Raises:
        ValueError: another norm or ``spatial_dims``.
    """

    def __init__(self, in_channels: int, out_channels: int, spatial_dims: int, num_convs: int = 2,
                 norm: str = "batch") -> None:
        if norm not in NORMS:
            raise ValueError(f"norm must be 'batch', 'instance' or 'none', got '{norm}'")
        conv_cls = conv(spatial_dims)
        layers: list[nn.Module] = []
        for i in range(num_convs):
            layers += [
                conv_cls(in_channels if i == 0 else out_channels, out_channels, 3, padding=1, bias=norm == "none"),
                make_norm(norm, spatial_dims, out_channels),
                nn.ReLU(inplace=True),
            ]
        super().__init__(*layers)


def default_decoder_channels(encoder_channels: Sequence[int], minimum: int = 16) -> tuple[int, ...]:
    """Decoder widths of a light U-Net: half the width of the skip each stage joins (at least ``minimum``).

    Returns one width per skip level, coarse to fine (``len(encoder_channels) - 1`` values).
    """
    skips = list(encoder_channels[:-1])[::-1]
    return tuple(max(minimum, int(c) // 2) for c in skips)


class UNetDecoder(nn.Module):
    """U-Net expanding path over multi-scale encoder features, for 2D or 3D.

    Example:
        >>> dec = UNetDecoder([64, 64, 128, 256, 512], spatial_dims=2, out_channels=1)
        >>> out = dec(features, out_shape=(64, 64))  # features: fine → coarse, e.g. ResNet stem, layer1..4

    Args:
        encoder_channels: channels of the encoder's feature maps, finest first, coarsest last (at least 1).
        spatial_dims: 2 or 3.
        out_channels: channels of the output (1 for grayscale reconstruction, classes for segmentation).
        decoder_channels: width after joining each skip, coarse to fine (``len(encoder_channels) - 1``
            values); default :func:`default_decoder_channels`.
        final_channels: width of the block at the output resolution (default: half the last decoder width,
            at least 16); ``0`` = no final block (the 1x1 head applies to the upsampled features).
        num_convs: convolutions per block (2 as in U-Net; 1 for an even lighter decoder).
        norm: ``batch``, ``instance`` or ``none``.
        upsample_mode: ``nearest`` or ``linear`` (bi/trilinear) upsampling before each skip.

    Raises:
        ValueError: inconsistent channel lists.
    """

    def __init__(
        self,
        encoder_channels: Sequence[int],
        spatial_dims: int,
        out_channels: int,
        decoder_channels: Sequence[int] | None = None,
        final_channels: int | None = None,
        num_convs: int = 2,
        norm: str = "batch",
        upsample_mode: str = "nearest",
    ) -> None:
        super().__init__()
        enc = [int(c) for c in encoder_channels]
        if not enc or any(c < 1 for c in enc):
            raise ValueError(f"encoder_channels must be positive channel counts, got {encoder_channels!r}")
        dec = tuple(decoder_channels) if decoder_channels else default_decoder_channels(enc)
        if len(dec) != len(enc) - 1:
            raise ValueError(
                f"decoder_channels needs {len(enc) - 1} values (one per skip connection), got {tuple(dec)}"
            )
        if upsample_mode not in ("nearest", "linear"):
            raise ValueError(f"upsample_mode must be 'nearest' or 'linear', got '{upsample_mode}'")
        self.spatial_dims = spatial_dims
        self.encoder_channels = tuple(enc)
        self.decoder_channels = tuple(int(c) for c in dec)
        self.upsample_mode = upsample_mode
        skips = enc[:-1][::-1]
        blocks = []
        width = enc[-1]
        for skip, out in zip(skips, self.decoder_channels, strict=True):
            blocks.append(ConvBlock(width + skip, out, spatial_dims, num_convs, norm))
            width = out
        self.blocks = nn.ModuleList(blocks)
        fc = max(16, width // 2) if final_channels is None else int(final_channels)
        self.final = ConvBlock(width, fc, spatial_dims, num_convs, norm) if fc > 0 else nn.Identity()
        self.head = conv(spatial_dims)(fc if fc > 0 else width, out_channels, 1)
        self.out_channels = out_channels

    def _up(self, x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        if tuple(x.shape[2:]) == tuple(shape):
            return x
        if self.upsample_mode == "nearest":
            return F.interpolate(x, size=tuple(shape), mode="nearest")
        return F.interpolate(x, size=tuple(shape), mode=linear_mode(self.spatial_dims), align_corners=False)

    def forward(self, features: Sequence[torch.Tensor], out_shape: Sequence[int] | None = None) -> torch.Tensor:
        """Decode.

        Args:
            features: one map per encoder level, finest first, with the channels given at construction.
            out_shape: spatial size of the output (default: that of the finest feature map).

        Returns:
            ``(B, out_channels, *out_shape)``.
        """
        if len(features) != len(self.encoder_channels):
            raise ValueError(f"expected {len(self.encoder_channels)} feature maps, got {len(features)}")
        x = features[-1]
        for block, skip in zip(self.blocks, list(features[:-1])[::-1], strict=True):
            x = block(torch.cat([self._up(x, skip.shape[2:]), skip], dim=1))
        x = self._up(x, out_shape if out_shape is not None else features[0].shape[2:])
        return self.head(self.final(x))
