"""Split BatchNorm (issue 15, item 4): MoCo's one-process stand-in for shuffle-BN. Reference: torch's own
``F.batch_norm`` run separately on every sub-batch, and the running statistics averaged over them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medssl.config import build_config
from medssl.methods import DataInfo, build_method
from medssl.nn.batchnorm import SplitBatchNorm2d, SplitBatchNorm3d, convert_batchnorm


def test_split_batchnorm_normalises_every_sub_batch_on_its_own():
    g = torch.Generator().manual_seed(0)
    bn = SplitBatchNorm2d(3, momentum=0.1)
    bn.num_splits, bn.min_split_size = 4, 2
    with torch.no_grad():
        bn.weight.copy_(torch.rand(3, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(3, generator=g))
    x = torch.randn(10, 3, 4, 4, generator=g) * 3 + 1
    y = bn(x)
    chunks = x.tensor_split(4)  # sizes 3, 3, 2, 2
    ref, rms, rvs = [], [], []
    for c in chunks:
        rm, rv = torch.zeros(3), torch.ones(3)
        ref.append(F.batch_norm(c, rm, rv, bn.weight, bn.bias, True, 0.1, bn.eps))
        rms.append(rm)
        rvs.append(rv)
    torch.testing.assert_close(y, torch.cat(ref))
    torch.testing.assert_close(bn.running_mean, torch.stack(rms).mean(0))
    torch.testing.assert_close(bn.running_var, torch.stack(rvs).mean(0))
    # a sample's output depends on its own sub-batch only
    x2 = x.clone()
    x2[5:] = torch.randn(5, 3, 4, 4, generator=g)
    torch.testing.assert_close(bn(x2)[:3], y[:3])
    bn.eval()
    plain = nn.BatchNorm2d(3)
    plain.load_state_dict(bn.state_dict())
    torch.testing.assert_close(bn(x), plain.eval()(x))


def test_small_batches_fall_back_to_plain_batchnorm_and_3d_works():
    bn = SplitBatchNorm3d(2)
    bn.num_splits, bn.min_split_size = 8, 16
    x = torch.randn(20, 2, 2, 2, 2)  # 20 // 16 = 1 sub-batch
    plain = nn.BatchNorm3d(2)
    torch.testing.assert_close(bn(x), plain(x))
    assert bn.splits_for(64) == 4 and bn.splits_for(512) == 8


def test_conversion_keeps_the_state_dict():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    keys = dict(net.state_dict())
    convert_batchnorm(net, "split", 4)
    assert isinstance(net[1], SplitBatchNorm2d) and isinstance(net[4], SplitBatchNorm2d)
    assert list(net.state_dict()) == list(keys)


def _mocov2(**method):
    cfg = build_config({"method": {"name": "mocov2", "queue_size": 16, "proj_hidden": 32, "proj_dim": 16, **method},
                        "model": {"backbone": "resnet18", "stem": "cifar"}, "data": {"image_size": 8}})
    torch.manual_seed(0)
    return build_method(cfg, DataInfo(in_chans=1, spatial_dims=2, image_size=8, num_samples=64))


def test_mocov2_in_one_process_keeps_the_two_views_apart_in_batchnorm():
    """Query batch = [view 1 of 32 images; view 2 of them]: with split BN (default) the first view's embeddings do
    not depend on the second views at all; with plain BN they do (the leak shuffle-BN exists to prevent)."""
    g = torch.Generator().manual_seed(1)
    v1, v2 = torch.randn(32, 1, 8, 8, generator=g), torch.randn(32, 1, 8, 8, generator=g)
    v2b = torch.randn(32, 1, 8, 8, generator=g)
    split = _mocov2()
    assert isinstance(split.key_backbone.bn1, SplitBatchNorm2d) and isinstance(split.backbone.bn1, SplitBatchNorm2d)
    with torch.no_grad():
        a = split.embed_query(torch.cat([v1, v2]))["projector"][:32]
        b = split.embed_query(torch.cat([v1, v2b]))["projector"][:32]
    torch.testing.assert_close(a, b)
    plain = _mocov2(bn_splits=0)
    with torch.no_grad():
        a = plain.embed_query(torch.cat([v1, v2]))["projector"][:32]
        b = plain.embed_query(torch.cat([v1, v2b]))["projector"][:32]
    assert not torch.allclose(a, b, atol=1e-4)


def test_mocov2_shuffles_the_key_batch_before_splitting():
    model = _mocov2()
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(5)
    k = model.key(x)
    torch.manual_seed(5)
    perm = torch.randperm(64)
    with torch.no_grad():
        ref = F.normalize(model.embed_key(x[perm]).float(), dim=1)[torch.argsort(perm)]
    torch.testing.assert_close(k, ref)
    with torch.no_grad():  # and the shuffle matters: unshuffled sub-batches give other keys
        unshuffled = F.normalize(model.embed_key(x).float(), dim=1)
    assert not torch.allclose(k, unshuffled, atol=1e-4)
