"""DINO: the loss against a hand-written loop (values and gradients), the centre, the schedules, the frozen last
layer, multi-crop sizes and refusals."""

from __future__ import annotations

import math

import pytest
import torch

from medssl.api import make_config
from medssl.errors import ConfigError
from medssl.losses.dino import batch_center, dino_loss
from medssl.methods import DataInfo, build_method
from medssl.nn.heads import DINOHead

SMALL = ["method.out_dim=32", "method.hidden_dim=16", "method.bottleneck_dim=8", "method.local_crops=2"]


def _reference_loss(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, tau_s: float, tau_t: float,
                    n_global: int, batch: int) -> torch.Tensor:
    """DINO's loss written out element by element: for every global teacher crop i and every other student crop v,
    the cross-entropy -sum_k p_t[k] log p_s[k] of every sample, averaged."""
    views = student.shape[0] // batch
    terms = []
    for i in range(n_global):
        for v in range(views):
            if v == i:
                continue
            for b in range(batch):
                t = teacher[i * batch + b]
                s = student[v * batch + b]
                p_t = torch.exp((t - center) / tau_t) / torch.exp((t - center) / tau_t).sum()
                log_p_s = s / tau_s - torch.log(torch.exp(s / tau_s).sum())
                terms.append(-(p_t * log_p_s).sum())
    return torch.stack(terms).mean()


def test_loss_and_gradients_match_the_written_formula() -> None:
    g = torch.Generator().manual_seed(0)
    batch, views, k = 3, 5, 7
    student = torch.randn(views * batch, k, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2 * batch, k, generator=g, dtype=torch.float64)
    center = torch.randn(1, k, generator=g, dtype=torch.float64) * 0.1
    loss = dino_loss(student, teacher, center, num_global=2, student_temp=0.1, teacher_temp=0.04)
    (grad,) = torch.autograd.grad(loss, student)
    s2 = student.detach().clone().requires_grad_(True)
    ref = _reference_loss(s2, teacher, center[0], 0.1, 0.04, 2, batch)
    (grad_ref,) = torch.autograd.grad(ref, s2)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad.double(), grad_ref, rtol=1e-5, atol=1e-7)
    # the teacher gets no gradient; a crop never learns from its own teacher output (no 'v == i' term)
    assert not teacher.requires_grad
    same = dino_loss(teacher.clone()[: 2 * batch], teacher, torch.zeros(1, k), student_temp=0.04, teacher_temp=0.04)
    t = torch.softmax(teacher / 0.04, -1).chunk(2)
    cross = -(t[0] * torch.log(t[1])).sum(-1).mean() / 2 - (t[1] * torch.log(t[0])).sum(-1).mean() / 2
    torch.testing.assert_close(same.double(), cross, rtol=1e-5, atol=1e-5)


def test_batch_center_is_the_mean_and_refuses_ragged_outputs() -> None:
    x = torch.randn(6, 4)
    torch.testing.assert_close(batch_center(x), x.mean(0, keepdim=True))
    with pytest.raises(ValueError, match="global crops"):
        dino_loss(torch.randn(5, 4), torch.randn(3, 4), torch.zeros(4))


def test_head_is_weight_normalised_and_freezes_its_last_layer() -> None:
    torch.manual_seed(0)
    head = DINOHead(12, 20, hidden_dim=16, bottleneck_dim=8)
    w = head.last_layer.weight
    torch.testing.assert_close(w.norm(dim=1), torch.ones(20))  # g fixed to 1: unit-norm rows
    g = head.last_layer.parametrizations.weight.original0
    assert not g.requires_grad
    x = torch.randn(4, 12)
    head(x, freeze_last_layer=True).sum().backward()
    assert head.last_layer.parametrizations.weight.original1.grad is None  # the optimiser skips it
    assert head.mlp[0].weight.grad is not None
    torch.testing.assert_close(head(x, freeze_last_layer=True), head(x))


def _method(sd: int = 2, overrides: list[str] | None = None, image_size: int = 32):
    cfg = make_config(method="dino", data=f"phantom{sd}d", image_size=image_size,
                      overrides=SMALL + (["model.backbone=resnet10_3d"] if sd == 3 else []) + (overrides or []))
    torch.manual_seed(0)
    return build_method(cfg, DataInfo(in_chans=1, spatial_dims=sd, image_size=image_size, num_samples=32))


def test_schedules_teacher_temperature_momentum_and_frozen_last_layer() -> None:
    m = _method(overrides=["method.warmup_teacher_temp=0.04", "method.teacher_temp=0.07",
                           "method.teacher_temp_warmup=0.5", "method.freeze_last_layer=0.2"])
    assert m.teacher_temperature() == pytest.approx(0.04) and m.last_layer_frozen()
    m.after_optimizer_step(24, 100)  # 25 of 100 steps done: halfway through the warm-up
    assert m.teacher_temperature() == pytest.approx(0.055)
    assert not m.last_layer_frozen()
    m.after_optimizer_step(18, 100)
    assert m.last_layer_frozen()
    m.after_optimizer_step(79, 100)
    assert m.teacher_temperature() == pytest.approx(0.07)
    from medssl.nn.ema import cosine_momentum

    assert cosine_momentum(0.996, 0, 100) == pytest.approx(0.996)
    assert cosine_momentum(0.996, 50, 100) == pytest.approx(0.998)
    assert cosine_momentum(0.996, 100, 100) == pytest.approx(1.0)


def test_a_step_trains_the_student_and_moves_teacher_and_centre_after_it() -> None:
    m = _method(overrides=["method.freeze_last_layer=0"]).train()
    images = torch.rand(4, 1, 32, 32)
    teacher_before = [p.clone() for p in m.teacher_head.parameters()]
    out = m.training_step({"image": images})
    out.loss.backward()
    assert math.isfinite(float(out.loss.detach()))
    assert all(p.grad is None for p in m.teacher_backbone.parameters())
    assert m.head.last_layer.parametrizations.weight.original1.grad is not None
    pending = m._pending_center.clone()
    with torch.no_grad():
        for p in m.parameters():
            if p.grad is not None:
                p.add_(p.grad, alpha=-0.1)
    m.after_optimizer_step(0, 10)
    torch.testing.assert_close(m.center, 0.1 * pending)  # c = 0.9 * 0 + 0.1 * batch mean
    assert any(not torch.equal(a, b) for a, b in zip(teacher_before, m.teacher_head.parameters(), strict=True))
    assert m.progress.tolist() == [1, 10]


def test_crop_sizes_2d_and_3d_and_refusals() -> None:
    m = _method()
    assert m.local_size == 16  # ceil(32 * 96/224) = 14, raised to half of resnet18's output stride 32
    glob, loc = m.crops(torch.rand(3, 1, 32, 32))
    assert glob.shape == (6, 1, 32, 32) and loc.shape == (6, 1, 16, 16)
    m3 = _method(sd=3, image_size=16)
    glob, loc = m3.crops(torch.rand(2, 1, 16, 16, 16))
    assert loc.shape[2:] == (m3.local_size,) * 3 and m3.local_size <= 16
    vit = _method(overrides=["model.backbone=vit_tiny_patch16_224", "model.patch_size=8"])
    assert vit.local_size == 16  # ceil(32 * 96/224) = 14 -> the next multiple of the 8 px patch
    out = vit.training_step({"image": torch.rand(2, 1, 32, 32)})  # the ViT takes both sizes
    assert math.isfinite(float(out.loss.detach()))
    with pytest.raises(ConfigError, match="method.local_size 12 is not a multiple of the patch size 8"):
        _method(overrides=["model.backbone=vit_tiny_patch16_224", "model.patch_size=8", "method.local_size=12"])
    with pytest.raises(ConfigError, match="method.local_size 8 is too small"):
        _method(overrides=["method.local_size=8"])
    with pytest.raises(ConfigError, match="larger than data.image_size"):
        _method(overrides=["method.local_size=64"])
    for bad in ["method.teacher_temp=0", "method.local_scale=[0.5,0.1]", "method.freeze_last_layer=2",
                "method.center_momentum=1"]:
        with pytest.raises(ConfigError):
            _method(overrides=[bad])


def test_loss_equals_lightlys_dino_loss_on_the_same_outputs() -> None:
    """A second, independent reference: lightly's DINOLoss (installed with the bench extra)."""
    lightly_loss = pytest.importorskip("lightly.loss")
    g = torch.Generator().manual_seed(3)
    batch, k = 4, 16
    teacher = [torch.randn(batch, k, generator=g) for _ in range(2)]
    student = [torch.randn(batch, k, generator=g) for _ in range(5)]
    ref = lightly_loss.DINOLoss(output_dim=k, warmup_teacher_temp=0.07, teacher_temp=0.07,
                                warmup_teacher_temp_epochs=0, student_temp=0.1)
    center = torch.randn(1, k, generator=g) * 0.3
    ref.center.copy_(center.view(1, 1, k))
    expected = ref(teacher, student, epoch=0)
    ours = dino_loss(torch.cat(student), torch.cat(teacher), center, student_temp=0.1, teacher_temp=0.07)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    # and the same centre update: lightly moves its centre inside the forward pass, medssl after the step
    torch.testing.assert_close(ref.center.view(1, k), 0.9 * center + 0.1 * batch_center(torch.cat(teacher)))
