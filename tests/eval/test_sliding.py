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


def test_3d_features_for_classification_slide_the_window_over_each_volume() -> None:
    """extract_features(window=...) gives, per volume, the mean of the encoder's features over the windows
    (written out here window by window), and the plain features where the window covers the volume."""
    from medssl.eval.features import extract_features
    from medssl.eval.sliding import window_starts

    torch.manual_seed(0)
    ds = PhantomDataset("phantom3d", n=3, image_size=24)
    enc = random_encoder("resnet10_3d", in_chans=1, image_size=16, spatial_dims=3).eval()
    idx = np.arange(3)
    got = extract_features(enc, ds, idx, batch_size=2, window=(16, 16, 16), overlap=0.5)
    starts = window_starts(24, 16, 0.5)
    assert starts == [0, 8]
    with torch.no_grad():
        for i in idx:
            x = ds[int(i)]["image"][None]
            crops = [x[..., a:a + 16, b:b + 16, c:c + 16] for a in starts for b in starts for c in starts]
            expected = torch.stack([enc(c)[0] for c in crops]).mean(0).numpy()
            np.testing.assert_allclose(got[i], expected, rtol=1e-4, atol=1e-5)
    whole = extract_features(enc, ds, idx, batch_size=2)
    np.testing.assert_allclose(extract_features(enc, ds, idx, batch_size=2, window=(24, 24, 24)), whole,
                               rtol=1e-5, atol=1e-6)
    assert not np.allclose(got, whole, atol=1e-4)


def test_evaluate_window_on_3d_volumes(tmp_path) -> None:
    from medssl.api import evaluate

    res = evaluate("phantom3d:40", tmp_path / "ev", init="random", backbone="resnet10_3d", image_size=24,
                   label_fractions=[1.0], seeds=[0], protocol="knn", window=16, overlap=0.5, progress=False)
    assert len(res["rows"]) == 1 and 0.0 <= res["rows"][0]["metrics"]["auc_macro"] <= 1.0
    import json

    meta = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert meta["meta"]["window"] == 16 and meta["meta"]["overlap"] == 0.5


@pytest.mark.parametrize("argv, needle", [
    (["--data", "phantom2d:40", "--image-size", "32", "--window", "16"], "--window is for 3D volumes"),
    (["--data", "phantom3d:40", "--image-size", "24", "--window", "32"], "--window 32 is larger than the volumes"),
    (["--data", "phantom3d:40", "--image-size", "24", "--window", "1"], "at least 2 voxels"),
    (["--data", "phantom3d:40", "--image-size", "24", "--overlap", "0.5"], "--overlap applies with --window"),
    (["--data", "phantom3d:40", "--image-size", "24", "--window", "16", "--overlap", "1"], "[0, 1)"),
    (["--data", "phantom3d:40", "--image-size", "24", "--window", "16", "--overlap", "nan"], "[0, 1)"),
    (["--data", "phantom3d:40", "--image-size", "24", "--window", "16", "--protocol", "collapse"],
     "does not apply to --protocol collapse"),
    (["--data", "phantom3d:40", "--image-size", "24", "--window", "16", "--protocol", "finetune"],
     "unknown option(s) ['overlap', 'window']"),
])
def test_window_hostile_values_exit_2(argv, needle, tmp_path, capsys) -> None:
    from medssl.cli import main

    code = main(["evaluate", "--init", "random", "--backbone", "resnet10_3d", "--out", str(tmp_path / "ev"),
                 "--label-fractions", "1", "--seeds", "0", "--quiet", *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert needle in err and "Traceback" not in err
