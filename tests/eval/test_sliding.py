"""Sliding-window evaluation of whole 3D volumes: equal to whole-volume inference where the window covers the
volume, Dice on the whole volume, and the 3D segment protocol with a window."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medssl.data.phantoms import PhantomDataset
from medssl.encoders import random_encoder
from medssl.errors import ConfigError
from medssl.eval.images import ImageTask
from medssl.eval.metrics import dice_jaccard
from medssl.eval.protocol import run_protocol
from medssl.eval.sliding import sliding_features, sliding_logits, window_starts
from medssl.nn.segmentation import SegmentationNet


def test_window_covering_the_volume_equals_whole_volume_inference() -> None:
    torch.manual_seed(0)
    enc = random_encoder("resnet10_3d", in_chans=1, image_size=16, spatial_dims=3)
    net = SegmentationNet(enc, 2, 1, (16, 16, 16)).eval()
    x = torch.rand(2, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(sliding_logits(net, x, 16, overlap=0.5), net(x))
        torch.testing.assert_close(sliding_features(enc.eval(), x, 16), enc(x))


class _Threshold(torch.nn.Module):
    """A voxel-wise 'segmenter': foreground logit = intensity - t (no context, so windows cannot change it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([0.5 - x, x - 0.5], dim=1)


def test_dice_on_a_phantom_volume_with_its_known_mask() -> None:
    ds = PhantomDataset("phantom3d", n=4, image_size=32)
    item = ds[0]
    image, mask = item["image"][None], item["mask"][None].numpy()
    whole = _Threshold()(image).argmax(1).numpy()
    slid = sliding_logits(_Threshold(), image, 12, overlap=0.5, sw_batch_size=3).argmax(1).numpy()
    np.testing.assert_array_equal(slid, whole)  # windows of 12 over a 32^3 volume, overlaps averaged
    d, j = dice_jaccard(slid, mask, 2)
    a, b = slid[0] == 1, mask[0] == 1
    expected = 2 * (a & b).sum() / (a.sum() + b.sum()) if a.sum() + b.sum() else math.nan
    assert d[0, 1] == pytest.approx(expected)
    assert j[0, 1] == pytest.approx((a & b).sum() / (a | b).sum())


def test_sliding_features_average_the_windows() -> None:
    assert window_starts(32, 16, 0.5) == [0, 8, 16] and window_starts(20, 16, 0.25) == [0, 4] and \
        window_starts(8, 16, 0.5) == [0]

    class Mean(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(2, 3, 4))

    x = torch.rand(1, 1, 20, 16, 16)
    expected = (x[:, :, :16].mean(dim=(2, 3, 4)) + x[:, :, 4:].mean(dim=(2, 3, 4))) / 2
    torch.testing.assert_close(sliding_features(Mean(), x, 16, overlap=0.25), expected)
    with pytest.raises(ValueError, match="overlap"):
        sliding_features(Mean(), x, 16, overlap=1.0)


def test_3d_segment_protocol_with_a_sliding_window() -> None:
    ds = PhantomDataset("phantom3d", n=20, image_size=24)
    task = ImageTask.from_dataset(ds, random_encoder("resnet10_3d", in_chans=1, image_size=16, spatial_dims=3))
    row = run_protocol(task, "segment", [1.0], [0], epochs=1, batch_size=4, n_boot=0, window=16, overlap=0.5)[0]
    d = row["metrics"]["dice"]
    assert math.isnan(d) or 0.0 <= d <= 1.0
    assert row["params"]["window"] == [16, 16, 16] and row["params"]["overlap"] == 0.5
    with pytest.raises(ConfigError, match="window must be a 3D window side in \\[2, 24\\]"):
        run_protocol(task, "segment", [1.0], [0], epochs=1, batch_size=4, n_boot=0, window=40)
    with pytest.raises(ConfigError, match="overlap must be in"):
        run_protocol(task, "segment", [1.0], [0], epochs=1, batch_size=4, n_boot=0, window=16, overlap=1.5)
