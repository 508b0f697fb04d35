"""Sigmoid focal loss: values against a hand-written per-element formula and torchvision, gradients, weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.utils.class_weight import compute_class_weight
from torchvision.ops import sigmoid_focal_loss as tv_focal

from medssl.errors import ConfigError, DataError
from medssl.losses.focal import SigmoidFocalLoss, balanced_class_weights, sigmoid_focal_loss


def _reference(logits, targets, gamma, alpha, weights):
    """Lin et al. 2017 written out element by element in plain Python floats."""
    out = []
    for i, row in enumerate(logits.tolist()):
        r = []
        for c, x in enumerate(row):
            t = float(targets[i][c])
            p = 1.0 / (1.0 + math.exp(-x))
            p_t = p * t + (1 - p) * (1 - t)
            ce = -(t * math.log(p) + (1 - t) * math.log(1 - p))
            a_t = 1.0 if alpha is None else alpha * t + (1 - alpha) * (1 - t)
            w = 1.0 if weights is None else weights[c]
            r.append(w * a_t * (1 - p_t) ** gamma * ce)
        out.append(r)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("gamma,alpha,weights", [(2.0, 0.25, None), (0.0, None, None), (1.5, 0.6, [0.5, 2.0, 1.0]),
                                                 (3.0, None, [1.0, 0.0, 4.0])])
def test_matches_hand_written_formula_with_soft_targets(gamma, alpha, weights):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 3, generator=g, dtype=torch.float64) * 3
    targets = torch.rand(7, 3, generator=g, dtype=torch.float64)
    targets[:3] = (targets[:3] > 0.5).double()  # some hard multi-hot rows, some soft ones
    ref = _reference(logits, targets, gamma, alpha, weights)
    got = sigmoid_focal_loss(logits, targets, gamma=gamma, alpha=alpha, class_weights=weights, reduction="none")
    assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-7)
    assert torch.isclose(sigmoid_focal_loss(logits, targets, gamma=gamma, alpha=alpha, class_weights=weights),
                         ref.mean(), rtol=1e-6)
    assert torch.isclose(sigmoid_focal_loss(logits, targets, gamma=gamma, alpha=alpha, class_weights=weights,
                                            reduction="sum"), ref.sum(), rtol=1e-6)


@pytest.mark.parametrize("gamma,alpha", [(2.0, 0.25), (0.0, 0.5), (1.0, -1)])
def test_equals_torchvision_without_class_weights(gamma, alpha):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(16, 5, generator=g) * 2
    targets = (torch.rand(16, 5, generator=g) > 0.7).float()
    ref = tv_focal(logits, targets, alpha=alpha, gamma=gamma, reduction="mean")  # torchvision: alpha<0 = off
    got = sigmoid_focal_loss(logits, targets, gamma=gamma, alpha=None if alpha < 0 else alpha)
    assert torch.isclose(got, ref, rtol=1e-5, atol=1e-7)


def test_gradient_matches_finite_differences_and_hand_formula_for_gamma_zero():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    targets = (torch.rand(4, 3, generator=g) > 0.5).double()
    w = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: sigmoid_focal_loss(x, targets, gamma=2.0, alpha=0.3, class_weights=w,
                                                                 reduction="sum"), (logits,))
    # gamma = 0, no alpha: weighted BCE, whose gradient is w_c (σ(x) − t) / numel for the mean
    x = logits.detach().clone().requires_grad_(True)
    sigmoid_focal_loss(x, targets, gamma=0.0, alpha=None, class_weights=w).backward()
    assert torch.allclose(x.grad, w * (torch.sigmoid(x.detach()) - targets) / x.numel(), atol=1e-6)


def test_class_indices_equal_one_hot_targets_and_focusing_down_weights_easy_examples():
    logits = torch.tensor([[4.0, -4.0, 0.0], [0.1, 0.2, -0.3]])
    idx = torch.tensor([0, 2])
    onehot = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert torch.equal(sigmoid_focal_loss(logits, idx, reduction="none"),
                       sigmoid_focal_loss(logits, onehot, reduction="none"))
    # an easy, confident correct example contributes far less with gamma = 2 than with plain BCE
    fl = sigmoid_focal_loss(logits, onehot, gamma=2.0, alpha=None, reduction="none")
    bce = sigmoid_focal_loss(logits, onehot, gamma=0.0, alpha=None, reduction="none")
    assert fl[0, 0] / bce[0, 0] < 1e-3 and fl[1, 2] / bce[1, 2] > 0.2


def test_module_keeps_weights_as_buffer():
    m = SigmoidFocalLoss(gamma=1.0, alpha=0.5, class_weights=[1.0, 3.0])
    assert "class_weights" in dict(m.named_buffers())
    x, t = torch.randn(5, 2), (torch.rand(5, 2) > 0.5).float()
    assert torch.equal(m(x, t), sigmoid_focal_loss(x, t, gamma=1.0, alpha=0.5, class_weights=[1.0, 3.0]))


def test_balanced_class_weights_equal_sklearn():
    y = np.array([0, 0, 0, 0, 1, 2, 2, 0, 1, 0])
    ref = compute_class_weight("balanced", classes=np.arange(3), y=y)
    assert np.allclose(balanced_class_weights(y, 3).numpy(), ref)
    # a class absent from the labels gets 0; multi-hot counts positives per column
    assert balanced_class_weights(np.array([0, 0, 1]), 3)[2] == 0
    mh = np.array([[1, 0], [1, 1], [1, 0], [1, 0]])
    assert np.allclose(balanced_class_weights(mh, 2).numpy(), [5 / (2 * 4), 5 / (2 * 1)])


def test_errors():
    x, t = torch.randn(3, 2), torch.zeros(3, 2)
    with pytest.raises(ConfigError, match="gamma"):
        sigmoid_focal_loss(x, t, gamma=-1)
    with pytest.raises(ConfigError, match="alpha"):
        sigmoid_focal_loss(x, t, alpha=1.5)
    with pytest.raises(ConfigError, match="one value per class"):
        sigmoid_focal_loss(x, t, class_weights=[1.0, 2.0, 3.0])
    with pytest.raises(ConfigError, match=">= 0"):
        sigmoid_focal_loss(x, t, class_weights=[1.0, -2.0])
    with pytest.raises(ConfigError, match="reduction"):
        SigmoidFocalLoss(reduction="avg")
    with pytest.raises(DataError, match="do not fit"):
        sigmoid_focal_loss(x, torch.zeros(3, 3))
    with pytest.raises(DataError, match="class indices"):
        sigmoid_focal_loss(x, torch.tensor([0, 1, 2]))
    with pytest.raises(DataError):
        balanced_class_weights(np.array([0, 5]), 3)
