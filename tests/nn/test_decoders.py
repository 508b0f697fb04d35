"""Tests of medssl.nn.decoders.UNetDecoder: shapes in 2D and 3D, the data flow against a hand-written
reference, gradients into every level, and configuration errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medssl.nn.decoders import UNetDecoder, default_decoder_channels


def _features(b: int, channels: list[int], shapes: list[tuple[int, ...]], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, c, *s, generator=g) for c, s in zip(channels, shapes, strict=True)]


@pytest.mark.parametrize(
    "sd,shapes,out_shape",
    [
        (2, [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)], (32, 32)),
        (2, [(13, 11), (7, 6), (4, 3), (2, 2), (1, 1)], (25, 21)),  # odd sizes from stride-2 convs
        (3, [(8, 8, 8), (4, 4, 4), (2, 2, 2), (1, 1, 1)], (16, 16, 16)),
    ],
)
def test_output_shape(sd: int, shapes: list[tuple[int, ...]], out_shape: tuple[int, ...]) -> None:
    channels = [8, 8, 16, 32, 64][: len(shapes)]
    dec = UNetDecoder(channels, spatial_dims=sd, out_channels=3)
    out = dec(_features(2, channels, shapes), out_shape=out_shape)
    assert out.shape == (2, 3, *out_shape)
    # Without out_shape the output has the finest map's size.
    assert dec(_features(2, channels, shapes)).shape == (2, 3, *shapes[0])


def test_default_channels_halve_the_skips() -> None:
    assert default_decoder_channels([64, 64, 128, 256, 512]) == (128, 64, 32, 32)
    assert default_decoder_channels([8, 16]) == (16,)
    dec = UNetDecoder([64, 64, 128, 256, 512], 2, 1)
    assert dec.decoder_channels == (128, 64, 32, 32)


def test_matches_hand_written_forward() -> None:
    """Two levels, one conv per block, no norm: the decoder equals the U-Net equations written out."""
    torch.manual_seed(0)
    dec = UNetDecoder([3, 5], 2, out_channels=2, decoder_channels=[4], final_channels=6, num_convs=1, norm="none")
    fine, coarse = _features(2, [3, 5], [(6, 6), (3, 3)], seed=1)
    out = dec([fine, coarse], out_shape=(12, 12))
    # Upsample the coarse map by nearest repetition, join the skip, conv 3x3 + ReLU.
    up = coarse.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    w1, b1 = dec.blocks[0][0].weight, dec.blocks[0][0].bias
    x = F.relu(F.conv2d(torch.cat([up, fine], 1), w1, b1, padding=1))
    # To the output size, final block, 1x1 head.
    x = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    x = F.relu(F.conv2d(x, dec.final[0].weight, dec.final[0].bias, padding=1))
    ref = F.conv2d(x, dec.head.weight, dec.head.bias)
    torch.testing.assert_close(out, ref)


def test_linear_upsampling_mode_3d() -> None:
    dec = UNetDecoder([2, 4], 3, 1, decoder_channels=[4], final_channels=0, num_convs=1, norm="none",
                      upsample_mode="linear")
    fine, coarse = _features(1, [2, 4], [(4, 4, 4), (2, 2, 2)], seed=2)
    out = dec([fine, coarse])
    up = F.interpolate(coarse, size=(4, 4, 4), mode="trilinear", align_corners=False)
    x = F.relu(F.conv3d(torch.cat([up, fine], 1), dec.blocks[0][0].weight, dec.blocks[0][0].bias, padding=1))
    torch.testing.assert_close(out, F.conv3d(x, dec.head.weight, dec.head.bias))


@pytest.mark.parametrize("sd", [2, 3])
def test_gradients_reach_every_level(sd: int) -> None:
    channels = [4, 8, 16]
    shapes = [(8,) * sd, (4,) * sd, (2,) * sd]
    feats = [f.requires_grad_() for f in _features(2, channels, shapes)]
    dec = UNetDecoder(channels, sd, 1, norm="instance")
    dec(feats, out_shape=(16,) * sd).square().mean().backward()
    for f in feats:
        assert f.grad is not None and f.grad.abs().sum() > 0
    assert all(p.grad is not None for p in dec.parameters())


def test_single_level_encoder() -> None:
    dec = UNetDecoder([8], 2, 2)
    assert dec(_features(1, [8], [(4, 4)]), out_shape=(8, 8)).shape == (1, 2, 8, 8)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"encoder_channels": [4, 8], "spatial_dims": 2, "out_channels": 1, "decoder_channels": [4, 4]},
         "one per skip"),
        ({"encoder_channels": [], "spatial_dims": 2, "out_channels": 1}, "positive"),
        ({"encoder_channels": [4, 8], "spatial_dims": 4, "out_channels": 1}, "spatial_dims"),
        ({"encoder_channels": [4, 8], "spatial_dims": 2, "out_channels": 1, "norm": "group"}, "norm"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        UNetDecoder(**kwargs)


def test_wrong_number_of_features() -> None:
    dec = UNetDecoder([4, 8], 2, 1)
    with pytest.raises(ValueError, match="expected 2 feature maps"):
        dec(_features(1, [4], [(4, 4)]))
