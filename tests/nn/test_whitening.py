"""Whitening layers against NumPy references: ZCA, IterNorm, running statistics, folding, stable gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medssl.errors import ConfigError
from medssl.nn.whitening import Whitening, inv_sqrt_psd, iternorm_matrix, zca_matrix


def _correlated(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Samples with a strongly correlated, badly scaled covariance and a non-zero mean."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) * torch.logspace(0, 1.5, d, dtype=torch.float64)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ mix + 3.0


def _np_cov(x: np.ndarray) -> np.ndarray:
    xc = x - x.mean(axis=0)
    return xc.T @ xc / x.shape[0]


def _np_inv_sqrt(c: np.ndarray) -> np.ndarray:
    lam, u = np.linalg.eigh(c)
    return u @ np.diag(lam ** -0.5) @ u.T


def test_zca_output_covariance_is_identity_on_correlated_data():
    x = _correlated(4000, 8)
    layer = Whitening(8, "zca", group_size=0, eps=1e-9).train()
    y = layer(x).numpy()
    assert np.abs(y.mean(axis=0)).max() < 1e-8
    np.testing.assert_allclose(_np_cov(y), np.eye(8), atol=1e-6)
    # and it is the symmetric (ZCA) solution Σ^{-1/2} (x - μ), from NumPy's eigendecomposition
    xn = x.numpy()
    ref = (xn - xn.mean(0)) @ _np_inv_sqrt(_np_cov(xn) + 1e-9 * np.eye(8))
    np.testing.assert_allclose(y, ref, atol=1e-6)


def test_grouped_whitening_is_block_diagonal():
    x = _correlated(3000, 8, seed=1)
    y = Whitening(8, "zca", group_size=4, eps=1e-9).train()(x).numpy()
    cov = _np_cov(y)
    np.testing.assert_allclose(cov[:4, :4], np.eye(4), atol=1e-6)
    np.testing.assert_allclose(cov[4:, 4:], np.eye(4), atol=1e-6)
    assert np.abs(cov[:4, 4:]).max() > 0.05  # groups are not decorrelated from each other
    xn = x.numpy()
    ref = (xn[:, 4:] - xn[:, 4:].mean(0)) @ _np_inv_sqrt(_np_cov(xn[:, 4:]) + 1e-9 * np.eye(4))
    np.testing.assert_allclose(y[:, 4:], ref, atol=1e-6)


def test_iternorm_one_step_matches_the_newton_formula():
    c = torch.as_tensor(_np_cov(_correlated(500, 5, seed=2).numpy()))[None]
    eps = 1e-5
    ce = c[0].numpy() + eps * np.eye(5)
    tr = np.trace(ce)
    p1 = 1.5 * np.eye(5) - 0.5 * (ce / tr)  # P1 = 1.5 P0 - 0.5 P0^3 Σ_N with P0 = I
    p2 = 1.5 * p1 - 0.5 * p1 @ p1 @ p1 @ (ce / tr)
    np.testing.assert_allclose(iternorm_matrix(c, eps, 1)[0].numpy(), p1 / np.sqrt(tr), rtol=1e-10)
    np.testing.assert_allclose(iternorm_matrix(c, eps, 2)[0].numpy(), p2 / np.sqrt(tr), rtol=1e-10)


def test_iternorm_converges_to_zca():
    # a covariance with condition number 5: the error falls fast with T and then stays at rounding level
    g = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    root = q @ torch.diag(torch.linspace(0.2, 1.0, 6, dtype=torch.float64).sqrt()) @ q.T
    x = torch.randn(4000, 6, generator=g, dtype=torch.float64) @ root
    c = torch.as_tensor(_np_cov(x.numpy()))[None]
    zca = zca_matrix(c, 1e-5)
    errs = [float((iternorm_matrix(c, 1e-5, t) - zca).abs().max() / zca.abs().max()) for t in (1, 3, 5, 10, 30)]
    assert errs[0] > errs[1] > errs[2] > errs[3] >= 0 and errs[2] > 1e-3, errs
    assert errs[3] < 1e-12 and errs[4] < 1e-12, errs
    y = Whitening(6, "iternorm", group_size=0, iterations=30, eps=1e-10).train()(x).numpy()
    np.testing.assert_allclose(_np_cov(y), np.eye(6), atol=1e-6)


def test_iternorm_stays_accurate_for_many_iterations_on_ill_conditioned_covariance():
    # the literal P³Σ_N recursion amplifies rounding errors once converged; the coupled form must not
    c = torch.as_tensor(_np_cov(_correlated(3000, 8, seed=8).numpy()))[None]
    lam = torch.linalg.eigvalsh(c[0])
    assert lam.max() / lam.min() > 100
    zca = zca_matrix(c, 1e-5)
    for t in (60, 200):
        err = float((iternorm_matrix(c, 1e-5, t) - zca).abs().max() / zca.abs().max())
        assert err < 1e-9, (t, err)


def test_eval_mode_uses_running_statistics():
    layer = Whitening(6, "zca", group_size=3, momentum=0.5)
    batches = [_correlated(64, 6, seed=s) for s in range(3)]
    mean = np.zeros(6)
    cov = np.stack([np.eye(3), np.eye(3)])
    layer.train()
    for b in batches:  # EMA by hand: running ← (1 − m) running + m · batch (unbiased covariance)
        layer(b)
        bn = b.numpy()
        mean = 0.5 * mean + 0.5 * bn.mean(0)
        for gi in range(2):
            part = bn[:, 3 * gi: 3 * gi + 3]
            cov[gi] = 0.5 * cov[gi] + 0.5 * np.cov(part, rowvar=False)
    np.testing.assert_allclose(layer.running_mean.numpy(), mean, rtol=1e-10)
    np.testing.assert_allclose(layer.running_cov.numpy(), cov, rtol=1e-10)
    layer.eval()
    x = _correlated(10, 6, seed=9)
    y = layer(x).numpy()
    w = np.zeros((6, 6))
    for gi in range(2):
        w[3 * gi: 3 * gi + 3, 3 * gi: 3 * gi + 3] = _np_inv_sqrt(cov[gi] + layer.eps * np.eye(3))
    np.testing.assert_allclose(y, (x.numpy() - mean) @ w, rtol=1e-8, atol=1e-10)
    # in eval mode a sample's output does not depend on the rest of the batch, and stats do not move
    np.testing.assert_allclose(layer(x[:1]).numpy(), y[:1], rtol=1e-10)
    np.testing.assert_allclose(layer.running_mean.numpy(), mean, rtol=1e-12)
    # the folded nn.Linear computes the same thing
    lin = layer.to_linear()
    np.testing.assert_allclose(lin(x.float()).detach().numpy(), y, rtol=1e-4, atol=1e-4)


def test_float32_input_gives_float32_output_and_gather_is_identity_in_one_process():
    x = _correlated(50, 8, seed=4).float()
    a = Whitening(8, "iternorm", group_size=4).train()(x)
    b = Whitening(8, "iternorm", group_size=4, gather_distributed=True).train()(x)
    assert a.dtype == torch.float32
    assert torch.equal(a, b)


def test_inv_sqrt_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(5)
    a = torch.randn(2, 4, 4, generator=g, dtype=torch.float64)
    spd = (a @ a.transpose(1, 2) + 0.5 * torch.eye(4, dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: inv_sqrt_psd(0.5 * (s + s.transpose(1, 2))), (spd,))


def test_inv_sqrt_gradient_is_finite_and_exact_for_repeated_eigenvalues():
    # Σ = c·I: all eigenvalues equal. At a multiple of the identity, d(Σ^{-1/2}) = -½ c^{-3/2} dΣ exactly.
    c = 2.0
    sigma = (c * torch.eye(5, dtype=torch.float64)).requires_grad_(True)
    weights = torch.randn(5, 5, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    (inv_sqrt_psd(sigma) * weights).sum().backward()
    expected = -0.5 * c ** -1.5 * 0.5 * (weights + weights.T)
    assert torch.isfinite(sigma.grad).all()
    torch.testing.assert_close(sigma.grad, expected)


def test_whitening_backward_with_fewer_samples_than_channels_is_finite():
    x = _correlated(6, 16, seed=7).float().requires_grad_(True)
    y = Whitening(16, "zca", group_size=0).train()(x)
    (y * torch.randn_like(y)).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "kwargs",
    [{"method": "pca"}, {"group_size": 5}, {"eps": 0.0}, {"momentum": 0.0}, {"iterations": 0}, {"dtype": "float16"}],
)
def test_invalid_settings_raise_config_errors(kwargs):
    args = {"method": "zca", **kwargs}
    with pytest.raises(ConfigError):
        Whitening(8, **args)
