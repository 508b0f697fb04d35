"""Med-MoCo whitens the last feature map as the paper does (issue 15, item 1): one group, statistics over the
N·H·W positions, running statistics exported, and the segmentation protocol sees the whitened map.

Reference: the Pearson correlation matrix of the whitened positions computed here with numpy (``np.corrcoef``),
and the whitening written out as a 1×1 map ``W (x − μ)`` from the exported ``nn.Linear``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from medssl.config import build_config
from medssl.errors import ConfigError
from medssl.methods import DataInfo, build_method
from medssl.nn.backbones import Encoder
from medssl.nn.segmentation import SegmentationNet
from medssl.nn.whitening import WhitenedBackbone, feature_positions, whiten_map


def _medmoco(size: int = 16, **method):
    torch.manual_seed(0)
    cfg = build_config({"method": {"name": "medmoco", "queue_size": 16, "local_regions": 4, "proj_hidden": 32,
                                   "proj_dim": 16, "whitening_momentum": 1.0, **method},
                        "model": {"backbone": "resnet18", "stem": "cifar"}, "data": {"image_size": size}})
    return build_method(cfg, DataInfo(in_chans=1, spatial_dims=2, image_size=size, num_samples=64))


def _corr_offdiag(x: torch.Tensor) -> np.ndarray:
    c = np.corrcoef(x.detach().double().numpy(), rowvar=False)
    return np.abs(c[~np.eye(c.shape[0], dtype=bool)])


def test_default_is_one_group_with_feature_map_statistics():
    model = _medmoco()
    assert model.hparams.whitening_stats == "feature_map" and model.whitening.group_size == 512


def test_whitened_feature_map_channels_are_decorrelated_on_a_fixed_batch():
    model = _medmoco(32, local_weight=0)
    x = torch.randn(48, 1, 32, 32, generator=torch.Generator().manual_seed(3))  # 48 images x 4x4 = 768 positions
    with torch.no_grad():
        fmap = model.embed_query(x)["feature_map"]  # training mode, momentum 1: running stats = this batch's
    model.eval()
    with torch.no_grad():
        white = whiten_map(model.whitening, fmap)  # the exported (eval-mode) transform at every position
    before, after = _corr_offdiag(feature_positions(fmap)), _corr_offdiag(feature_positions(white))
    # a random-init ResNet's map is measurably correlated (0.06 with identity-start blocks, more with timm's
    # zero-init ones); whitening removes it to rounding
    assert before.mean() > 0.03
    assert after.max() < 0.02 and after.mean() < 1e-3, (before.mean(), after.mean(), after.max())


def test_pooled_whitened_features_are_the_average_of_the_whitened_map():
    model = _medmoco()
    x = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(4))
    out = model.embed_query(x)
    pos = feature_positions(out["feature_map"].detach()).double().numpy()  # (8·2·2, 512)
    mu = pos.mean(0)
    cov = (pos - mu).T @ (pos - mu) / pos.shape[0]  # statistics over every position of the batch
    lam, u = np.linalg.eigh(cov + model.hparams.whitening_eps * np.eye(512))
    w = (u / np.sqrt(np.clip(lam, 1e-300, None))) @ u.T  # ZCA: U diag(λ + ε)^-1/2 Uᵀ
    whitened_map = (pos - mu) @ w
    by_hand = whitened_map.reshape(8, -1, 512).mean(1)  # whiten every position, then average-pool
    # (fp32 features, 32 positions for 512 channels: the ε-sized directions amplify rounding)
    np.testing.assert_allclose(out["whitened"].detach().double().numpy(), by_hand, atol=2e-4, rtol=1e-2)


def test_grouped_pooled_variant_stays_available():
    model = _medmoco(whitening_stats="pooled", whitening_group_size=64)
    assert model.whitening.group_size == 64
    x = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    out = model.embed_query(x)
    assert out["whitened"].shape == (8, 512)


def test_vit_needs_pooled_statistics():
    cfg = {"method": {"name": "medmoco", "local_weight": 0}, "model": {"backbone": "vit_tiny_patch16_224"},
           "data": {"image_size": 32}}
    info = DataInfo(in_chans=1, spatial_dims=2, image_size=32, num_samples=64)
    with pytest.raises(ConfigError, match="whitening_stats=pooled"):
        build_method(build_config(cfg), info)
    cfg["method"]["whitening_stats"] = "pooled"
    build_method(build_config(cfg), info)


@pytest.mark.parametrize("folded", [False, True])
def test_segmentation_decoder_gets_the_whitened_last_feature_map(folded):
    model = _medmoco()
    with torch.no_grad():
        model.embed_query(torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(6)))
    model.eval()
    lin = model.whitening.to_linear()
    enc = Encoder(WhitenedBackbone(model.backbone, lin if folded else model.whitening))
    net = SegmentationNet(enc, num_classes=2, in_chans=1, image_shape=(16, 16), freeze_encoder=True).eval()
    seen: dict[str, list[torch.Tensor]] = {}
    net.decoder.register_forward_pre_hook(lambda m, args, kw: seen.__setitem__("feats", args[0]), with_kwargs=True)
    images = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        net(images)
        raw = model.backbone.forward_features(_normalised(images))
    w, b = lin.weight.double(), lin.bias.double()
    by_hand = torch.einsum("dc,nchw->ndhw", w, raw.double()) + b[None, :, None, None]
    torch.testing.assert_close(seen["feats"][-1].double(), by_hand, atol=1e-4, rtol=1e-4)
    assert not any(p.requires_grad for p in net.whitening.parameters())  # frozen with the encoder


def _normalised(images: torch.Tensor) -> torch.Tensor:
    from medssl.transforms.intensity import normalize

    return normalize(images)


def test_export_keeps_running_statistics(tmp_path):
    import safetensors.torch as st

    from medssl.export import export_encoders

    model = _medmoco()
    model.training_step({"image": torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(8))})
    model.eval()
    export_encoders(model, tmp_path)
    lin = nn.Linear(512, 512)
    lin.load_state_dict(st.load_file(str(tmp_path / "whitening.safetensors")), strict=True)
    w, b = model.whitening.eval_affine()
    torch.testing.assert_close(lin.weight.double(), w, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lin.bias.double(), b, atol=1e-5, rtol=1e-5)
