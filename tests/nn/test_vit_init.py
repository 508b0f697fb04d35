"""MAE's ViT initialisation, the same in 2D and 3D (issue 15, item 7): xavier-uniform linear layers (qkv as one
(3D, D) matrix), unit LayerNorms, zero biases, the patch embedding xavier-uniform as a (D, C·patch) matrix, class
token std 0.02. Reference: the xavier-uniform formula written out, bound = sqrt(6 / (fan_in + fan_out)), a
uniform's std = bound / sqrt(3)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from medssl.config import build_config
from medssl.methods import DataInfo, build_method


def _mae_encoder(sd: int) -> nn.Module:
    torch.manual_seed(0)
    size = 32 if sd == 2 else 16
    cfg = build_config({"method": {"name": "mae", "decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2},
                        "model": {"backbone": "vit_tiny_patch16_224" if sd == 2 else "vit_tiny_3d",
                                  "patch_size": 8}})
    return build_method(cfg, DataInfo(in_chans=1, spatial_dims=sd, image_size=size, num_samples=8)).encoder.vit


def _xavier(w: torch.Tensor) -> tuple[float, float]:
    """(bound, std) of xavier-uniform for a weight seen as a (out, in) matrix."""
    fan_out, fan_in = w.shape[0], w[0].numel()
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return bound, bound / math.sqrt(3.0)


@pytest.mark.parametrize("sd", [2, 3])
def test_mae_encoder_has_maes_initialisation(sd):
    vit = _mae_encoder(sd)
    linears = [(n, m) for n, m in vit.named_modules() if isinstance(m, nn.Linear)]
    assert any(n.endswith("qkv") for n, _ in linears)
    for name, lin in linears:
        bound, std = _xavier(lin.weight)
        assert float(lin.weight.detach().abs().max()) <= bound + 1e-7, name
        assert float(lin.weight.detach().std()) == pytest.approx(std, rel=0.06), name
        assert lin.bias is None or bool((lin.bias == 0).all()), name
    for name, ln in vit.named_modules():
        if isinstance(ln, nn.LayerNorm):
            assert bool((ln.weight == 1).all()) and bool((ln.bias == 0).all()), name
    w = vit.patch_embed.proj.weight.detach()
    bound, std = _xavier(w)
    assert float(w.abs().max()) <= bound + 1e-7
    assert float(w.std()) == pytest.approx(std, rel=0.1)
    assert float(vit.cls_token.std()) == pytest.approx(0.02, rel=0.3)


def test_2d_and_3d_encoders_are_initialised_alike():
    v2, v3 = _mae_encoder(2), _mae_encoder(3)
    q2 = torch.cat([b.attn.qkv.weight.flatten() for b in v2.blocks])
    q3 = torch.cat([b.attn.qkv.weight.flatten() for b in v3.blocks])
    # xavier for a (576, 192) matrix: std sqrt(2 / 768) = 0.051 (timm's own init would give 0.020)
    assert float(q2.std()) == pytest.approx(math.sqrt(2 / 768), rel=0.02)
    assert float(q3.std()) == pytest.approx(float(q2.std()), rel=0.02)
