"""MoCo v3: the symmetric loss against the formula written out, the momentum schedule, the frozen patch projection."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medssl.api import make_config
from medssl.errors import ConfigError
from medssl.losses import info_nce
from medssl.methods import DataInfo, build_method

SMALL = ["method.mlp_dim=32", "method.proj_dim=16", "model.patch_size=8"]


def _reference(q1, q2, k1, k2, tau):
    """2τ · [ctr(q1, k2) + ctr(q2, k1)], ctr(q, k) = mean_i −log(exp(q_i·k_i/τ) / Σ_j exp(q_i·k_j/τ)), unit vectors."""
    def ctr(q, k):
        q, k = q / q.norm(dim=1, keepdim=True), k / k.norm(dim=1, keepdim=True)
        terms = []
        for i in range(q.shape[0]):
            logits = torch.stack([q[i] @ k[j] / tau for j in range(k.shape[0])])
            terms.append(-(logits[i] - torch.log(torch.exp(logits).sum())))
        return torch.stack(terms).mean()
    return 2 * tau * (ctr(q1, k2) + ctr(q2, k1))


def _method(overrides: list[str] | None = None):
    cfg = make_config(method="mocov3", data="phantom2d", image_size=32, overrides=SMALL + (overrides or []))
    torch.manual_seed(0)
    return build_method(cfg, DataInfo(in_chans=1, spatial_dims=2, image_size=32, num_samples=32)), cfg


def test_symmetric_loss_matches_the_formula_and_its_gradient() -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 5, 8, generator=g, dtype=torch.float64)
    tau = 0.2
    loss = 2 * tau * (info_nce(q[0], k[1], temperature=tau) + info_nce(q[1], k[0], temperature=tau))
    ref = _reference(q[0], q[1], k[0], k[1], tau)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-6)
    (g1,) = torch.autograd.grad(loss, q)
    (g2,) = torch.autograd.grad(ref, q)
    torch.testing.assert_close(g1.double(), g2, rtol=1e-5, atol=1e-6)


def test_the_method_step_is_the_symmetric_loss_of_its_encoders() -> None:
    m, _ = _method()
    m.train()
    images = torch.rand(4, 1, 32, 32)
    torch.manual_seed(3)
    out = m.training_step({"image": images})
    torch.manual_seed(3)  # the same views again, by hand
    from medssl.transforms.intensity import normalize

    x = torch.cat([normalize(m.views(images).images), normalize(m.views(images).images)])
    q = m.predictor(m.projector(m.backbone(x)))
    with torch.no_grad():
        k = m.key_projector(m.key_backbone(x))
    ref = _reference(q[:4], q[4:], k[:4], k[4:], 0.2)
    torch.testing.assert_close(out.loss.double(), ref.double(), rtol=1e-5, atol=1e-5)
    assert m.backbone_name == "vit_tiny_patch16_224"  # the CNN default became a ViT


def test_momentum_schedule_and_frozen_patch_projection() -> None:
    m, _ = _method(["method.stop_grad_patch_embed=true", "method.momentum=0.9"])
    proj = m.backbone.patch_embed.proj
    assert not proj.weight.requires_grad
    assert all("patch_embed.proj" not in n for n, _ in m.parameter_sets()["main"])
    out = m.training_step({"image": torch.rand(4, 1, 32, 32)})
    out.loss.backward()
    assert proj.weight.grad is None and m.backbone.blocks[0].attn.qkv.weight.grad is not None
    key_before = m.key_backbone.blocks[0].attn.qkv.weight.clone()
    online = m.backbone.blocks[0].attn.qkv.weight.detach()
    with torch.no_grad():
        online.add_(1.0)
    m.after_optimizer_step(50, 100)  # cosine: 1 - 0.1 * (1 + cos(pi/2)) / 2 = 0.95
    expected = 0.95 * key_before + 0.05 * online
    torch.testing.assert_close(m.key_backbone.blocks[0].attn.qkv.weight, expected)
    with pytest.raises(ConfigError, match="stop_grad_patch_embed needs a ViT"):
        _method(["method.stop_grad_patch_embed=true", "model.backbone=resnet34"])
    with pytest.raises(ConfigError, match="temperature"):
        _method(["method.temperature=0"])


def test_keys_are_the_negatives_of_the_whole_batch() -> None:
    """No queue: every other key of the batch is a negative (the logits are B x B)."""
    m, _ = _method()
    assert not any("queue" in n for n, _ in m.named_buffers())
    q, k = F.normalize(torch.randn(3, 4), dim=1), F.normalize(torch.randn(3, 4), dim=1)
    logits = q @ k.t() / 0.2
    torch.testing.assert_close(info_nce(q, k, temperature=0.2), F.cross_entropy(logits, torch.arange(3)))
