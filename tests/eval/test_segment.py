"""segment protocol: beats the all-background baseline on phantom2d, runs in 3D, CNN and ViT decoders."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medssl.encoders import random_encoder
from medssl.errors import ConfigError
from medssl.eval.images import ImageTask
from medssl.eval.metrics import dice_jaccard, segmentation_metrics_with_notes
from medssl.eval.protocol import run_protocol
from medssl.eval.segment import dice_ce_loss
from medssl.nn.segmentation import SegmentationNet
from tests.eval._image_data import TinyImages


def test_dice_ce_loss_by_hand() -> None:
    logits = torch.tensor([[[[2.0, -1.0]], [[0.0, 1.0]]]])  # (1, 2 classes, 1, 2)
    target = torch.tensor([[[0, 1]]])
    p = torch.softmax(logits, dim=1)
    ce = F.cross_entropy(logits, target)
    fg_dice = (2 * p[0, 1, 0, 1] + 1) / (p[0, 1].sum() + 1 + 1)
    assert dice_ce_loss(logits, target).item() == pytest.approx((ce + 1 - fg_dice).item(), abs=1e-6)
    # A confident, correct prediction has almost no loss.
    sharp = 50.0 * (F.one_hot(target, 2).movedim(-1, 1).float() - 0.5)
    assert dice_ce_loss(sharp, target).item() < 1e-3


@pytest.mark.parametrize(("backbone", "dims", "size", "extra"), [
    ("resnet18", 2, 32, {}),
    ("vit_tiny_patch16_224", 2, 32, {"patch_size": 8}),
    ("resnet10_3d", 3, 16, {}),
    ("vit_tiny_3d", 3, 16, {"patch_size": 8}),
])
def test_segmentation_net_shapes(backbone: str, dims: int, size: int, extra: dict) -> None:
    enc = random_encoder(backbone, in_chans=1, image_size=size, spatial_dims=dims, **extra)
    net = SegmentationNet(enc, 3, 1, (size,) * dims)
    x = torch.rand(2, 1, *(size,) * dims)
    out = net(x)
    assert out.shape == (2, 3, *(size,) * dims)
    out.mean().backward()
    assert all(p.grad is not None for p in net.decoder.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.encoder.parameters())


def test_frozen_encoder_is_unchanged_and_no_masks_is_a_config_error() -> None:
    ds = TinyImages(n=30, size=16)
    enc = random_encoder("resnet18", in_chans=1, image_size=16)
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    task = ImageTask.from_dataset(ds, enc)
    row = run_protocol(task, "segment", [1.0], [0], epochs=1, freeze_encoder=True, n_boot=50)[0]
    assert row["params"]["freeze_encoder"] is True and row["params"]["decoder"] == "unet"
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())  # template never modified
    assert set(row["metrics"]) == {"dice", "jaccard"} and set(row["ci"]) == {"dice", "jaccard"}
    assert set(row["per_class"]["dice"]) == {"background", "foreground"}

    nomask = ImageTask.from_dataset(TinyImages(n=20, size=16, masks=False), enc)
    with pytest.raises(ConfigError, match="no segmentation masks"):
        run_protocol(nomask, "segment", [1.0], [0], epochs=1)
    with pytest.raises(ConfigError, match="unknown option"):
        run_protocol(task, "segment", [1.0], [0], epochs=1, bogus=3)


def test_unlabelled_dataset_draws_plain_random_fractions() -> None:
    ds = TinyImages(n=40, size=16, labels=False)
    task = ImageTask.from_dataset(ds, random_encoder("resnet18", in_chans=1, image_size=16))
    assert task.has_labels is False and np.all(task.train_y == 0)
    rows = run_protocol(task, "segment", [0.5], [0, 1], epochs=1, n_boot=0)
    n_train = len(ds.indices("train"))
    assert all(r["n_train"] == round(0.5 * n_train) for r in rows)
    assert all("ci" not in r for r in rows)


@pytest.mark.slow
def test_segment_beats_all_background_on_phantom2d() -> None:
    from medssl.data.phantoms import PhantomDataset

    ds = PhantomDataset("phantom2d", n=160, image_size=32)
    task = ImageTask.from_dataset(ds, random_encoder("resnet18", in_chans=1, image_size=32))
    row = run_protocol(task, "segment", [1.0], [0], epochs=4, batch_size=8, n_boot=200)[0]
    test_masks = np.stack([ds[int(i)]["mask"].numpy() for i in ds.indices("test")])
    background = segmentation_metrics_with_notes(*dice_jaccard(np.zeros_like(test_masks), test_masks, 2))[0]
    assert background["dice"] == 0.0  # every phantom2d image has a lesion
    assert row["metrics"]["dice"] > 0.6, row
    assert row["metrics"]["jaccard"] > 0.4
    lo, hi = row["ci"]["dice"]
    assert lo <= row["metrics"]["dice"] <= hi and lo > 0.3


def test_segment_runs_in_3d_on_phantom3d() -> None:
    from medssl.data.phantoms import PhantomDataset

    ds = PhantomDataset("phantom3d", n=24, image_size=16)
    task = ImageTask.from_dataset(ds, random_encoder("resnet10_3d", in_chans=1, image_size=16, spatial_dims=3))
    row = run_protocol(task, "segment", [1.0], [0], epochs=1, batch_size=4, n_boot=50)[0]
    d = row["metrics"]["dice"]
    assert math.isnan(d) or 0.0 <= d <= 1.0
    assert row["params"]["num_classes"] == 2 and row["params"]["decoder"] == "unet"
