"""The sparse-CNN emulation: sparse BatchNorm against a hand-written reference (moved from
tests/methods/test_cnnmim.py), and ``sparsify`` keeping the plain network's state dict and outputs when no mask
is active."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from medssl.nn.backbones3d import build_backbone_3d
from medssl.nn.sparse import MaskState, SparseBatchNorm2d, SparseBatchNorm3d, sparsify


@pytest.mark.parametrize("cls,ref_cls,shape", [(SparseBatchNorm2d, nn.BatchNorm2d, (4, 3, 6, 5)),
                                              (SparseBatchNorm3d, nn.BatchNorm3d, (2, 3, 4, 5, 3))])
def test_sparse_batch_norm_against_reference(cls: type, ref_cls: type, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    x = torch.randn(shape) * 2 + 1
    bn = cls(3, momentum=0.2)
    nn.init.normal_(bn.weight)
    nn.init.normal_(bn.bias)
    state = MaskState()
    bn.mask_state = state
    ref = ref_cls(3, momentum=0.2)
    ref.load_state_dict(bn.state_dict())
    # No mask: exactly the plain BatchNorm, train and eval.
    torch.testing.assert_close(bn(x), ref(x))
    torch.testing.assert_close(bn.running_var, ref.running_var)
    # A mask: statistics over the visible positions only, written out by hand.
    mask = torch.rand(shape[0], 1, *shape[2:], generator=torch.Generator().manual_seed(3)) < 0.4
    before_mean, before_var = bn.running_mean.clone(), bn.running_var.clone()
    with state.active(mask):
        y = bn(x)
    vis = (~mask).expand_as(x)
    for c in range(3):
        vals = x[:, c][vis[:, c]]
        mean, var = vals.mean(), vals.var(unbiased=False)
        expected = (x[:, c] - mean) / torch.sqrt(var + bn.eps) * bn.weight[c] + bn.bias[c]
        torch.testing.assert_close(y[:, c][vis[:, c]], expected[vis[:, c]], rtol=1e-4, atol=1e-5)
        assert (y[:, c][~vis[:, c]] == 0).all()
        torch.testing.assert_close(bn.running_mean[c], 0.8 * before_mean[c] + 0.2 * mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var[c], 0.8 * before_var[c] + 0.2 * vals.var(unbiased=True),
                                   rtol=1e-5, atol=1e-6)
    # Eval mode under a mask: running statistics, masked positions zero.
    bn.eval()
    with state.active(mask):
        y = bn(x)
    expected = (x - bn.running_mean.view(1, -1, *[1] * (x.ndim - 2))) / torch.sqrt(
        bn.running_var.view(1, -1, *[1] * (x.ndim - 2)) + bn.eps)
    expected = expected * bn.weight.view(1, -1, *[1] * (x.ndim - 2)) + bn.bias.view(1, -1, *[1] * (x.ndim - 2))
    torch.testing.assert_close(y, expected * (~mask), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sd", [2, 3])
def test_sparsified_network_is_the_plain_network_without_a_mask(sd: int) -> None:
    """Same state-dict keys and values, the same outputs (train and eval), and sparse BatchNorm everywhere."""
    torch.manual_seed(0)
    net = timm.create_model("resnet18", num_classes=0, in_chans=1) if sd == 2 else build_backbone_3d("resnet10_3d",
                                                                                                       in_chans=1)
    ref = timm.create_model("resnet18", num_classes=0, in_chans=1) if sd == 2 else build_backbone_3d("resnet10_3d",
                                                                                                       in_chans=1)
    ref.load_state_dict(net.state_dict())
    state = MaskState()
    handles = sparsify(net, state)
    assert list(net.state_dict()) == list(ref.state_dict())
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and all(type(m) in (SparseBatchNorm2d, SparseBatchNorm3d) for m in bns)
    assert len(handles) > 10
    x = torch.randn(2, 1, *(32,) * sd)
    for training in (True, False):
        net.train(training)
        ref.train(training)
        torch.testing.assert_close(net(x), ref(x), rtol=0, atol=0)
    # under a mask, every layer zeroes the masked half (the last map's single position sees visible input)
    mask = torch.zeros(2, 1, *(32,) * sd, dtype=torch.bool)
    mask[..., :16] = True
    net.eval()
    with state.active(mask):
        fmap = net.forward_features(x)
    assert (fmap[..., : fmap.shape[-1] // 2] == 0).all()
    for h in handles:
        h.remove()
