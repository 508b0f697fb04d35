"""Norm-pix MSE on masked patches, against hand-written loops."""

from __future__ import annotations

import pytest
import torch

from medssl.losses.reconstruction import normalize_patches, reconstruction_loss


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
