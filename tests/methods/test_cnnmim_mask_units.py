"""cnnmim's mask units default to the encoder's total stride, so every stage of the sparse encoder sees the input's
masked fraction (issue 15, item 2). Reference: the masked fraction of each stage's output measured on the real
network — the positions whose activations stay exactly zero under the mask (nothing of the image reaches them),
counted with forward hooks — against the input's fraction."""

from __future__ import annotations

import logging

import pytest
import torch

from medssl.config import build_config
from medssl.errors import ConfigError
from medssl.methods import DataInfo, build_method
from medssl.methods.cnnmim import CNNMIM
from medssl.nn.sparse import RESNET_STAGES
from medssl.transforms.masking import upsample_mask


def _method(sd: int, size: int, stem: str = "default", **method: object) -> CNNMIM:
    torch.manual_seed(0)
    cfg = build_config({"method": {"name": "cnnmim", "mask_ratio": 0.5, **method},
                        "model": {"backbone": "resnet18" if sd == 2 else "resnet10_3d", "stem": stem}})
    return build_method(cfg, DataInfo(in_chans=1, spatial_dims=sd, image_size=size, num_samples=64))


def _measured_fractions(method: CNNMIM, seed: int = 0) -> tuple[float, list[float]]:
    """Input masked fraction, and per stage (layer1..layer4) the fraction of positions where every channel of
    every sample is exactly zero on a positive image (masked = the encoder keeps it empty)."""
    method.train()
    x = torch.rand(4, 1, *method.image_shape, generator=torch.Generator().manual_seed(seed)) + 0.5
    mask = method.draw_mask(4, x.device, generator=torch.Generator().manual_seed(seed))
    pix = upsample_mask(mask, method.patch)
    outs: dict[str, torch.Tensor] = {}
    hooks = [getattr(method.backbone, s).register_forward_hook(lambda m, i, o, s=s: outs.__setitem__(s, o))
             for s in RESNET_STAGES]
    with torch.no_grad():
        method.encode(x * (~pix), pix)
    for h in hooks:
        h.remove()
    return float(pix.float().mean()), [float((outs[s].abs().amax(dim=1) == 0).float().mean()) for s in RESNET_STAGES]


@pytest.mark.parametrize("sd,size,stem,stride", [(2, 128, "default", 32), (2, 32, "cifar", 8),
                                                 (3, 32, "cifar", 8)])
def test_default_unit_is_the_total_stride_and_every_stage_keeps_the_fraction(sd, size, stem, stride):
    method = _method(sd, size, stem)
    assert method.patch == (stride,) * sd and method.hparams.mask_patch_size == stride  # recorded in the config
    frac, stages = _measured_fractions(method)
    assert 0.3 < frac < 0.7
    assert stages == pytest.approx([frac] * 4, abs=1e-6), (frac, stages)
    assert method.stage_shapes[-1] == tuple(s // stride for s in method.image_shape)


def test_smaller_units_warn_and_the_mask_vanishes_at_depth(caplog):
    with caplog.at_level(logging.WARNING, logger="medssl"):
        method = _method(2, 128, mask_patch_size=8)
    assert "not a multiple of the encoder's total stride 32" in caplog.text
    frac, stages = _measured_fractions(method)
    assert stages[-1] < 0.5 * frac  # what the old default (8 px units on a stride-32 ResNet) trained with


def test_too_small_image_for_stride_units_names_the_keys_and_the_cifar_stem():
    with pytest.raises(ConfigError, match=r"mask_patch_size 32.*model\.stem=cifar"):
        _method(2, 32, mask_patch_size=32)  # set explicitly: refused


@pytest.mark.parametrize("sd,size,unit", [(2, 32, 16), (3, 16, 8), (2, 48, 16)])
def test_default_unit_falls_back_below_the_stride_on_small_images_with_a_warning(sd, size, unit, caplog):
    # a 16^3 sub-volume under a stride-32 ResNet (contract 09-volumes): units of the stride would not fit
    with caplog.at_level(logging.WARNING, logger="medssl"):
        method = _method(sd, size)
    assert method.patch == (unit,) * sd and method.hparams.mask_patch_size == unit
    assert f"using {unit} px units instead" in caplog.text and "model.stem=cifar" in caplog.text
