"""``model.zero_init_last``: the last norm of every timm residual block starts at scale 0 (timm) or 1 (medssl)."""

from __future__ import annotations

import pytest
import timm
import torch

from medssl.config import build_config
from medssl.errors import ConfigError
from medssl.nn.backbones import build_backbone, set_zero_init_last


def _last_norm_scales(model: torch.nn.Module) -> list[torch.Tensor]:
    # the reference, written out: timm's BasicBlock ends in bn2, its Bottleneck in bn3
    from timm.models.resnet import BasicBlock, Bottleneck

    out = []
    for m in model.modules():
        if isinstance(m, Bottleneck):
            out.append(m.bn3.weight.detach())
        elif isinstance(m, BasicBlock):
            out.append(m.bn2.weight.detach())
    return out


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_timm_zero_inits_and_medssl_can_undo_it(name):
    timm_default = timm.create_model(name, num_classes=0, in_chans=1)
    scales = _last_norm_scales(timm_default)
    assert len(scales) == (8 if name == "resnet18" else 16)
    assert all((s == 0).all() for s in scales)  # what timm does: each block starts as the identity

    ones = build_backbone(name, in_chans=1, zero_init_last=False)
    assert all((s == 1).all() for s in _last_norm_scales(ones))
    zeros = build_backbone(name, in_chans=1, zero_init_last=True)
    assert all((s == 0).all() for s in _last_norm_scales(zeros))
    # the other norms and every conv are untouched: same seed, same weights outside the last norms
    torch.manual_seed(0)
    a = build_backbone(name, in_chans=1, zero_init_last=False)
    torch.manual_seed(0)
    b = timm.create_model(name, num_classes=0, in_chans=1)
    last = {id(t) for t in _last_norm_scales(a)}
    for (ka, pa), (kb, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert ka == kb
        if id(pa.detach()) not in last and not (ka.endswith("bn2.weight") or ka.endswith("bn3.weight")):
            assert torch.equal(pa, pb), ka


def test_no_blocks_no_change():
    vit = build_backbone("vit_tiny_patch16_224", in_chans=1, image_size=32, zero_init_last=False)
    assert set_zero_init_last(vit, False) == 0


def test_config_key_and_hostile_values():
    assert build_config({"method": {"name": "mocov2"}}).model.zero_init_last is False
    assert build_config({"method": {"name": "mocov2"}, "model": {"zero_init_last": "true"}}).model.zero_init_last
    for bad in ("sometimes", 2, [1]):
        with pytest.raises(ConfigError, match="model.zero_init_last: expected true/false"):
            build_config({"method": {"name": "mocov2"}, "model": {"zero_init_last": bad}})


def test_method_backbone_follows_the_key():
    from medssl.methods import DataInfo, build_method

    for flag in (False, True):
        cfg = build_config({"method": {"name": "mocov2", "queue_size": 16},
                            "model": {"zero_init_last": flag}, "data": {"image_size": 32}})
        info = DataInfo(in_chans=1, image_size=32, spatial_dims=2, num_samples=16)
        method = build_method(cfg, info)
        assert all((s == float(not flag)).all() for s in _last_norm_scales(method.backbone))
