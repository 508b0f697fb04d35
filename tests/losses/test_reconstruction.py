"""Norm-pix MSE on masked patches, against hand-written loops."""

from __future__ import annotations

import itertools

import pytest
import torch

from medssl.losses.reconstruction import (
    denormalize_patches,
    masked_image_loss,
    normalize_patches,
    reconstruction_loss,
)
from medssl.transforms.masking import MaskConfig, mask_grid, upsample_mask


def _reference(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool) -> float:
    """Loop version: mean over masked patches of the mean squared error over the patch's values."""
    total, count = 0.0, 0
    b, n, p = pred.shape
    for i in range(b):
        for j in range(n):
            if not mask[i, j]:
                continue
            t = [float(v) for v in target[i, j]]
            if norm_pix:
                mean = sum(t) / p
                var = sum((v - mean) ** 2 for v in t) / (p - 1)  # unbiased, as MAE
                t = [(v - mean) / (var + 1e-6) ** 0.5 for v in t]
            total += sum((float(pred[i, j, k]) - t[k]) ** 2 for k in range(p)) / p
            count += 1
    return total / count


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_matches_hand_written_formula(norm_pix):
    torch.manual_seed(0)
    pred, target = torch.randn(3, 6, 8), torch.rand(3, 6, 8) * 3 + 1
    mask = torch.tensor([[1, 0, 1, 0, 1, 1], [0, 0, 0, 1, 1, 1], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    got = reconstruction_loss(pred, target, mask, norm_pix=norm_pix)
    assert got.item() == pytest.approx(_reference(pred, target, mask, norm_pix), rel=1e-5)


def test_normalize_patches_formula():
    x = torch.tensor([[1.0, 2.0, 3.0, 6.0]])
    mean, var = 3.0, ((2**2) + 1 + 0 + 3**2) / 3
    expected = torch.tensor([[(v - mean) / (var + 1e-6) ** 0.5 for v in (1.0, 2.0, 3.0, 6.0)]])
    torch.testing.assert_close(normalize_patches(x), expected)
    # a constant patch stays finite (eps)
    assert torch.isfinite(normalize_patches(torch.full((1, 4), 7.0))).all()


def test_loss_only_over_masked_patches_values_and_gradients():
    torch.manual_seed(1)
    pred = torch.randn(2, 5, 4, requires_grad=True)
    target = torch.randn(2, 5, 4)
    mask = torch.tensor([[True, False, False, True, False], [False, True, False, False, True]])
    loss = reconstruction_loss(pred, target, mask)
    # changing visible predictions does not change the loss; changing a masked one does
    other = pred.detach().clone()
    other[~mask] += 10.0
    assert reconstruction_loss(other, target, mask).item() == pytest.approx(loss.item(), rel=1e-6)
    other[0, 0] += 1.0
    assert reconstruction_loss(other, target, mask).item() != pytest.approx(loss.item(), rel=1e-3)
    loss.backward()
    assert torch.all(pred.grad[~mask] == 0)
    # analytic gradient on masked patches: 2 (pred - t̂) / (P * n_masked)
    t_hat = normalize_patches(target)
    expected = 2 * (pred.detach() - t_hat) / (4 * int(mask.sum()))
    torch.testing.assert_close(pred.grad[mask], expected[mask])


def test_no_masked_patch_means_every_patch():
    pred, target = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    none = torch.zeros(2, 3, dtype=torch.bool)
    everything = torch.ones(2, 3, dtype=torch.bool)
    assert reconstruction_loss(pred, target, none).item() == pytest.approx(
        reconstruction_loss(pred, target, everything).item())
    assert reconstruction_loss(pred, target, None).item() == pytest.approx(
        reconstruction_loss(pred, target, everything).item())


def test_target_gets_no_gradient_and_shapes_are_checked():
    pred = torch.randn(1, 2, 3, requires_grad=True)
    target = torch.randn(1, 2, 3, requires_grad=True)
    reconstruction_loss(pred, target).backward()
    assert target.grad is None
    with pytest.raises(ValueError):
        reconstruction_loss(pred, target[:, :1])
    with pytest.raises(ValueError):
        reconstruction_loss(pred, target, torch.ones(1, 3, dtype=torch.bool))


# -- image-shaped predictions (cnnmim): moved here from tests/methods/test_cnnmim.py -------------------------
def _image_loss_by_hand(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, p: int, norm_pix: bool) -> float:
    """Loop over samples and masked units: mean over units of the per-unit MSE."""
    sd = mask.ndim - 1
    total, count = 0.0, 0
    for b in range(mask.shape[0]):
        for unit in itertools.product(*(range(g) for g in mask.shape[1:])):
            if not mask[(b, *unit)]:
                continue
            region = (b, slice(None), *(slice(u * p, (u + 1) * p) for u in unit))
            t = target[region].double()
            if norm_pix:
                n = t.numel()
                mu = t.sum() / n
                var = ((t - mu) ** 2).sum() / (n - 1)
                t = (t - mu) / (var + 1e-6) ** 0.5
            total += float(((pred[region].double() - t) ** 2).mean())
            count += 1
    assert sd in (2, 3) and count > 0
    return total / count


@pytest.mark.parametrize("sd,shape,p", [(2, (3, 2, 8, 12), 4), (3, (2, 1, 4, 8, 4), 2)])
@pytest.mark.parametrize("norm_pix", [True, False])
def test_masked_image_loss_matches_hand_written_formula(sd: int, shape: tuple[int, ...], p: int,
                                                        norm_pix: bool) -> None:
    torch.manual_seed(0)
    pred, target = torch.randn(shape), torch.randn(shape)
    grid = tuple(s // p for s in shape[2:])
    mask = mask_grid(MaskConfig(ratio=0.5), shape[0], grid, generator=torch.Generator().manual_seed(2))
    loss = masked_image_loss(pred, target, mask, (p,) * sd, norm_pix=norm_pix)
    assert float(loss) == pytest.approx(_image_loss_by_hand(pred, target, mask, p, norm_pix), rel=1e-5)


def test_masked_image_loss_ignores_visible_positions() -> None:
    torch.manual_seed(0)
    pred, target = torch.randn(2, 1, 16, 16), torch.randn(2, 1, 16, 16)
    mask = mask_grid(MaskConfig(ratio=0.5), 2, (4, 4), generator=torch.Generator().manual_seed(4))
    pix = upsample_mask(mask, 4)
    base = masked_image_loss(pred, target, mask, (4, 4))
    changed_visible = torch.where(pix, pred, pred + 10 * torch.randn_like(pred))
    assert torch.equal(masked_image_loss(changed_visible, target, mask, (4, 4)), base)
    changed_masked = torch.where(pix, pred + 1.0, pred)
    assert masked_image_loss(changed_masked, target, mask, (4, 4)) != base
    # gradient only at masked pixels
    pred.requires_grad_()
    masked_image_loss(pred, target, mask, (4, 4)).backward()
    assert (pred.grad[~pix] == 0).all() and (pred.grad[pix] != 0).any()


def test_denormalize_patches_inverts_normalize_patches() -> None:
    """``t̂ · sqrt(var(t) + eps) + mean(t)`` gives ``t`` back, for every patch."""
    t = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(7)) * 3 + 1
    torch.testing.assert_close(denormalize_patches(normalize_patches(t), t), t, rtol=1e-5, atol=1e-5)
    mean, std = t.mean(-1, keepdim=True), (t.var(-1, keepdim=True) + 1e-6).sqrt()  # written out
    pred = torch.randn(2, 5, 12)
    torch.testing.assert_close(denormalize_patches(pred, t), pred * std + mean)


def test_masked_image_loss_equals_reconstruction_loss_of_patchified_images() -> None:
    """Image-shaped predictions with a unit grid give the patch loss of the same patches (RGB, so the channel
    layout of a patch matters for nothing but the order of a sum)."""
    from medssl.nn.patches import patchify

    g = torch.Generator().manual_seed(3)
    pred, target = torch.randn(2, 3, 8, 12, generator=g), torch.randn(2, 3, 8, 12, generator=g)
    mask = mask_grid(MaskConfig(ratio=0.5), 2, (2, 3), generator=g)
    ref = reconstruction_loss(patchify(pred, 4, 2), patchify(target, 4, 2), mask.reshape(2, -1))
    torch.testing.assert_close(masked_image_loss(pred, target, mask, 4), ref)


@pytest.mark.parametrize("pred_shape,mask_shape", [((2, 1, 8, 8), (2, 3, 3)), ((2, 1, 8, 8), (2, 2)),
                                                   ((2, 1, 8, 8), (3, 2, 2))])
def test_masked_image_loss_rejects_shapes_that_do_not_fit(pred_shape, mask_shape) -> None:
    with pytest.raises(ValueError):
        masked_image_loss(torch.zeros(pred_shape), torch.zeros(pred_shape),
                          torch.zeros(mask_shape, dtype=torch.bool), 4)
